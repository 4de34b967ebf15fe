"""The online loop's support (loop.py runs it): where each round's files live, the configurations of its stages,
the per-round record `rounds.jsonl`, the reward measured after each round, and its plot.

Layout of `<cache_dir>/<exp_name>/`:

    loop_config.yaml            the loop's resolved configuration (a rerun must match it, except `rounds`)
    rounds.jsonl                one line per finished round (round 0 is the starting model, evaluated only)
    rounds.png                  the reward per round
    round-<i>/samples.json      K responses per training prompt from the round's starting policy (eval.py)
    round-<i>/feedback.jsonl    their labels, generic JSONL schema (label.py), appended per prompt
    round-<i>/run/              the round's train.py run directory (LATEST/policy.pt is the next round's start)
    round-<i>/eval_samples.json the trained policy's answers to the held-out prompts (the same every round)
    round-<i>/judge.jsonl       labeler=judge: compare.py's results against round 0's answers
    round-<i>/done/<stage>.json a finished stage whose output is not complete by itself (labelling, training);
                                a round whose labels give the loss no training batch (e.g. DPO when every answer
                                ties) is recorded as not trained, and the next round starts from the same policy

Every file is written whole (atomic replace) or appended line by line with fsync, so a loop killed at any point
reruns only the stage it was in: sampling again (deterministic from the seed), labelling the missing prompts,
training from its last checkpoint (train.py's resume), evaluating again.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf, open_dict

import compare
from feedbackalign import builders, task
from feedbackalign.configuration import CONFIG_DIR
from feedbackalign.errors import ConfigError
from feedbackalign.fileio import write_json_atomic
from feedbackalign.stats import mean_ci

LOOP_CONFIG = "loop"   # config/loop.yaml: config.yaml plus the loop's keys
REFERENCES = ("round", "start")
ROUND_RECORDS = compare.RecordKind("loop.py", "exp_name", lambda record: isinstance(record.get("round"), int))
METRICS = {"true_reward": "mean true reward (0-10)", "rm_score": "mean reward-model score",
           "judge_win_rate": "judge win rate against round 0"}
UNCHECKED = ("rounds", "resume", "overwrite")   # keys a rerun may change without mixing two experiments
# What each labeler writes, and what each batch layout can be made of (feedbackalign/feedback.py's converters)
GIVES = {"task": {"scores", "judgments"}, "rm": {"scores"}, "judge:scores": {"scores"}, "judge:pairs": {"pairs"},
         "judge:judgments": {"judgments"}}
NEEDS = {"pairs": {"scores", "pairs"}, "groups": {"scores", "pairs"}, "judged": {"judgments"},
         "unpaired": {"scores", "pairs", "judgments"}, "sft": {"scores", "pairs", "judgments"},
         "conditional_sft": {"scores", "pairs", "judgments"}}


def loop_keys() -> list[str]:
    """The keys loop.yaml adds to config.yaml (what a round's train.py configuration leaves out)."""
    own = OmegaConf.load(CONFIG_DIR / f"{LOOP_CONFIG}.yaml")
    base = OmegaConf.load(CONFIG_DIR / "config.yaml")
    return [k for k in own if k != "defaults" and k not in base]


def train_config(cfg: DictConfig) -> DictConfig:
    """The loop configuration without the loop's keys: what train.py would have composed."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key in loop_keys():
            out.pop(key, None)
    return out


def check_loop_settings(cfg: DictConfig) -> None:
    """Reject loop values that cannot run, naming the key."""
    rules = [("rounds", isinstance(cfg.rounds, int) and cfg.rounds >= 0, "an integer >= 0"),
             ("labeler", cfg.labeler in ("task", "rm", "judge"), "task, rm or judge"),
             ("reference", cfg.reference in REFERENCES, "round or start"),
             ("prompts_per_round", isinstance(cfg.prompts_per_round, int) and cfg.prompts_per_round > 0,
              "a positive integer"),
             ("n_responses", isinstance(cfg.n_responses, int) and cfg.n_responses > 0, "a positive integer"),
             ("eval_prompts", isinstance(cfg.eval_prompts, int) and cfg.eval_prompts > 0, "a positive integer"),
             ("temperature", isinstance(cfg.temperature, (int, float)) and (cfg.temperature > 0 or cfg.n_responses == 1),
              "a number > 0 (n_responses > 1 needs different responses)"),
             ("reward_model", cfg.labeler != "rm" or bool(cfg.reward_model),
              "a loss=rm run directory or a sequence classifier (labeler=rm needs one)")]
    for key, ok, valid in rules:
        if not ok:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} is not valid for loop.py: use {valid}")
    labeler = f"judge:{cfg.judge.mode}" if cfg.labeler == "judge" else cfg.labeler
    if labeler not in GIVES:
        raise ConfigError(f"judge.mode={cfg.judge.mode} is not valid for loop.py: use scores, pairs or judgments")
    kind = builders.trainer_class(cfg).batch_kind
    if not GIVES[labeler] & NEEDS[kind]:
        fitting = [name.replace(":", " judge.mode=") for name, gives in GIVES.items() if gives & NEEDS[kind]]
        raise ConfigError(f"loss={cfg.loss.name} trains on {' or '.join(sorted(NEEDS[kind]))} and labeler="
                          f"{labeler.replace(':', ' judge.mode=')} gives {', '.join(sorted(GIVES[labeler]))}: use "
                          f"labeler={' or labeler='.join(fitting)}")


@dataclass(frozen=True)
class Layout:
    """Paths of a loop directory (module docstring)."""

    root: Path

    @property
    def rounds_log(self) -> Path:
        return self.root / "rounds.jsonl"

    @property
    def plot(self) -> Path:
        return self.root / "rounds.png"

    @property
    def settings(self) -> Path:
        return self.root / "loop_config.yaml"

    def round(self, i: int) -> Path:
        return self.root / f"round-{i}"

    def samples(self, i: int) -> Path:
        return self.round(i) / "samples.json"

    def feedback(self, i: int) -> Path:
        return self.round(i) / "feedback.jsonl"

    def run(self, i: int) -> Path:
        return self.round(i) / "run"

    def eval_samples(self, i: int) -> Path:
        return self.round(i) / "eval_samples.json"

    def judge_results(self, i: int) -> Path:
        return self.round(i) / "judge.jsonl"

    def done(self, i: int, stage: str) -> Path:
        return self.round(i) / "done" / f"{stage}.json"

    def trained(self, i: int) -> bool:
        """Whether round i's training ran (a round whose labels give the loss no batch is not trained)."""
        done = self.done(i, "train")
        return not done.is_file() or json.loads(done.read_text(encoding="utf-8")).get("trained", True)

    def policy(self, i: int, start: str | None) -> str | None:
        """The policy after round i: round 0 is the starting weights (model.load_from; None: the base model); a
        round that was not trained keeps the policy it started from."""
        if i == 0:
            return start
        return str(self.run(i) / "LATEST" / "policy.pt") if self.trained(i) else self.policy(i - 1, start)


def comparable(cfg: DictConfig) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in resolved.items() if k not in UNCHECKED}


