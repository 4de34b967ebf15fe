"""Trainers on the real tiny model, real loaders and the real config: closed forms at step 0, every loss learning
through the full loop, gradient accumulation, the non-finite guard, and train.py end to end."""

import json
import math
import os

import pytest
import torch
from feedbackalign import builders, checkpoints
from feedbackalign.configuration import compose
from helpers import REPO, make_trainer, run_script

ALL_LOSSES = sorted(p.stem for p in (REPO / "config" / "loss").glob("*.yaml"))
PAIRED = ["dpo", "cdpo", "ipo", "ncapair", "slic", "simpo", "orpo"]


def loss_on(trainer, batch):
    """The trainer's loss on one microbatch, exactly as its train step computes it."""
    policy, reference = trainer.forward(batch)
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
    trainer = make_trainer(tmp_path, f"loss={loss}", "~tuning")   # the loss yaml's values, not the tiny model's
    with torch.no_grad():
        value, _ = loss_on(trainer, next(iter(trainer.train_loader)))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_infonca_at_step_zero_is_log_k(tmp_path):
    trainer = make_trainer(tmp_path, "loss=infonca")
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        value, _ = loss_on(trainer, batch)
    assert value.item() == pytest.approx(math.log(batch.values["rewards"].shape[1]), rel=1e-5)


def margin(metrics):
    """Chosen minus rejected implicit reward (paired/K-wise losses report margins; KTO reports both sides)."""
    if "rewards/margins" in metrics:
        return metrics["rewards/margins"].mean().item()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        return (metrics["rewards/chosen"].mean() - metrics["rewards/rejected"].mean()).item()
    return None


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_each_loss_learns_through_the_full_loop(tmp_path, loss):
    """Three optimizer steps of `trainer.train()` (the loop train.py runs: steps, eval, metrics, final checkpoint)
    lower the loss on the first batch and widen the chosen-rejected margin where one is defined. KTO's loss moves
    with z0 (its reward gap must widen instead); PPO's clipped surrogate moves with the policy ratio (its critic
    loss must fall); GRPO's KL term grows as the policy leaves the reference (its best-over-worst log-ratio margin
    must widen)."""
    trainer = make_trainer(tmp_path, f"loss={loss}", "~tuning", "n_examples=24", "lr=3e-3", "eval_every=24",
                           "++dataset_options.wordsort.n_prompts=24")   # the loss yaml's values, a large lr
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        before, before_metrics = loss_on(trainer, batch)
    trainer.train()
    with torch.no_grad():
        after, after_metrics = loss_on(trainer, batch)
    assert torch.isfinite(after)
    if loss == "ppo":
        assert after_metrics["loss/critic"].item() < before_metrics["loss/critic"].item()
    elif loss not in ("kto", "grpo"):
        assert after.item() < before.item()
    if margin(before_metrics) is not None:
        assert margin(after_metrics) > margin(before_metrics)
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert "eval/loss" in records[-1] and all(r["skipped_steps"] == 0 for r in records)
    assert (trainer.run_dir / "LATEST" / "policy.pt").is_file()


@pytest.mark.parametrize("loss", ["dpo", "sft", "nca"])
def test_accumulation_gives_the_big_batch_update(tmp_path, loss):
    """batch 8 x 1 step == batch 4 x 2 accumulation steps (SGD, so the update is the gradient itself)."""
    params = []
    for accum in (1, 2):
        trainer = make_trainer(tmp_path / str(accum), f"loss={loss}", "optimizer=SGD", "lr=1.0",
                               f"model.gradient_accumulation_steps={accum}", "model.max_grad_norm=1e9")
        before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
        micro = [b for _, b in zip(range(accum), iter(trainer.train_loader))]
        assert sum(len(b.prompts) for b in micro) == 8
        trainer.train_step(micro)
        params.append({n: p.detach() - before[n] for n, p in trainer.policy.named_parameters()})
    for name in params[0]:
        torch.testing.assert_close(params[0][name], params[1][name], rtol=1e-4, atol=1e-6)
    assert any(params[0][n].abs().max() > 0 for n in params[0])


