"""Atomic checkpoints and exact resume.

Layout of a run directory:
    config.yaml, metrics.jsonl
    checkpoints/step-000123/policy.pt        HALOs format {"step_idx", "state", "metrics"}; load with model.load_from
    checkpoints/step-000123/hf/              save_pretrained export (safetensors), LoRA merged (final save)
    checkpoints/step-000123/optimizer.pt     full optimizer + scheduler state (tensors only)
    checkpoints/step-000123/trainer_state.json  step, examples, data position, RNG states (JSON, no pickle)
    LATEST -> checkpoints/step-000123        a symlink swapped with os.replace, so it is never half-written

Everything read back is loaded with `torch.load(weights_only=True)` (tensors and plain containers only) or JSON.
A checkpoint is written into a temporary directory, fsync'd, renamed into place, and only then does LATEST move.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from feedback import DataError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": [random.getstate()[0], list(random.getstate()[1]),
            random.getstate()[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def policy_state_dict(model) -> dict:
    """The full (unsharded) policy state dict on CPU; every rank must call it under FSDP."""
    return get_model_state_dict(model, options=FULL)


def export_hf(model, tokenizer, state: dict, out_dir: Path) -> None:
    """save_pretrained export loadable with plain AutoModelForCausalLM; LoRA adapters merged into the base."""
    if hasattr(model, "merge_and_unload"):
        _merged_copy(model, state).save_pretrained(out_dir, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _merged_copy(peft_model, state: dict):
    """A CPU copy of a LoRA model with adapters merged (the run's model is left untouched)."""
    import copy

    clone = copy.deepcopy(peft_model).to("cpu")
    clone.load_state_dict(state, strict=False)
    return clone.merge_and_unload()


def save(trainer, intermediate: bool = False) -> Path:
    """Write a checkpoint for `trainer`'s current step atomically; rank 0 writes, all ranks gather."""
    cfg = trainer.config
    state = policy_state_dict(trainer.policy)
    optim = get_optimizer_state_dict(trainer.policy, trainer.optimizer, options=FULL) \
        if trainer.value_head is None else trainer.optimizer.state_dict()
    rng = [None] * trainer.world_size
    if trainer.world_size > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    final_dir = trainer.run_dir / "checkpoints" / f"step-{trainer.step:06d}"
    if trainer.rank == 0:
        tmp = trainer.run_dir / "checkpoints" / f".tmp-step-{trainer.step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"step_idx": trainer.examples_seen, "state": state, "metrics": {}}, tmp / "policy.pt")
        resume = {"optimizer": optim, "scheduler": trainer.scheduler.state_dict()}
        if trainer.value_head is not None:
            resume["value_head"] = trainer.value_head.state_dict()
        torch.save(resume, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer.training_state(), "rng": rng}))
        if not intermediate and cfg.export_hf:
            export_hf(trainer.policy, trainer.tokenizer, state, tmp / "hf")
        _fsync_tree(tmp)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.rename(tmp, final_dir)
        point_latest(trainer.run_dir, final_dir)
        prune(trainer.run_dir, cfg.keep_checkpoints)
    _barrier(trainer.world_size)
    return final_dir


def point_latest(run_dir: Path, target: Path) -> None:
    """Swap the LATEST symlink atomically (os.replace of a fresh link)."""
    link = run_dir / "LATEST"
    tmp = run_dir / f".LATEST.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, link)
    fd = os.open(run_dir, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (never the one LATEST points to) and drop stale temporaries."""
    root = run_dir / "checkpoints"
    latest = (run_dir / "LATEST").resolve()
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.resolve() != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_dir(run_dir) -> Path:
    latest = Path(run_dir) / "LATEST"
    if not (latest / "policy.pt").is_file():
        raise DataError(f"no checkpoint to resume in {run_dir}: {latest}/policy.pt does not exist "
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


def load_resume_state(trainer, run_dir) -> dict:
    """Restore policy, optimizer, scheduler and RNG from run_dir/LATEST; return the trainer state dict."""
    ckpt = latest_dir(run_dir)
    set_model_state_dict(trainer.policy, load_policy_weights(ckpt), options=StateDictOptions(full_state_dict=True))
    resume = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    if trainer.value_head is None:
        set_optimizer_state_dict(trainer.policy, trainer.optimizer, resume["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        trainer.optimizer.load_state_dict(resume["optimizer"])
        trainer.value_head.load_state_dict(resume["value_head"])
    trainer.scheduler.load_state_dict(resume["scheduler"])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    rngs = state.pop("rng")
    set_rng_state(rngs[trainer.rank] if trainer.rank < len(rngs) else rngs[0])
    return state
