"""Atomic checkpoints and exact resume.

Layout of a run directory:
    config.yaml, metrics.jsonl
    checkpoints/step-000123/policy.pt        HALOs format {"step_idx", "state", "metrics"}: the plain model's
                                             weights (LoRA merged); load with model.load_from
    checkpoints/step-000123/hf/              save_pretrained export (safetensors) with the final save; LoRA merged
                                             unless model.lora.merge_on_export=false (then the peft adapter)
                                             QLoRA (4-bit base): nothing is merged; policy.pt holds the peft state
                                             and hf/ the adapter
    checkpoints/step-000123/resume.pt        full optimizer + scheduler state, LoRA adapters, the trainer's heads
    checkpoints/step-000123/trainer_state.json  step, examples, data position, RNG states (JSON, no pickle)
    LATEST -> checkpoints/step-000123        a symlink swapped with os.replace, so it is never half-written

What is saved is passed in explicitly as a `TrainState` (the trained modules: "policy" plus any heads, the
optimizer, the scheduler, and the JSON-safe progress of the loop); nothing here reads a trainer.
Everything read back is loaded with `torch.load(weights_only=True)` (tensors and plain containers only) or JSON.
A checkpoint is written into a temporary directory, fsync'd, renamed to a name no other checkpoint has, and only
then does LATEST move; older checkpoints beyond `keep_checkpoints` are removed after that.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from transformers.utils import logging as hf_logging

from feedbackalign.errors import CheckpointError
from feedbackalign.models import is_lora, is_quantized

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only, on CPU
STEP_DIR = re.compile(r"^step-(\d+)(?:\.(\d+))?$")
POLICY = "policy"  # the trained modules' key of the policy; every other key is a head (e.g. PPO's value head)


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
              chat_template=None) -> None:
    """save_pretrained export loadable with plain AutoModelForCausalLM (LoRA merged), or the peft adapter; the
    tokenizer is saved carrying `chat_template` (the template the run used: chat_templates.export_template).
    Without transformers' "Writing model shards" bar: the run's summary names the export."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        save_export(model, tokenizer, plain, state, out_dir, merge, chat_template)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def save_export(model, tokenizer, plain: dict, state: dict, out_dir: Path, merge: bool, chat_template) -> None:
    if is_lora(model):
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


# ---------------------------------------------------------------- save


def _free_name(root: Path, step: int) -> Path:
    """step-000123, or step-000123.1, .2 ... when a checkpoint of that step exists (never overwrite one)."""
    path, k = root / f"step-{step:06d}", 0
    while path.exists():
        k += 1
        path = root / f"step-{step:06d}.{k}"
    return path


def save(run_dir, state: TrainState, *, tokenizer, rank: int = 0, world_size: int = 1, keep: int = 2,
         export: bool = False, merge_lora: bool = True, chat_template=None) -> Path | None:
    """Write a checkpoint of `state` atomically (every rank gathers, rank 0 writes); returns its directory on
    rank 0. `export` adds the save_pretrained export hf/ (LoRA merged unless `merge_lora` is false), its
    tokenizer carrying `chat_template`."""
    full = get_model_state_dict(state.modules, options=FULL)
    optim = get_optimizer_state_dict(state.modules, state.optimizer, options=FULL)
    rng = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    final_dir = None
    if rank == 0:
        final_dir = _write(Path(run_dir), state, full, optim, rng, tokenizer=tokenizer, keep=keep, export=export,
                           merge_lora=merge_lora, chat_template=chat_template)
    _barrier(world_size)
    return final_dir


