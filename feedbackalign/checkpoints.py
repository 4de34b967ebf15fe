"""Atomic, sharded checkpoints and exact resume.

Layout of a run directory:
    config.yaml, metrics.jsonl
    checkpoints/step-000123/state/              torch.distributed.checkpoint (DCP): each rank writes its own shards
                                                of the trained weights (the policy's, or a LoRA run's adapters, and
                                                the heads') and of their AdamW state; any number of processes,
                                                sharded or not, can resume from it (DCP reshards on load)
    checkpoints/step-000123/trainer_state.json  step, examples, data position, each rank's RNG, the scheduler and the
                                                optimizer's hyper-parameters (JSON)
    checkpoints/step-000123/policy.pt           consolidated weights, only where asked (`consolidate`: the final
                                                checkpoint by default): HALOs format {"step_idx", "state",
                                                "metrics"}, the plain model's weights (LoRA merged); load with
                                                model.load_from. QLoRA: the peft state, nothing merged
    checkpoints/step-000123/hf/                 save_pretrained export (safetensors) with the final save; LoRA
                                                merged unless model.lora.merge_on_export=false (then the adapter)
    LATEST -> checkpoints/step-000123           a symlink swapped with os.replace, so it is never half-written

At 7B on 8 GPUs an intermediate save writes ~29 GB of fp32 weights and ~58 GB of AdamW moments as 8 parallel
shards, and no rank holds more than its own shards; only a consolidated save gathers the full weights (29 GB) into
rank 0's host RAM. A checkpoint is written into a temporary directory (`checkpoints/.tmp-step-*`; with several
nodes, cache_dir must be a filesystem they share), fsync'd, renamed to a name no other checkpoint has, and only
then does LATEST move; older checkpoints beyond `keep_checkpoints` are removed after that. A kill at any moment
leaves the previous LATEST whole.

What is saved is passed in explicitly as a `TrainState`; nothing here reads a trainer. Nothing read back runs
code: tensors through DCP's tensor reader (torch.load(weights_only=True)) with its metadata unpickled by an
allowlist (`SafeReader`), policy.pt with torch.load(weights_only=True), everything else JSON.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from transformers.utils import logging as hf_logging

from feedbackalign import fileio
from feedbackalign.errors import CheckpointError, ConfigError
from feedbackalign.models import is_lora, is_quantized

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only, on CPU
STEP_DIR = re.compile(r"^step-(\d+)(?:\.(\d+))?$")
POLICY = "policy"  # the trained modules' key of the policy; every other key is a head (e.g. PPO's value head)
SHARDED = "state"  # the DCP directory of a checkpoint
STATE_FILE = "trainer_state.json"
CONSOLIDATE = ("final", "all")  # consolidate_checkpoints: policy.pt in the final checkpoint only, or in every one


@dataclass
class TrainState:
    """What a checkpoint holds and a resume restores."""

    modules: torch.nn.ModuleDict   # {"policy": the policy, **heads}: trained together, one state dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    progress: dict                 # JSON-safe: "step", "examples_seen", counters, the data position

    @property
    def policy(self) -> torch.nn.Module:
        return self.modules[POLICY]


def check_consolidate(value) -> None:
    if value not in CONSOLIDATE:
        raise ConfigError(f"consolidate_checkpoints={value} is not one of {', '.join(CONSOLIDATE)} (final: policy.pt "
                          "in the final checkpoint only; all: in every checkpoint)")


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- RNG (JSON-safe)


def rng_state() -> dict:
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ---------------------------------------------------------------- weights: full, plain, LoRA-merged


def plain_name(name: str) -> str:
    """A peft-wrapped parameter name as the plain model names it (base_model.model.X.base_layer.w -> X.w)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def lora_scalings(model) -> dict[str, float]:
    """{module name: alpha / r} of every LoRA layer (peft's `scaling`), for the default adapter."""
    return {name: float(m.scaling["default"]) for name, m in model.named_modules()
            if hasattr(m, "lora_A") and isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}


def merged_state(state: dict, scalings: dict[str, float]) -> dict:
    """The plain model's weights from a LoRA model's full state: W = W_base + scaling * B @ A (Hu et al. 2021)."""
    out = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        module = key.rsplit(".base_layer.", 1)[0] if ".base_layer." in key else None
        if module in scalings and key.endswith(".base_layer.weight"):
            a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
            value = (value.float() + scalings[module] * (b.float() @ a.float())).to(value.dtype)
        out[plain_name(key)] = value
    return out


