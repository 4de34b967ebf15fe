"""Trainers on the real tiny model, real loaders and the real config: closed forms at step 0, learning,
gradient accumulation, and train.py end to end."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import REPO, make_trainer, run_script

ALL_LOSSES = sorted(p.stem for p in (REPO / "config" / "loss").glob("*.yaml"))
PAIRED = ["dpo", "cdpo", "ipo", "ncapair", "slic", "simpo", "orpo"]


def loss_on(trainer, batch):
    """The trainer's loss on one microbatch, exactly as its train step computes it."""
    sequences = trainer.loss_sequences(batch)
    reference = trainer.reference_logps(sequences) if trainer.uses_reference else None
    policy = trainer.policy_logps(sequences, with_hidden=trainer.value_head is not None)
    return trainer.loss(batch, policy, reference, trainer.step_context([batch]))


@pytest.mark.parametrize("loss, expected", [
    ("dpo", math.log(2)),                      # -log sigma(0)
    ("cdpo", math.log(2)),                     # -(1-e) log sigma(0) - e log sigma(0)
    ("ipo", (1 / (2 * 0.01)) ** 2),            # (0 - 1/(2 tau))^2
    ("ncapair", 2 * math.log(2)),              # -log sigma(0) - 1/2 log sigma(0) - 1/2 log sigma(0)
    ("nca", 2 * math.log(2)),                  # -sum_k w_k log sigma(0) - 1/K sum_k log sigma(0)
    ("kto", 0.5),                              # 1 - sigma(beta (0 - 0)), z0 = 0
])
def test_policy_equal_to_reference_gives_closed_form(tmp_path, loss, expected):
    trainer = make_trainer(tmp_path, f"loss={loss}")
    with torch.no_grad():
        value, _ = loss_on(trainer, next(iter(trainer.train_loader)))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_infonca_at_step_zero_is_log_k(tmp_path):
    trainer = make_trainer(tmp_path, "loss=infonca")
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        value, _ = loss_on(trainer, batch)
    assert value.item() == pytest.approx(math.log(batch["rewards"].shape[1]), rel=1e-5)


def margin(metrics):
    """Chosen minus rejected implicit reward (paired/K-wise losses report margins; KTO reports both sides)."""
    if "rewards/margins" in metrics:
        return metrics["rewards/margins"].mean().item()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        return (metrics["rewards/chosen"].mean() - metrics["rewards/rejected"].mean()).item()
    return None


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_each_loss_learns_on_its_real_loader(tmp_path, loss):
    """Steps over a small fixed set lower the loss on a held batch (KTO: widen the desirable-undesirable
    reward gap, since its loss moves with z0) and widen the chosen-rejected margin where one is defined."""
    trainer = make_trainer(tmp_path, f"loss={loss}", "n_epochs=2", "lr=3e-3", "++dataset_options.wordsort.n_prompts=24")
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        before, before_metrics = loss_on(trainer, batch)
    for step_batch in trainer.train_loader:
        trainer.train_step([step_batch])
    with torch.no_grad():
        after, after_metrics = loss_on(trainer, batch)
    assert torch.isfinite(after)
    if loss != "kto":
        assert after.item() < before.item()
    if margin(before_metrics) is not None:
        assert margin(after_metrics) > margin(before_metrics)


@pytest.mark.parametrize("loss", ["dpo", "sft", "nca"])
def test_accumulation_gives_the_big_batch_update(tmp_path, loss):
    """batch 8 x 1 step == batch 4 x 2 accumulation steps (SGD, so the update is the gradient itself)."""
    params = []
    for accum in (1, 2):
        trainer = make_trainer(tmp_path / str(accum), f"loss={loss}", "optimizer=SGD", "lr=1.0",
                               f"model.gradient_accumulation_steps={accum}", "model.max_grad_norm=1e9")
        before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
        micro = [b for _, b in zip(range(accum), iter(trainer.train_loader))]
        assert sum(len(b["prompts"]) for b in micro) == 8
        trainer.train_step(micro)
        params.append({n: p.detach() - before[n] for n, p in trainer.policy.named_parameters()})
    for name in params[0]:
        torch.testing.assert_close(params[0][name], params[1][name], rtol=1e-4, atol=1e-6)
    assert any(params[0][n].abs().max() > 0 for n in params[0])


def test_train_py_with_no_arguments_trains_the_default(tmp_path):
    """`python train.py` alone: SFT of the embedded tiny model on the built-in task, offline, on CPU."""
    result = run_script(str(REPO / "train.py"), f"cache_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "sft_tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < train_losses[0] / 2
    assert (run_dir / "LATEST" / "policy.pt").is_file() and (run_dir / "LATEST" / "hf" / "config.json").is_file()


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_train_py_runs_each_loss(tmp_path, loss):
    result = run_script(str(REPO / "train.py"), f"loss={loss}", f"cache_dir={tmp_path}", "n_examples=16",
                        "model.batch_size=8", "n_eval_examples=8", "model.eval_batch_size=8",
                        "+dataset_options.wordsort.n_prompts=32", "export_hf=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / f"{loss}_tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("eval/loss" in r for r in records)


@pytest.mark.parametrize("args, needle", [
    (["loss=nope"], "loss"),
    (["model=nope"], "model"),
    (["no_such_key=1"], "no_such_key"),
    (["datasets=[nope]"], "nope"),
])
def test_bad_config_fails_fast_with_the_name(tmp_path, args, needle):
    result = run_script(str(REPO / "train.py"), f"cache_dir={tmp_path}", *args, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())
