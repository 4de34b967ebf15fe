"""Checkpoints on the real tiny model: a SIGKILL in the middle of a save leaves the previous LATEST loadable, and
resuming from it reaches the weights and metrics of the uninterrupted run (CPU, deterministic kernels)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from feedbackalign import builders, checkpoints
from feedbackalign.errors import CheckpointError
from helpers import REPO, SMALL, make_config, make_trainer
from feedbackalign.throughput import TIMING_METRICS

# 4 DPO steps with warmup (scheduler state matters) and AdamW (optimizer state matters), a checkpoint every step
RUN = ["loss=dpo", "exp_name=run", "model.batch_size=4", "n_examples=16", "warmup_steps=2",
       "intermediate_checkpoints=4", "keep_checkpoints=2", "deterministic=true",
       "++dataset_options.wordsort.n_prompts=16", "eval_every=8", "n_eval_examples=4", "model.eval_batch_size=4"]


@pytest.fixture
def deterministic():
    """`deterministic=true` switches torch to deterministic kernels for the process; switch back after."""
    yield
    torch.use_deterministic_algorithms(False)


def metrics(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_METRICS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kill_during_save(cache_dir, step: int):
    """Run train.py until it is inside the save of `step` (paused there by tests/train_pausing_in_save.py), then
    SIGKILL it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = cache_dir / "stderr.txt"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "train_pausing_in_save.py"), str(step), "300",
                             f"cache_dir={cache_dir}", *SMALL, *RUN],
                            cwd=cache_dir, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    partial = cache_dir / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while not list(partial.glob(f".tmp-step-{step:06d}-*/trainer_state.json")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "train.py never reached the save"
            time.sleep(0.2)
        time.sleep(1.0)  # the last file may still be flushing; the pause follows the fsync
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sigkill_mid_save_then_resume_matches_the_uninterrupted_run(tmp_path, deterministic):
    full = make_trainer(tmp_path / "full", *RUN)
    full.train()

    killed = tmp_path / "killed"
    killed.mkdir()
    kill_during_save(killed, step=3)
    run_dir = killed / "run"
    assert list((run_dir / "checkpoints").glob(".tmp-step-000003-*"))          # the half-written save
    assert checkpoints.latest_dir(run_dir).name == "step-000002"               # LATEST still the previous one
    assert checkpoints.load_policy_weights(run_dir / "LATEST")["lm_head.weight"].isfinite().all()

    resumed = make_trainer(killed, *RUN, "resume=true")
    assert resumed.step == 2 and resumed.examples_seen == 8
    resumed.train()

    a = checkpoints.load_policy_weights(tmp_path / "full" / "run" / "LATEST")
    b = checkpoints.load_policy_weights(run_dir / "LATEST")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resume: max |weight(resumed) - weight(uninterrupted)| = {worst:.2e}")
    assert worst <= 1e-6
    assert metrics(run_dir) == metrics(tmp_path / "full" / "run")                 # steps 1..4, each once
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    kept = [p.name for p in checkpoints.checkpoint_dirs(run_dir)]
    assert kept == ["step-000003", "step-000004"] and checkpoints.latest_dir(run_dir).name == "step-000004"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))                     # the stale temporary is gone

    cfg = make_config(tmp_path / "next", f"model.load_from={run_dir / 'LATEST'}")
    loaded = builders.build_policy(cfg, full.tokenizer, torch.device("cpu")).state_dict()
    assert all(torch.equal(loaded[k], b[k]) for k in b)


def test_a_same_step_resave_never_replaces_the_checkpoint_latest_points_to(tmp_path):
    """A second save at one step gets a new name (step-N.1): LATEST moves only once the new one is complete."""
    trainer = make_trainer(tmp_path, "loss=sft", "n_examples=8", "keep_checkpoints=3")
    trainer.save()
    first = checkpoints.latest_dir(trainer.run_dir)
    trainer.save()
    second = checkpoints.latest_dir(trainer.run_dir)
    assert (first.name, second.name) == ("step-000000", "step-000000.1") and first.is_dir()
    assert [p.name for p in checkpoints.checkpoint_dirs(trainer.run_dir)] == ["step-000000", "step-000000.1"]


def test_resume_without_a_checkpoint_fails_before_loading_anything(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        make_trainer(tmp_path, "loss=sft", "resume=true")
    assert not any(tmp_path.iterdir())