def by_module(full: dict) -> dict[str, dict]:
    """The trained modules' state ({"policy.w": ..., "value_head.b": ...}) -> {module: its own state}."""
    out: dict[str, dict] = {}
    for key, value in full.items():
        module, name = key.split(".", 1)
        out.setdefault(module, {})[name] = value
    return out


def export_hf(model, tokenizer, plain: dict, state: dict, out_dir: Path, merge: bool = True,
              chat_template=None, score: dict | None = None) -> None:
    """save_pretrained export loadable with plain AutoModelForCausalLM (LoRA merged), or the peft adapter; with a
    `score` head's state, an AutoModelForSequenceClassification (a reward model) instead. The tokenizer is saved
    carrying `chat_template` (the template the run used: chat_templates.export_template). Without transformers'
    "Writing model shards" bar: the run's summary names the export."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        save_export(model, tokenizer, plain, state, out_dir, merge, chat_template, score)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def save_export(model, tokenizer, plain: dict, state: dict, out_dir: Path, merge: bool, chat_template,
                score: dict | None) -> None:
    if score is not None:
        export_sequence_classifier(model, tokenizer, plain, score, out_dir)
    elif is_lora(model):
        if merge:
            model.get_base_model().save_pretrained(out_dir, state_dict=plain, safe_serialization=True)
        else:
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, state_dict=plain, safe_serialization=True)
    used, tokenizer.chat_template = tokenizer.chat_template, chat_template or tokenizer.chat_template
    try:
        tokenizer.save_pretrained(out_dir)
    finally:
        tokenizer.chat_template = used


def export_sequence_classifier(model, tokenizer, plain: dict, score: dict, out_dir: Path) -> None:
    """A reward model's export: AutoModelForSequenceClassification (num_labels=1) holding the policy's backbone
    weights (LoRA merged) and the trained score head; built on the meta device and filled with these tensors, so
    no second copy of the weights is allocated. (export_hf saves the tokenizer.)"""
    from transformers import AutoModelForSequenceClassification

    base = model.get_base_model() if is_lora(model) else model
    config = copy.deepcopy(base.config)
    config.num_labels, config.pad_token_id, config.architectures = 1, tokenizer.pad_token_id, None
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config)
    prefix = classifier.base_model_prefix + "."
    weights = {k: v for k, v in plain.items() if k.startswith(prefix)}
    weights["score.weight"] = score["weight"].reshape(1, -1).to(next(iter(weights.values())).dtype)
    classifier.load_state_dict(weights, strict=True, assign=True)
    classifier.save_pretrained(out_dir, safe_serialization=True)


# ---------------------------------------------------------------- save


def _free_name(root: Path, step: int) -> Path:
    """step-000123, or step-000123.1, .2 ... when a checkpoint of that step exists (never overwrite one)."""
    path, k = root / f"step-{step:06d}", 0
    while path.exists():
        k += 1
        path = root / f"step-{step:06d}.{k}"
    return path


def trained_names(modules: torch.nn.Module) -> set[str]:
    """State-dict names of the trained parameters (tied names included): what the sharded state holds. A LoRA
    run's frozen base is left out; it is rebuilt from the run's config (model.load_from or the base model)."""
    return {name for name, p in modules.named_parameters(remove_duplicate=False) if p.requires_grad}


def sharded_state(state: TrainState, optimizer: bool) -> tuple[dict, list | None]:
    """({"model": trained weights, "optimizer": AdamW state}, optimizer hyper-parameters): this rank's shards
    (DTensors) under FSDP2, whole tensors otherwise; keyed by parameter name, so any layout can load them.
    `optimizer` false: the weights only (an optimizer that has not stepped has no state, and asking for its
    state dict would create one)."""
    trained = trained_names(state.modules)
    weights = {k: v for k, v in get_model_state_dict(state.modules).items() if k in trained}
    if not optimizer:
        return {"model": weights}, None
    optim = get_optimizer_state_dict(state.modules, state.optimizer)
    return {"model": weights, "optimizer": optim["state"]}, optim["param_groups"]


def save(run_dir, state: TrainState, *, tokenizer, rank: int = 0, world_size: int = 1, keep: int = 2,
         consolidate: bool = False, export: bool = False, merge_lora: bool = True,
         chat_template=None, score_head: str | None = None) -> Path | None:
    """Write a checkpoint of `state` atomically: every rank writes its shards (DCP) into the temporary directory
    rank 0 named, rank 0 adds the JSON state (and, with `consolidate`, policy.pt gathered from every rank;
    `export` the save_pretrained export hf/, LoRA merged unless `merge_lora` is false, its tokenizer carrying
    `chat_template`; with `score_head`, the name of a head scoring sequences, that export is a sequence
    classifier), then renames it and moves LATEST. Returns the checkpoint directory on rank 0."""
    full = get_model_state_dict(state.modules, options=FULL) if consolidate else None
    sharded, param_groups = sharded_state(state, optimizer=bool(state.optimizer.state))
    rng = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    root = Path(run_dir) / "checkpoints"
    tmp = [root / f".tmp-step-{int(state.progress['step']):06d}-{os.getpid()}" if rank == 0 else None]
    if rank == 0:
        shutil.rmtree(tmp[0], ignore_errors=True)
        tmp[0].mkdir(parents=True)
    if world_size > 1:
        dist.broadcast_object_list(tmp, src=0)
    alone = not dist.is_initialized()
    with warnings.catch_warnings():   # one process saving alone is what alone means here: no warning every save
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.save(sharded, storage_writer=FileSystemWriter(tmp[0] / SHARDED), no_dist=alone)
    final_dir = None
    if rank == 0:
        progress = {**state.progress, "rng": rng, "scheduler": state.scheduler.state_dict(),
                    "optimizer": param_groups}
        final_dir = _write(Path(run_dir), tmp[0], state, full, progress, tokenizer=tokenizer, keep=keep,
                           export=export, merge_lora=merge_lora, chat_template=chat_template, score_head=score_head)
    _barrier(world_size)
    return final_dir


def _write(run_dir: Path, tmp: Path, state: TrainState, full: dict | None, progress: dict, *, tokenizer, keep: int,
           export: bool, merge_lora: bool, chat_template=None, score_head: str | None = None) -> Path:
    """Rank 0: the JSON state and the consolidated files into `tmp`, then fsync, rename, LATEST, prune."""
    (tmp / STATE_FILE).write_text(json.dumps(progress))
    if full is not None:
        modules = by_module(full)
        policy_state = modules[POLICY]
        lora, quantized = is_lora(state.policy), is_quantized(state.policy)
        plain = merged_state(policy_state, lora_scalings(state.policy)) if lora and not quantized else policy_state
        torch.save({"step_idx": state.progress["examples_seen"], "state": plain, "metrics": {}}, tmp / "policy.pt")
        if export:
            export_hf(state.policy, tokenizer, plain, policy_state, tmp / "hf", merge=merge_lora and not quantized,
                      chat_template=chat_template, score=modules[score_head] if score_head else None)
    _fsync_tree(tmp)
    root = run_dir / "checkpoints"
    final_dir = _free_name(root, int(state.progress["step"]))
    os.rename(tmp, final_dir)
    _fsync_dir(root)
    point_latest(run_dir, final_dir)
    prune(run_dir, keep)
    return final_dir


def point_latest(run_dir: Path, target: Path) -> None:
    """Swap the LATEST symlink atomically (os.replace of a fresh link)."""
    link = run_dir / "LATEST"
    tmp = run_dir / f".LATEST.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, link)
    _fsync_dir(run_dir)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (by step, then by the .k suffix of a re-save at the same step)."""
    found = []
    for p in (Path(run_dir) / "checkpoints").glob("step-*"):
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (never the one LATEST points to) and drop stale temporaries."""
    latest = (Path(run_dir) / "LATEST").resolve()
    steps = checkpoint_dirs(run_dir)
    for old in steps[:-keep] if keep > 0 else []:
        if old.resolve() != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / "checkpoints").glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------- load and resume


def latest_dir(run_dir) -> Path:
    latest = Path(run_dir) / "LATEST"
    if not ((latest / STATE_FILE).is_file() and (latest / SHARDED / ".metadata").is_file()):
        raise CheckpointError(f"no checkpoint to resume in {run_dir}: {latest} is missing or incomplete "
                              "(train first, or point resume= at a run directory that has LATEST)")
    return latest.resolve()


class SafeReader(FileSystemReader):
    """DCP's file reader, except that its metadata file (a pickle) is read by `MetadataUnpickler`, which builds
    only DCP's metadata records, torch sizes and dtypes: a crafted checkpoint cannot run code when loaded."""

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class MetadataUnpickler(pickle.Unpickler):
    """Builds the records a DCP .metadata file holds (torch 2.4 onwards) and nothing else: classes defined in
    DCP's metadata and filesystem modules, torch.Size, dtypes and layouts, paths. Any other global (a function
    to call, a dotted attribute path) is refused."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
             ("pathlib", "WindowsPath")}

    def find_class(self, module, name):
        if "." not in name and ((module, name) in self.NAMED or self._record_class(module, name)
                                or module == "torch" and isinstance(getattr(torch, name, None),
                                                                    (torch.dtype, torch.layout, torch.memory_format))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")

    def _record_class(self, module: str, name: str) -> bool:
        if module not in self.MODULES:
            return False
        found = getattr(importlib.import_module(module), name, None)
        return isinstance(found, type) and found.__module__ == module


def _flat(tree: dict, prefix: str = "") -> dict:
    """DCP's flattened keys of a nested state dict ("model.policy.w", "optimizer.policy.w.exp_avg")."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def saved_metadata(directory: Path) -> dict:
    """{key: storage metadata} of a DCP directory, read through `SafeReader`."""
    try:
        return SafeReader(directory).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a damaged or crafted file is the user's to replace
        raise CheckpointError(f"checkpoint {directory.parent}: cannot read {directory}/.metadata ({e}); use another "
                              "checkpoint") from None