def claim(layout: Layout, cfg: DictConfig) -> None:
    """Start a loop directory, or check that a rerun has the settings it was started with."""
    if layout.settings.is_file():
        saved = comparable(OmegaConf.load(layout.settings))
        now = comparable(cfg)
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            raise ConfigError(f"{layout.root} was started with other settings ({', '.join(changed)} differ): rerun "
                              "with the same ones to resume, pick another exp_name, or overwrite=true to start over")
        return
    if layout.root.exists() and any(layout.root.iterdir()):
        raise ConfigError(f"{layout.root} exists and is not a loop directory (no loop_config.yaml): pick another "
                          "exp_name or overwrite=true")
    layout.root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=layout.root, suffix=".yaml")
    os.close(fd)
    OmegaConf.save(cfg, tmp, resolve=True)
    os.replace(tmp, layout.settings)


# ---------------------------------------------------------------- the stages' configurations


def with_keys(cfg: DictConfig, values: dict) -> DictConfig:
    """A copy of `cfg` with `values` set (dotted keys allowed), new keys included."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in values.items():
            OmegaConf.update(out, key, value, force_add=True, merge=False)
    return out


def sampling_config(cfg: DictConfig, eval_defaults: dict, *, policy: str | None, split: str, n_prompts: int,
                    n_responses: int, seed: int) -> DictConfig:
    """eval.py's configuration to sample `policy`: its run's save_pretrained export when the round wrote one
    (export_hf=true: vLLM can load it), else checkpoint=base, the model with model.load_from=policy."""
    export = Path(policy).parent / "hf" if policy else None
    checkpoint = str(export) if export is not None and (export / "config.json").is_file() else "base"
    keys = {**eval_defaults, "mode": "sample", "checkpoint": checkpoint, "split": split, "n_samples": n_prompts,
            "n_responses": n_responses, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "seed": seed, "model.load_from": policy}
    return with_keys(train_config(cfg), keys)


def round_train_config(cfg: DictConfig, layout: Layout, i: int, start: str | None, resume: bool) -> DictConfig:
    """train.py's configuration of round i: the round's feedback file, from round i-1's policy, with the
    reference `cfg.reference` names, run dir round-i/run, no held-out split (the loop evaluates)."""
    feedback = f"jsonl:{layout.feedback(i).resolve()}"
    reference = None if cfg.reference == "round" else (start or "base")
    options = OmegaConf.to_container(cfg.dataset_options, resolve=True) if cfg.dataset_options else {}
    options[feedback] = {"test_fraction": 0.0}
    return with_keys(train_config(cfg), {
        "exp_name": "run", "cache_dir": str(layout.round(i).resolve()), "datasets": [feedback],
        "dataset_options": options, "reference_cache_dir": str(Path(cfg.reference_cache_dir).resolve()),
        "n_eval_examples": 0, "model.load_from": layout.policy(i - 1, start),
        "model.reference_load_from": reference, "resume": True if resume else None, "overwrite": not resume})


# ---------------------------------------------------------------- rounds.jsonl, metrics, the plot


def read_rounds(layout: Layout) -> dict[int, dict]:
    """The finished rounds' records by round (a torn last line ignored)."""
    return {r["round"]: r for r in compare.read_results(layout.rounds_log, ROUND_RECORDS)}