def _write(run_dir: Path, state: TrainState, full: dict, optim: dict, rng: list, *, tokenizer, keep: int,
           export: bool, merge_lora: bool, chat_template=None) -> Path:
    step = int(state.progress["step"])
    root = run_dir / "checkpoints"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    modules = by_module(full)
    policy_state = modules.pop(POLICY)
    lora, quantized = is_lora(state.policy), is_quantized(state.policy)
    plain = merged_state(policy_state, lora_scalings(state.policy)) if lora and not quantized else policy_state
    torch.save({"step_idx": state.progress["examples_seen"], "state": plain, "metrics": {}}, tmp / "policy.pt")
    resume = {"optimizer": optim, "scheduler": state.scheduler.state_dict(), "heads": modules,
              "adapters": {k: v for k, v in policy_state.items() if "lora_" in k} if lora else {}}
    torch.save(resume, tmp / "resume.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**state.progress, "rng": rng}))
    if export:
        export_hf(state.policy, tokenizer, plain, policy_state, tmp / "hf", merge=merge_lora and not quantized,
                  chat_template=chat_template)
    _fsync_tree(tmp)
    final_dir = _free_name(root, step)
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
    if not all((latest / name).is_file() for name in ("policy.pt", "resume.pt", "trainer_state.json")):
        raise CheckpointError(f"no checkpoint to resume in {run_dir}: {latest} is missing or incomplete "
                              "(train first, or point resume= at a run directory that has LATEST)")
    return latest.resolve()


def policy_file(path) -> Path:
    """The policy.pt that model.load_from names (the file, or a directory holding one); it must exist."""
    path = Path(path)
    if path.is_dir():
        path = path / "policy.pt"
    if not path.is_file():
        raise CheckpointError(f"model.load_from: {path} does not exist (give a run's LATEST/policy.pt or its "
                              "directory)")
    return path


def load_policy_weights(path) -> dict:
    """The weights from a HALOs-style policy.pt (or a bare state dict), without executing pickled code."""
    path = policy_file(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"model.load_from: cannot read {path}: {type(e).__name__}: {e}") from None
    return blob["state"] if isinstance(blob, dict) and "state" in blob else blob


def load_heads(checkpoint_dir, heads: dict[str, torch.nn.Module]) -> None:
    """Trained weights of a trainer's heads (e.g. PPO's value head) from a checkpoint's resume.pt."""
    path = Path(checkpoint_dir) / "resume.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True).get("heads", {}) if path.is_file() else {}
    for name, head in heads.items():
        if name not in saved:
            raise CheckpointError(f"checkpoint {checkpoint_dir}: no trained '{name}' in {path}; give a checkpoint "
                                  "directory written by train.py for this loss")
        head.load_state_dict(saved[name])


def _module_state(state: TrainState, ckpt: Path, resume: dict) -> dict:
    """The full {"policy.*", "<head>.*"} state to restore: plain weights, or the base + saved adapters."""
    policy = resume["adapters"] if is_lora(state.policy) else load_policy_weights(ckpt)
    modules = {POLICY: policy, **resume.get("heads", {})}
    return {f"{module}.{k}": v for module, values in modules.items() for k, v in values.items()}


def load_resume_state(run_dir, state: TrainState, *, rank: int = 0, world_size: int = 1) -> dict:
    """Restore `state`'s modules, optimizer, scheduler and this rank's RNG from run_dir/LATEST; return the saved
    progress. Rank 0 reads the files and broadcasts (full state dicts), so other ranks never hold a full copy."""
    ckpt = latest_dir(run_dir)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world_size > 1,
                               strict=not is_lora(state.policy))
    if rank == 0 or world_size == 1:
        resume = torch.load(ckpt / "resume.pt", map_location="cpu", weights_only=True)
        modules, optim = _module_state(state, ckpt, resume), resume["optimizer"]
    else:
        resume, modules, optim = None, {}, {}
    set_model_state_dict(state.modules, modules, options=options)
    set_optimizer_state_dict(state.modules, state.optimizer, optim,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=world_size > 1))
    scheduler = [resume["scheduler"] if resume is not None else None]
    if world_size > 1:
        dist.broadcast_object_list(scheduler, src=0)
    state.scheduler.load_state_dict(scheduler[0])
    progress = json.loads((ckpt / "trainer_state.json").read_text())
    rngs = progress.pop("rng")
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return progress


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl records after `step` (written by a run killed after its last checkpoint); atomic."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