def read_sharded(directory: Path, tree: dict, *, no_dist: bool = False) -> None:
    """Fill `tree` (nested dicts of tensors or DTensor shards) in place from a DCP directory; every key must be
    a tensor there. Collective unless `no_dist` (one process reading alone)."""
    saved = saved_metadata(directory)
    wanted = _flat(tree)
    missing = [k for k in wanted if not isinstance(saved.get(k), TensorStorageMetadata)]
    if missing:
        raise CheckpointError(f"checkpoint {directory.parent} does not fit this run: it has no tensor {missing[0]} "
                              f"({len(missing)} missing); resume with the model, LoRA and loss settings it was saved "
                              "with")
    mismatched = [k for k, v in wanted.items() if tuple(saved[k].size) != tuple(v.shape)]
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(f"checkpoint {directory.parent} does not fit this run: {k} has shape "
                              f"{tuple(saved[k].size)} there, {tuple(wanted[k].shape)} here; resume with the same model")
    dcp.load(tree, storage_reader=SafeReader(directory), no_dist=no_dist)


def policy_file(path) -> Path:
    """What model.load_from names, checked to exist (before a run writes anything): a policy.pt, a directory
    holding one, or a checkpoint directory with sharded weights only (returned as the directory)."""
    path = Path(path)
    if path.is_dir() and not (path / "policy.pt").is_file() and (path / SHARDED / ".metadata").is_file():
        return path
    if path.is_dir():
        path = path / "policy.pt"
    if not path.is_file():
        raise CheckpointError(f"model.load_from: {path} does not exist (give a run's LATEST/policy.pt or its "
                              "directory)")
    return path


