"""Defaults that work: per-model, per-loss settings (config/tuning/), the warning for alignment from a random
init, and a short run of `python train.py loss=dpo model.load_from=<SFT>` with no other setting that raises the
task's true reward; the summary every run ends with, checked against its metrics.jsonl."""

import json
import math
import warnings

import pytest
import torch
from omegaconf import OmegaConf

import eval as eval_script
from feedbackalign import builders, configuration, run_summary, stats, task
from feedbackalign.configuration import compose
from feedbackalign.errors import SettingWarning
from helpers import REPO, make_trainer

TUNING = sorted((REPO / "config" / "tuning").glob("*.yaml"))


# ---------------------------------------------------------------- per-model, per-loss settings


@pytest.mark.parametrize("path", TUNING, ids=lambda p: p.stem)
def test_each_tuning_file_names_a_model_and_a_loss_and_sets_existing_keys(path):
    model, loss = path.stem.split("_", 1)
    assert model in configuration.group_options("model") and loss in configuration.group_options("loss")
    settings = OmegaConf.load(path)
    cfg = compose([f"model={model}", f"loss={loss}"])
    for key in configuration.all_keys(settings):
        assert configuration.has_key(cfg, key), f"{path.name} sets {key}, which {loss} has not"
        if not isinstance(OmegaConf.select(settings, key), type(settings)):
            assert OmegaConf.select(cfg, key) == OmegaConf.select(settings, key)


def test_tuning_applies_by_model_and_loss_and_the_command_line_wins(tmp_path):
    dpo = compose(["loss=dpo"])
    assert (dpo.lr, dpo.model.lr, dpo.loss.beta, dpo.warmup_steps) == (5e-5, 5e-5, 0.5, 5)
    assert compose(["loss=sft"]).lr == 1e-3                                   # SFT: the model's own lr
    big = compose(["loss=dpo", "model=mistral7b"])                            # no tuning file: the yaml defaults
    assert (big.lr, big.loss.beta) == (5e-7, 0.1)
    mine = compose(["loss=dpo", "loss.beta=0.1", "model.lr=2e-4"])
    assert (mine.lr, mine.loss.beta) == (2e-4, 0.1)
    assert compose(["loss=dpo", "lr=3e-4"]).lr == 3e-4
    assert compose(["loss=dpo", "~tuning"]).loss.beta == 0.1


def test_alignment_from_a_random_init_warns_once(tmp_path):
    with pytest.warns(SettingWarning, match="loss=nca aligns a model but starts from model=tiny's random init") as got:
        make_trainer(tmp_path / "a", "loss=nca")
    assert len([w for w in got if issubclass(w.category, SettingWarning)]) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = make_trainer(tmp_path / "b", "loss=sft", "n_examples=8", "n_eval_examples=0")
        start.train()
        make_trainer(tmp_path / "c", "loss=nca", f"model.load_from={start.run_dir / 'LATEST' / 'policy.pt'}")
        make_trainer(tmp_path / "d", "loss=dpo", "model=mistral7b", "model.name_or_path=random",
                     "model.architecture=tiny", "model.tokenizer_name_or_path=tiny", "model.policy_dtype=float32",
                     "model.reference_dtype=float32", "model.attn_implementation=sdpa")
    ours = [str(w.message) for w in caught if issubclass(w.category, SettingWarning)]
    assert ours == ["loss=dpo aligns a model but starts from model=mistral7b's random init (model.load_from is not "
                    "set): train SFT first (python train.py loss=sft) and pass model.load_from=<that run>/LATEST/"
                    "policy.pt"]


# ---------------------------------------------------------------- the run's summary


