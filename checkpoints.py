"""Atomic checkpoints and exact resume.

Layout of a run directory:
    config.yaml, metrics.jsonl
    checkpoints/step-000123/policy.pt        HALOs format {"step_idx", "state", "metrics"}: the plain model's
                                             weights (LoRA merged); load with model.load_from
    checkpoints/step-000123/hf/              save_pretrained export (safetensors) with the final save; LoRA merged
                                             unless model.lora.merge_on_export=false (then the peft adapter)
                                             QLoRA (4-bit base): nothing is merged; policy.pt holds the peft state
                                             and hf/ the adapter
    checkpoints/step-000123/resume.pt        full optimizer + scheduler state, LoRA adapters, value head (tensors)
    checkpoints/step-000123/trainer_state.json  step, examples, data position, RNG states (JSON, no pickle)
    LATEST -> checkpoints/step-000123        a symlink swapped with os.replace, so it is never half-written

Everything read back is loaded with `torch.load(weights_only=True)` (tensors and plain containers only) or JSON.
A checkpoint is written into a temporary directory, fsync'd, renamed to a name no other checkpoint has, and only
then does LATEST move; older checkpoints beyond `keep_checkpoints` are removed after that.

Test hook: FEEDBACKALIGN_TEST_SAVE_PAUSE="<step>:<seconds>" sleeps inside the save of that step, after policy.pt
is in the temporary directory and before anything is renamed, so a test can SIGKILL a process mid-save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from feedback import DataError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only, on CPU
STEP_DIR = re.compile(r"^step-(\d+)(?:\.(\d+))?$")
PAUSE_ENV = "FEEDBACKALIGN_TEST_SAVE_PAUSE"


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


def split_state(full: dict) -> tuple[dict, dict]:
    """A trainer's module state ({"policy.*", "value_head.*"}) -> (policy state, value head state)."""
    policy = {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}
    head = {k.removeprefix("value_head."): v for k, v in full.items() if k.startswith("value_head.")}
    return policy, head


def export_hf(model, tokenizer, plain: dict, state: dict, out_dir: Path, merge: bool = True) -> None:
    """save_pretrained export loadable with plain AutoModelForCausalLM (LoRA merged), or the peft adapter."""
    if hasattr(model, "get_base_model"):
        if merge:
            model.get_base_model().save_pretrained(out_dir, state_dict=plain, safe_serialization=True)
        else:
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, state_dict=plain, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- save


def _pause_for_tests(step: int) -> None:
    """The documented test hook (module docstring): sleep inside the save of one step."""
    spec = os.environ.get(PAUSE_ENV)
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def _free_name(root: Path, step: int) -> Path:
    """step-000123, or step-000123.1, .2 ... when a checkpoint of that step exists (never overwrite one)."""
    path, k = root / f"step-{step:06d}", 0
    while path.exists():
        k += 1
        path = root / f"step-{step:06d}.{k}"
    return path


def save(trainer, intermediate: bool = False) -> Path | None:
    """Write a checkpoint for `trainer`'s current step atomically; every rank gathers, rank 0 writes."""
    cfg = trainer.config
    full = get_model_state_dict(trainer.trained_modules, options=FULL)
    optim = get_optimizer_state_dict(trainer.trained_modules, trainer.optimizer, options=FULL)
    rng = [None] * trainer.world_size
    if trainer.world_size > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    final_dir = None
    if trainer.rank == 0:
        final_dir = _write(trainer, full, optim, rng, export=not intermediate and cfg.export_hf)
    _barrier(trainer.world_size)
    return final_dir


def _write(trainer, full: dict, optim: dict, rng: list, export: bool) -> Path:
    root = trainer.run_dir / "checkpoints"
    tmp = root / f".tmp-step-{trainer.step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state, head = split_state(full)
    lora = hasattr(trainer.policy, "get_base_model")
    quantized = getattr(trainer.policy, "hf_quantizer", None) is not None  # QLoRA: 4-bit base, nothing to merge into
    plain = merged_state(state, lora_scalings(trainer.policy)) if lora and not quantized else state
    torch.save({"step_idx": trainer.examples_seen, "state": plain, "metrics": {}}, tmp / "policy.pt")
    _pause_for_tests(trainer.step)
    resume = {"optimizer": optim, "scheduler": trainer.scheduler.state_dict(), "value_head": head,
              "adapters": {k: v for k, v in state.items() if "lora_" in k} if lora else {}}
    torch.save(resume, tmp / "resume.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer.training_state(), "rng": rng}))
    if export:
        export_hf(trainer.policy, trainer.tokenizer, plain, state, tmp / "hf",
                  merge=bool(trainer.config.model.lora.get("merge_on_export", True)) and not quantized)
    _fsync_tree(tmp)
    final_dir = _free_name(root, trainer.step)
    os.rename(tmp, final_dir)
    _fsync_dir(root)
    point_latest(trainer.run_dir, final_dir)
    prune(trainer.run_dir, trainer.config.keep_checkpoints)
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
        raise DataError(f"no checkpoint to resume in {run_dir}: {latest} is missing or incomplete "
                        "(train first, or point resume= at a run directory that has LATEST)")
    return latest.resolve()


def load_policy_weights(path) -> dict:
    """The weights from a HALOs-style policy.pt (or a bare state dict), without executing pickled code."""
    path = Path(path)
    if path.is_dir():
        path = path / "policy.pt"
    if not path.is_file():
        raise DataError(f"model.load_from: {path} does not exist (give a run's LATEST/policy.pt or its directory)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise DataError(f"model.load_from: cannot read {path}: {type(e).__name__}: {e}") from None
    return blob["state"] if isinstance(blob, dict) and "state" in blob else blob


def _module_state(trainer, ckpt: Path, resume: dict) -> dict:
    """The full {"policy.*", "value_head.*"} state to restore: plain weights, or the base + saved adapters."""
    if hasattr(trainer.policy, "get_base_model"):
        policy = resume["adapters"]
    else:
        policy = load_policy_weights(ckpt)
    return {**{f"policy.{k}": v for k, v in policy.items()},
            **{f"value_head.{k}": v for k, v in resume.get("value_head", {}).items()}}


def load_resume_state(trainer, run_dir) -> dict:
    """Restore policy, optimizer, scheduler and RNG from run_dir/LATEST; return the trainer state dict.

    Rank 0 reads the files and broadcasts (full state dicts), so other ranks never hold a full copy."""
    ckpt = latest_dir(run_dir)
    lora = hasattr(trainer.policy, "get_base_model")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=trainer.world_size > 1, strict=not lora)
    if trainer.rank == 0 or trainer.world_size == 1:
        resume = torch.load(ckpt / "resume.pt", map_location="cpu", weights_only=True)
        modules, optim = _module_state(trainer, ckpt, resume), resume["optimizer"]
    else:
        resume, modules, optim = None, {}, {}
    set_model_state_dict(trainer.trained_modules, modules, options=options)
    set_optimizer_state_dict(trainer.trained_modules, trainer.optimizer, optim,
                             options=StateDictOptions(full_state_dict=True,
                                                      broadcast_from_rank0=trainer.world_size > 1))
    scheduler = [resume["scheduler"] if resume is not None else None]
    if trainer.world_size > 1:
        dist.broadcast_object_list(scheduler, src=0)
    trainer.scheduler.load_state_dict(scheduler[0])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    rngs = state.pop("rng")
    set_rng_state(rngs[trainer.rank] if trainer.rank < len(rngs) else rngs[0])
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl records after `step` (written by a run killed after its last checkpoint); atomic."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