def load_policy_weights(path) -> dict:
    """The policy's weights from a HALOs-style policy.pt (or a bare state dict), without executing pickled code;
    a checkpoint directory without policy.pt (an intermediate, sharded-only one) is consolidated here from its
    DCP shards (full fine-tuning only: a LoRA run's shards hold the adapters alone)."""
    path = policy_file(path)
    if path.is_dir():
        return _consolidated_policy(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"model.load_from: cannot read {path}: {type(e).__name__}: {e}") from None
    return blob["state"] if isinstance(blob, dict) and "state" in blob else blob


def _saved_tensors(checkpoint_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's sharded state whose key starts with `prefix`, whole, read in this process
    alone (the shards of any number of ranks are stitched by DCP)."""
    saved = saved_metadata(checkpoint_dir / SHARDED)
    tree = {k[len(prefix):]: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    read_sharded(checkpoint_dir / SHARDED, {prefix.rstrip("."): tree} if tree else {}, no_dist=True)
    return tree


def _consolidated_policy(checkpoint_dir: Path) -> dict:
    weights = _saved_tensors(checkpoint_dir, f"model.{POLICY}.")
    if any("lora_" in k for k in weights):
        raise CheckpointError(f"{checkpoint_dir} is an intermediate checkpoint of a LoRA run: its shards hold the "
                              "adapters only; use the run's final checkpoint, or train with "
                              "consolidate_checkpoints=all to get policy.pt in every checkpoint")
    return weights


def load_heads(checkpoint_dir, heads: dict[str, torch.nn.Module]) -> None:
    """Trained weights of a trainer's heads (e.g. PPO's value head) from a checkpoint's sharded state."""
    checkpoint_dir = Path(checkpoint_dir)
    for name, head in heads.items():
        if not (checkpoint_dir / SHARDED / ".metadata").is_file():
            raise CheckpointError(f"checkpoint {checkpoint_dir}: no trained '{name}' (no {SHARDED}/ directory); give "
                                  "a checkpoint directory written by train.py for this loss")
        saved = _saved_tensors(checkpoint_dir, f"model.{name}.")
        if not saved:
            raise CheckpointError(f"checkpoint {checkpoint_dir}: no trained '{name}' in it; give a checkpoint "
                                  "directory written by train.py for this loss")
        head.load_state_dict(saved)