def test_the_no_argument_config_trains_sft_of_the_tiny_model(tmp_path):
    """`python train.py` alone = SFT of the embedded tiny model on the built-in task (4000 prompts: minutes on 2
    cores, so here its first steps in-process; the CLI itself runs in the subprocess tests of this suite)."""
    cfg = compose([f"cache_dir={tmp_path}"])
    assert (cfg.loss.name, cfg.model.name, list(cfg.datasets), cfg.model.policy_dtype) == \
        ("sft", "tiny", ["wordsort"], "float32")
    trainer = builders.build_trainer(cfg, 0, 1, torch.device("cpu"))
    losses = [trainer.train_step([batch])["loss"] for _, batch in zip(range(4), trainer.train_loader)]
    assert losses[-1] < losses[0]
    metrics = trainer.train_step([next(iter(trainer.train_loader))])
    assert 0 < metrics["mfu"] < 1 and metrics["padding_fraction"] == 0.0
    assert metrics["tokens/s"] >= metrics["computed_tokens/s"] > 0   # a shared prompt is computed once


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    """lr=1e30: step 1 is finite but leaves weights near 1e30, so every later loss is inf/NaN; those steps must
    not touch the weights or the optimizer, and `skipped_steps` counts them."""
    trainer = make_trainer(tmp_path, "loss=sft", "lr=1e30", "n_examples=40", "max_nonfinite_steps=100")
    batches = iter(trainer.train_loader)
    assert trainer.train_step([next(batches)])["skipped_steps"] == 0
    weights = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    for _ in range(3):
        metrics = trainer.train_step([next(batches)])
    # RMSNorm of ~1e30 overflows to inf, the hidden state to 0: the loss is finite (uniform), the gradient is not
    assert metrics["skipped_steps"] == 3 and not math.isfinite(metrics["grad_norm"])
    assert all(torch.equal(p, weights[n]) for n, p in trainer.policy.named_parameters())
    assert all(int(s["step"]) == 1 for s in trainer.optimizer.state.values())   # AdamW stepped once
    assert all(p.grad is None for p in trainer.policy.parameters())
    with torch.no_grad():
        trainer.policy.lm_head.weight[0, 0] = float("nan")                          # now the loss itself is NaN
    metrics = trainer.train_step([next(batches)])
    assert metrics["skipped_steps"] == 4 and not math.isfinite(metrics["loss"])
    assert all(torch.equal(p, weights[n]) for n, p in trainer.policy.named_parameters()
               if p is not trainer.policy.lm_head.weight)                       # (tied to the input embedding)


def test_too_many_nonfinite_steps_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    result = run_script(str(REPO / "train.py"), "loss=sft", f"cache_dir={tmp_path}", "lr=1e30", "n_examples=32",
                        "model.batch_size=8", "n_eval_examples=0", "+dataset_options.wordsort.n_prompts=32",
                        "export_hf=false", "max_nonfinite_steps=2", "intermediate_checkpoints=8", cwd=tmp_path)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]                          # the error is the last line
    assert message.startswith("train.py: error: 2 non-finite steps in a row") and "max_nonfinite_steps=2" in message
    assert "step-000002 was kept" in message
    assert "Traceback" not in result.stderr
    run_dir = tmp_path / "sft_tiny"
    assert os.readlink(run_dir / "LATEST").endswith("step-000002")            # step 3 stopped the run: no save
    weights = checkpoints.load_policy_weights(run_dir / "LATEST")             # an intermediate: from its shards
    assert all(torch.isfinite(w).all() for w in weights.values())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 1)]