def test_the_summary_is_the_metrics_log_in_short(tmp_path):
    """Train metrics: the mean of the last steps of metrics.jsonl; held-out: a final evaluation after the last
    step (eval_every does not divide the run); paths that exist; written to summary.json as returned."""
    trainer = make_trainer(tmp_path, "loss=dpo", "n_examples=24", "eval_every=16", "export_hf=true")
    summary = trainer.train()
    records = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 3]      # step 2 (every 16 examples) and the end
    assert summary["steps"] == 3 and summary["train_steps_averaged"] == 3
    assert summary["train"]["loss"] == pytest.approx(sum(r["loss"] for r in steps) / 3)
    assert summary["eval"]["rewards/accuracies"] == pytest.approx(records[-1]["eval/rewards/accuracies"])
    tokens = sum(r["tokens/s"] * r["s/step"] for r in steps)
    assert summary["tokens_per_s"] == pytest.approx(tokens / sum(r["s/step"] for r in steps))
    assert summary["wall_s"] > summary["step_s"] > 0
    assert json.loads((trainer.run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for key in ("metrics", "latest", "policy", "hf"):
        assert (trainer.run_dir / summary["paths"][key]).exists(), key
    text = run_summary.render(summary)
    assert f"model.load_from={summary['paths']['policy']}" in text and "held-out (8 examples): loss" in text
    assert text.splitlines()[0].startswith("run dpo_tiny (loss=dpo, model=tiny, seed 0): 3 steps, 24 examples")


# ---------------------------------------------------------------- the defaults raise the true reward


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    """An SFT checkpoint of the tiny model that solves part of the task (~7/10 greedy): 150 steps of 16."""
    root = tmp_path_factory.mktemp("sft")
    cfg = compose(["loss=sft", f"cache_dir={root}", "exp_name=sft", "n_examples=2400", "model.batch_size=16",
                   "n_eval_examples=0", "export_hf=false"])
    builders.build_trainer(cfg, 0, 1, torch.device("cpu")).train()
    return root / "sft" / "LATEST" / "policy.pt"


EVAL_PROMPTS = 1000   # held-out prompts: the paired gain's 95% half-width is ~0.24 points at 1000, ~0.45 at 200


def true_rewards(run_dir, out_dir) -> dict[str, float]:
    """eval.py's samples of EVAL_PROMPTS test prompts (temperature 1, as the demo) scored by the true reward."""
    assert eval_script.main([f"--config-path={run_dir}", f"++samples_dir={out_dir}", f"++n_samples={EVAL_PROMPTS}",
                             f"++dataset_options.wordsort.n_prompts={EVAL_PROMPTS}", "++temperature=1.0",
                             "++max_new_tokens=24", "++model.eval_batch_size=100"]) == 0
    samples = json.loads((out_dir / f"{run_dir.name}.json").read_text())["samples"]
    return dict(zip((s["id"] for s in samples), task.score_samples(samples)))


def paired_gain(after: dict, before: dict) -> tuple[float, float, float]:
    return stats.mean_ci([after[i] - before[i] for i in before])


def test_dpo_with_no_settings_raises_the_true_reward(sft_policy, tmp_path):
    """The issue's command, `python train.py loss=dpo model.load_from=<SFT>/LATEST/policy.pt`, on a short run
    (plus where to write and how long): the tiny model's DPO settings come from config/tuning/tiny_dpo.yaml and
    raise the mean true reward over the SFT model on 1000 held-out prompts (measured: +0.82, 95% CI +0.59 to
    +1.06; +0.44 with fused AdamW's rounding: a short run's gain moves with the CPU's arithmetic, so the test asks
    for the sign and leaves the interval to the contrast); the same
    run with the old defaults (the model's SFT lr 1e-3, beta 0.1) is worse, its paired interval against the
    default run entirely below zero (it wrecks the model while its logged accuracy looks fine)."""
    def dpo(name, *overrides):
        cfg = compose(["loss=dpo", f"model.load_from={sft_policy}", f"cache_dir={tmp_path}", f"exp_name={name}",
                       "n_examples=960", "n_eval_examples=0", "export_hf=false", *overrides])
        builders.build_trainer(cfg, 0, 1, torch.device("cpu")).train()
        return cfg

    tuned_cfg = dpo("dpo")
    assert (tuned_cfg.lr, tuned_cfg.loss.beta) == (5e-5, 0.5)
    dpo("old_defaults", "lr=1e-3", "loss.beta=0.1")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.yaml").write_text(OmegaConf.to_yaml(compose(["loss=sft", "exp_name=sft"])))
    (tmp_path / "sft" / "LATEST").symlink_to(sft_policy.parent)
    sft, tuned, old = (true_rewards(tmp_path / name, tmp_path) for name in ("sft", "dpo", "old_defaults"))
    gain, low, high = paired_gain(tuned, sft)
    assert len(sft) == EVAL_PROMPTS and math.isfinite(gain)
    assert gain > 0, f"DPO with the default settings: gain {gain:+.2f} ({low:+.2f} to {high:+.2f})"
    worse, low, high = paired_gain(old, tuned)
    assert high < 0, f"the old defaults against the tuned ones: {worse:+.2f} ({low:+.2f} to {high:+.2f})"