def load_resume_state(run_dir, state: TrainState, *, rank: int = 0, world_size: int = 1) -> dict:
    """Restore `state`'s trained weights, optimizer, scheduler and this rank's RNG from run_dir/LATEST; return
    the saved progress. Each rank reads the parts of the shards it holds (DCP reshards: a checkpoint saved by 2
    processes resumes in 1, sharded or not, and the other way round)."""
    ckpt = latest_dir(run_dir)
    progress = json.loads((ckpt / STATE_FILE).read_text())
    param_groups = progress.pop("optimizer")  # None: saved before the first optimizer step
    tree, _ = sharded_state(state, optimizer=param_groups is not None)
    read_sharded(ckpt / SHARDED, tree, no_dist=not dist.is_initialized())
    set_model_state_dict(state.modules, tree["model"], options=StateDictOptions(strict=False))
    if param_groups is not None:
        set_optimizer_state_dict(state.modules, state.optimizer,
                                 {"state": tree["optimizer"], "param_groups": param_groups})
    state.scheduler.load_state_dict(progress.pop("scheduler"))
    rngs = progress.pop("rng")
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return progress


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl records after `step` (written by a run killed after its last checkpoint) and a torn last
    line (a crash or a full disk mid-append); rewritten atomically, so the resumed run appends whole lines."""
    if not path.is_file():
        return
    records, torn = fileio.read_json_lines(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if torn or len(kept) < len(records):
        fileio.write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"),
                                  what="metrics", hint="free space, then resume=true again")


def remove_temporaries(run_dir) -> None:
    """Remove what dead saves left under <run_dir>/checkpoints/.tmp-* (and a stray .LATEST.* link): called when
    a run (re)starts in run_dir and when a save fails, so a tight disk is not kept full by half-written saves."""
    for stale in (Path(run_dir) / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for link in Path(run_dir).glob(".LATEST.*"):
        link.unlink(missing_ok=True)


def checkpoint_bytes(state: TrainState, *, consolidate: bool, export: bool) -> int:
    """A lower bound on the bytes a checkpoint of `state` writes, all ranks together: the trained weights' shards
    and the optimizer's state (DCP), and the whole policy once more for policy.pt (`consolidate`) and again for
    hf/ (`export`), each tensor at its full (unsharded) size. At 7B with fp32 weights and AdamW: 29 + 58 GB,
    +29 GB consolidated, +29 GB exported."""
    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    trained = size(p for p in state.modules.parameters() if p.requires_grad)
    optimizer = size(t for values in state.optimizer.state.values() for t in values.values() if torch.is_tensor(t))
    whole = size([*state.policy.parameters(), *state.policy.buffers()])
    return trained + optimizer + whole * (int(consolidate) + int(export))