@pytest.mark.parametrize("args, needle", [
    (["loss=nope"], "loss"),
    (["model=nope"], "model"),
    (["no_such_key=1"], "no_such_key"),
    (["datasets=[nope]"], "nope"),
    (["loss=dpo", "loss.dataloader=RewardDataLoader"], "yields 'groups' batches: use PairedPreferenceDataLoader"),
])
def test_bad_config_fails_fast_with_the_name(tmp_path, args, needle):
    result = run_script(str(REPO / "train.py"), f"cache_dir={tmp_path}", *args, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_python_train_py_with_no_arguments(tmp_path):
    """The literal `python train.py`: SFT of the tiny model on wordsort, offline, one epoch (~1-2 min on 2 cores)."""
    result = run_script(str(REPO / "train.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "sft_tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert len(train_losses) == 125 and train_losses[-1] < train_losses[0] / 3
    assert (run_dir / "LATEST" / "policy.pt").is_file() and (run_dir / "LATEST" / "hf" / "config.json").is_file()


def test_every_trainer_declares_a_batch_kind_its_default_loader_yields():
    import dataloader
    import trainers
    from feedbackalign.batches import KINDS

    declared = [c for c in vars(trainers).values() if isinstance(c, type) and issubclass(c, trainers.BasicTrainer)
                and c.batch_kind]
    assert len(declared) >= 14
    for trainer in declared:
        assert trainer.batch_kind in KINDS, trainer.__name__
        assert getattr(dataloader, trainer.default_dataloader).batch_kind == trainer.batch_kind, trainer.__name__


@pytest.mark.parametrize("loss, loader", [("dpo", "UnpairedPreferenceDataLoader"), ("dpo", "RewardDataLoader"),
                                          ("kto", "PairedPreferenceDataLoader"), ("nca", "SFTDataLoader"),
                                          ("cut", "ConditionalSFTDataLoader")])
def test_a_loader_that_does_not_fit_the_loss_is_refused_before_anything_is_built(tmp_path, loss, loader):
    """Before named batches these trained on wrongly split data and exited 0."""
    from feedbackalign.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"loss={loss} \(\w+Trainer\) trains on '\w+' batches but "
                                          rf"loss.dataloader={loader} yields"):
        make_trainer(tmp_path, f"loss={loss}", f"loss.dataloader={loader}")
    assert not any(tmp_path.iterdir())


def test_every_forward_is_metered_kl_partners_and_live_reference_included(tmp_path):
    """KTO: tokens/s counts targets and their KL partners (both go through the policy); computed tokens add the
    live reference's forwards of both; DPO with a cached reference computes only the policy's packed row."""
    kto = make_trainer(tmp_path / "kto", "loss=kto")
    batch = next(iter(kto.train_loader))
    logged = kto.train_step([batch])
    unshared = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch.sequences())
    assert logged["tokens/s"] * logged["s/step"] == pytest.approx(unshared)
    # targets and partners are separate forwards (no prompt shared between them): policy and reference each
    # compute every token once, so twice the unshared count
    assert logged["computed_tokens/s"] * logged["s/step"] == pytest.approx(2 * unshared)

    dpo = make_trainer(tmp_path / "dpo", "loss=dpo", "cache_reference_logprobs=true")
    batch = next(iter(dpo.train_loader))
    logged = dpo.train_step([batch])
    from feedbackalign.logprobs import pack

    assert logged["computed_tokens/s"] * logged["s/step"] == pytest.approx(pack(batch.sequences()).input_ids.shape[1])
    assert logged["tokens/s"] * logged["s/step"] == pytest.approx(
        sum(len(s.prompt_ids) + len(s.response_ids) for s in batch.sequences()))


def test_grpo_at_the_reference_is_minus_the_token_weighted_advantage(tmp_path):
    """Policy = reference: ratio 1 and KL 0, so GRPO's loss is -Σ_i A_i n_i / Σ_i n_i over the microbatch's
    responses (n_i their token counts, A the group-relative advantages of the batch's true rewards)."""
    trainer = make_trainer(tmp_path, "loss=grpo")
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        value, metrics = loss_on(trainer, batch)
    rewards = batch.values["rewards"].tolist()
    advantages = []
    for row in rewards:
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        advantages += [(r - mean) / (std + 0.01) for r in row]
    counts = [len(s.response_ids) for s in batch.parts["responses"]]
    assert value.item() == pytest.approx(-sum(a * n for a, n in zip(advantages, counts)) / sum(counts), rel=1e-5)
    assert metrics["kl"].item() == 0.0 and metrics["clip_fraction"].item() == 0.0
    assert (metrics["rewards/margins"] == 0).all()


@pytest.mark.parametrize("fsdp", [False, True])
def test_reference_load_from_gives_the_reference_other_weights(tmp_path, fsdp):
    """model.reference_load_from: the reference from a policy.pt, or `base` (the model without model.load_from,
    loop.py's reference=start from a base model), while the policy starts from model.load_from; whole, and
    sharded by FSDP2 (rank 0 reads the reference's own weights into its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from feedbackalign import models
    from feedbackalign.errors import ConfigError

    other = models.build_model("tiny", torch.float32, seed=7)
    torch.save({"step_idx": 0, "state": other.state_dict(), "metrics": {}}, tmp_path / "other.pt")
    base = models.build_model("tiny", torch.float32, seed=0).state_dict()

    def same(model, state):
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return all(torch.equal(v, state[k]) for k, v in full.items())

    sharding = [f"use_fsdp={str(fsdp).lower()}"]
    trainer = make_trainer(tmp_path / "a", "loss=dpo", f"model.reference_load_from={tmp_path / 'other.pt'}",
                           *sharding)
    assert same(trainer.reference, other.state_dict()) and same(trainer.policy, base)
    trainer = make_trainer(tmp_path / "b", "loss=dpo", f"model.load_from={tmp_path / 'other.pt'}",
                           "model.reference_load_from=base", *sharding)
    assert same(trainer.reference, base) and same(trainer.policy, other.state_dict())
    if fsdp:
        return
    with pytest.raises(ConfigError, match="model.reference_load_from=base needs full fine-tuning"):
        make_trainer(tmp_path / "c", "loss=dpo", "model.lora.enabled=true", "model.reference_load_from=base")
