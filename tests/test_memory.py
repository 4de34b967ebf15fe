"""The dry-run memory plan (feedbackalign/memory.py): the headline run's plan from the real train.py, its closed
forms, its meta-device trace against a real forward, and the plan against the peak measured on CPU for a
29M-parameter random Llama (every allocation of the real trainer's build and steps, from torch's profiler)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from feedbackalign import builders, memory, models
from helpers import make_config, run_script

GIB = 2 ** 30
MID = Path(__file__).resolve().parent / "fixtures" / "architectures" / "llama-mid.json"  # 29M parameters
MID_RUN = ["loss=nca", "model.name_or_path=random", "model.architecture=llama-mid", "model.tokenizer_name_or_path=tiny",
           "model.batch_size=32", "++dataset_options.wordsort.n_prompts=64", "n_eval_examples=0"]


@pytest.fixture
def mid_architecture(tmp_path, monkeypatch):
    """The shipped architectures plus the 29M-parameter test Llama."""
    folder = tmp_path / "architectures"
    shutil.copytree(models.ARCHITECTURES_DIR, folder)
    shutil.copy(MID, folder)
    monkeypatch.setattr(models, "ARCHITECTURES_DIR", folder)


def test_dry_run_of_the_headline_run(tmp_path):
    """`python train.py loss=nca model=mistral7b ++dry_run=true ++world_size=8`: offline, no weights, no run
    directory; every part printed; the default plan fits an 80 GB GPU with room (<= 75 GiB)."""
    result = run_script("train.py", "loss=nca", "model=mistral7b", "++dry_run=true", "++world_size=8",
                        f"cache_dir={tmp_path / 'runs'}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "mistral-7b, 7.24B parameters, 32 layers) on 8 process(es), FSDP2 on" in out
    for part in memory.PARTS:
        assert re.search(rf"^  {part} +\d+\.\d\d$", out, re.M), part
    last = out.strip().splitlines()[-1]
    peak = float(re.fullmatch(r"per-GPU peak: (\d+\.\d\d) GiB", last).group(1))
    assert 20 < peak <= 75
    assert not (tmp_path / "runs").exists()


def test_closed_forms_of_the_states(tmp_path, mid_architecture):
    """Parameters counted on the meta device are the real model's; states shard over the world under FSDP2;
    the unsharded accumulation exists only with gradient_sync=last_microbatch; checkpointing and the token
    budget lower the activations."""
    real = models.build_model("random", torch.float32, architecture="llama-mid")
    params = sum(p.numel() for p in real.parameters())
    cfg = make_config(tmp_path, *MID_RUN)
    one = memory.plan(cfg, 1, device="cpu")
    assert one.shape.params == params
    assert one.parts["weights"] == params * 4 and one.parts["optimizer"] == 2 * params * 4
    assert one.parts["reference"] == params * 4 and one.parts["buffers"] == 0
    four = memory.plan(make_config(tmp_path, *MID_RUN, "model.gradient_accumulation_steps=2"), 4, device="cpu")
    assert four.parts["weights"] == params * 4 / 4 and four.parts["optimizer"] == 2 * params * 4 / 4
    assert four.parts["gradients"] == params * 4 / 4 + params * 4  # + the unsharded fp32 accumulation
    every = memory.plan(make_config(tmp_path, *MID_RUN, "model.gradient_accumulation_steps=2",
                                    "model.gradient_sync=every_microbatch"), 4, device="cpu")
    assert every.parts["gradients"] == 2 * params * 4 / 4 and every.peak < four.peak
    checkpointed = memory.plan(make_config(tmp_path, *MID_RUN, "model.activation_checkpointing=true"), 1, device="cpu")
    assert checkpointed.parts["activations"] < one.parts["activations"] / 2
    budget = memory.plan(make_config(tmp_path, *MID_RUN, "model.activation_checkpointing=true",
                                     "model.max_tokens_per_forward=256"), 1, device="cpu")
    assert budget.tokens.largest_forward <= 256 < checkpointed.tokens.largest_forward
    assert budget.parts["activations"] < checkpointed.parts["activations"]
    lora = memory.plan(make_config(tmp_path, *MID_RUN, "model.lora.enabled=true", "model.lora.r=8"), 1, device="cpu")
    adapters = 8 * 8 * ((512 + 512) * 2 + (512 + 256) * 2)  # 8 layers x r x (in + out) of q, o and k, v
    assert lora.parts["optimizer"] == 2 * adapters * 4 and lora.parts["reference"] == 0


def test_the_meta_trace_counts_what_a_real_forward_saves(mid_architecture):
    """Bytes saved for backward per token: the meta-device trace equals the same trace on real CPU tensors."""
    config = models.architecture_config("llama-mid")
    for dtype in (torch.float32, torch.bfloat16):
        meta, real = ((memory.saved_bytes(config, 2, 32, dtype, device) - memory.saved_bytes(config, 1, 32, dtype, device))
                      for device in ("meta", "cpu"))
        assert meta == real > 0


def test_tokens_are_measured_on_the_data_or_bounded_by_max_lengths(tmp_path, mid_architecture):
    cfg = make_config(tmp_path, *MID_RUN)
    trainer_cls = builders.trainer_class(cfg)
    measured = memory.microbatch_tokens(cfg, 1, trainer_cls)
    bound = memory.bound_tokens(cfg, 1, trainer_cls, "test")
    assert measured.source.startswith("measured: the largest of 2 microbatches")
    assert 0 < measured.labels < measured.packed < measured.sequence <= bound.sequence == 32 * 4 * 128
    missing = make_config(tmp_path, *MID_RUN, "model.tokenizer_name_or_path=/nonexistent/tokenizer")
    with memory.offline():
        fallback = memory.microbatch_tokens(missing, 1, trainer_cls)
    assert fallback.packed == bound.packed and "data not at hand: cannot load tokenizer" in fallback.source


def two_steps(cfg):
    """The real trainer built and run for two optimizer steps (the second has AdamW's moments)."""
    trainer = builders.build_trainer(cfg, 0, 1, torch.device("cpu"))
    batches = iter(trainer.train_loader)
    for _ in range(2):
        trainer.train_step([next(batches)])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_is_within_25_percent_of_the_measured_cpu_peak(tmp_path, mid_architecture, checkpointing):
    """NCA K=4 on wordsort, 32 groups a microbatch, fp32, a live reference: the planned peak against every byte
    the real trainer allocated (weights, reference, gradients, AdamW, activations, logits)."""
    cfg = make_config(tmp_path, *MID_RUN, f"model.activation_checkpointing={str(checkpointing).lower()}")
    planned = memory.plan(cfg, 1, device="cpu").peak
    _, measured = memory.measured_peak(lambda: two_steps(cfg), torch.device("cpu"))
    print(f"checkpointing={checkpointing}: planned {planned / GIB:.3f} GiB, measured {measured / GIB:.3f} GiB "
          f"({planned / measured - 1:+.1%})")
    assert abs(planned / measured - 1) <= 0.25
