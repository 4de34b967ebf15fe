"""Test helpers: compose the real Hydra config and build the real trainer in-process, or run train.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from feedbackalign import builders
from feedbackalign.configuration import compose

REPO = Path(__file__).resolve().parents[1]
SMALL = ["++dataset_options.wordsort.n_prompts=48", "n_eval_examples=8", "model.eval_batch_size=8",
         "model.batch_size=8", "do_first_eval=false", "export_hf=false", "warmup_steps=0"]


def make_config(tmp_path, *overrides):
    """The real config (config/), with a small built-in task and a run dir under tmp_path."""
    return compose([f"cache_dir={tmp_path}", *SMALL, *overrides])


def make_trainer(tmp_path, *overrides):
    return builders.build_trainer(make_config(tmp_path, *overrides), 0, 1, torch.device("cpu"))


def run_script(*args, cwd=REPO, timeout=600, env=None):
    """Run a repository entry point as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