def append_round(layout: Layout, record: dict) -> None:
    log = compare.ResultsLog(layout.rounds_log, ROUND_RECORDS)
    try:
        log.append({"id": f"round-{record['round']}", **record})
    finally:
        log.close()


def true_reward(samples: list[dict]) -> dict:
    """Mean true reward of the answers with its 95% interval, when every prompt is the built-in task's."""
    if not samples or any(s.get("dataset") != task.DATASET_NAME for s in samples):
        return {}
    mean, low, high = mean_ci(task.score_samples(samples))
    return {"true_reward": mean, "true_reward_ci95": [low, high]}


def plot_rounds(records: dict[int, dict], path: Path, title: str) -> None:
    """Each metric the rounds have, per round, with its 95% interval where known; written aside, then renamed."""
    metrics = [m for m in METRICS if any(m in r for r in records.values())]
    fig = Figure(figsize=(4.5 * max(1, len(metrics)), 3.4))
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        rounds = sorted(i for i, r in records.items() if r.get(metric) is not None)
        values = [records[i][metric] for i in rounds]
        ci = [records[i].get(f"{metric}_ci95") for i in rounds]
        if all(c is not None for c in ci) and ci:
            errors = [[v - c[0] for v, c in zip(values, ci)], [c[1] - v for v, c in zip(values, ci)]]
            ax.errorbar(rounds, values, yerr=errors, marker="o", capsize=3, label="mean, 95% CI")
        else:
            ax.plot(rounds, values, marker="o", label="mean")
        ax.set_xticks(rounds)
        ax.set_xlabel("round (0 = the starting model)")
        ax.set_ylabel(METRICS[metric])
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def mark_done(layout: Layout, i: int, stage: str, info: dict) -> None:
    write_json_atomic(layout.done(i, stage), info)
