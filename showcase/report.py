"""The demo report: true-reward table, win rates against the SFT model, held-out chosen log-likelihood, plots.

    python report.py demo_out          # rebuild demo_out/report/ from the demo's manifest and files

Reads `<out>/manifest.json` (written by demo.py: run directories, samples files, settings, stage timings) and
writes `<out>/report/`: report.md (the table), results.json, training_curves.png, chosen_logp.png and
true_reward.png; with online loops (loop.py) also online.json and online_rounds.png. The folder is built aside and swapped in, so a failure never leaves a half-written report.

Statistics (per loss, over the same held-out prompts as the SFT model):
- mean true reward (task.true_reward, 0-10) with a 95% normal interval, mean +- 1.96 s / sqrt(n);
- the gain over SFT: the same interval over the per-prompt differences (a paired comparison); "higher" or
  "lower" when it excludes zero;
- win / tie / loss against the SFT model, prompt by prompt by true reward; the win rate's 95% interval is
  Wilson's (Wilson 1927), over all n prompts with ties counted apart (neither win nor loss);
- held-out chosen log-likelihood: mean log p(best response | prompt), summed over response tokens, on test
  prompts, minus the SFT model's: the quantity of the NCA paper's Figure 2 (Chen et al. 2024), which DPO
  lowers and NCA keeps up.
- online loops: each round's mean true reward on the same held-out prompts (from rounds.jsonl), and the last
  round's paired gain over SFT, computed as for the offline runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf

import dataloader
from feedbackalign import builders, checkpoints, models, online, task
from feedbackalign.errors import DataError
from feedbackalign.fileio import make_temporary_folder
from feedbackalign.logprobs import sequence_logps
from feedbackalign.stats import mean_ci, wilson_interval

BASELINE = "sft"


# ---------------------------------------------------------------- statistics


def win_tie_loss(candidate: dict[str, float], baseline: dict[str, float]) -> tuple[int, int, int]:
    """Per prompt (matched by sample id): candidate reward above / equal to / below the baseline's."""
    common = sorted(set(candidate) & set(baseline))
    if not common or len(common) != len(candidate) or len(common) != len(baseline):
        raise DataError(f"win rate: the samples files share {len(common)} of {len(candidate)} / {len(baseline)} "
                        "prompts; sample every model with the same seed and n_samples")
    wins = sum(candidate[i] > baseline[i] for i in common)
    losses = sum(candidate[i] < baseline[i] for i in common)
    return wins, len(common) - wins - losses, losses


def verdict(low: float, high: float) -> str:
    """Whether a paired 95% interval of reward differences excludes zero."""
    return "higher" if low > 0 else "lower" if high < 0 else "no clear change"


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average (bias-corrected), for readable training curves."""
    out, acc = [], 0.0
    for t, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** t))
    return out


# ---------------------------------------------------------------- reading the demo's files


def read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist; run `python demo.py` first (it writes it)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {path} is not valid JSON ({e}); rerun `python demo.py`") from None


def true_rewards(samples_path: Path) -> dict[str, float]:
    """sample id -> true reward of the policy output (task.score_samples)."""
    samples = read_json(samples_path, "samples file")["samples"]
    return dict(zip((s["id"] for s in samples), task.score_samples(samples)))


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (one per step, eval records included)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; the run did not finish: rerun `python demo.py`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, where the records have it."""
    pairs = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ---------------------------------------------------------------- held-out chosen log-likelihood


def heldout_chosen_logp(run_dir: Path, n_prompts: int) -> float:
    """Mean summed log p(best response | prompt) of the run's final policy on its first n test prompts."""
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    examples = [ex for ds in builders.load_datasets(cfg, "test") for ex in ds.examples][:n_prompts]
    tokenizer = models.load_tokenizer(cfg.model.tokenizer_name_or_path)
    model = models.build_model(cfg.model.name_or_path, torch.float32, attn_implementation=cfg.model.attn_implementation,
                               vocab_size=len(tokenizer))
    model.load_state_dict(checkpoints.load_policy_weights(checkpoints.latest_dir(run_dir) / "policy.pt"), strict=False)
    fmt = dataloader.PromptFormat.from_config(cfg.model)
    templated = dataloader.uses_chat_template(tokenizer)
    sequences = [dataloader.Sequence(
        dataloader.encode_prompt(tokenizer, dataloader.format_prompt(ex.prompt, tokenizer, fmt), not templated),
        dataloader.encode_response(tokenizer, ex.generations[max(range(len(ex.scores)), key=ex.scores.__getitem__)]))
        for ex in examples]
    with torch.no_grad():
        sums = sequence_logps(model.eval(), sequences, tokenizer.pad_token_id, "padded").sums
    return float(sums.mean())


# ---------------------------------------------------------------- results


def loss_results(name: str, rewards: dict[str, float], base: dict[str, float]) -> dict:
    mean, low, high = mean_ci(list(rewards.values()))
    wins, ties, losses = win_tie_loss(rewards, base)
    n = wins + ties + losses
    gain, gain_low, gain_high = mean_ci([rewards[i] - base[i] for i in sorted(base)])
    return {"run": name, "n": n, "reward": mean, "reward_ci95": [low, high], "gain": gain,
            "gain_ci95": [gain_low, gain_high], "verdict": verdict(gain_low, gain_high),
            "perfect": sum(r == 10.0 for r in rewards.values()) / n,
            "win": wins / n, "tie": ties / n, "lose": losses / n, "win_ci95": list(wilson_interval(wins, n))}


def judge_summary(out: Path, name: str):
    """compare.py's summary for this loss against SFT, where the demo ran the judge."""
    path = out / "judge" / f"{name}.jsonl.summary.json"
    return read_json(path, "judge summary") if path.is_file() else None


def collect(out: Path, manifest: dict) -> list[dict]:
    """One result row per model (SFT first): true reward, wins against SFT, held-out chosen log-likelihood."""
    samples = {name: out / path for name, path in manifest["samples"].items()}
    base = true_rewards(samples[BASELINE])
    n_logp = manifest["settings"]["n_logp_prompts"]
    rows = []
    for name in manifest["runs"]:
        row = loss_results(name, true_rewards(samples[name]), base)
        row["chosen_logp"] = heldout_chosen_logp(out / manifest["runs"][name], n_logp)
        row["train_cpu_s"] = manifest["timings"].get(f"train {name}", {}).get("cpu")
        row["judge"] = judge_summary(out, name) if manifest.get("judge") else None
        rows.append(row)
    sft_logp = rows[0]["chosen_logp"]   # manifest["runs"] lists SFT first
    for row in rows:
        row["chosen_logp_change"] = row["chosen_logp"] - sft_logp
    return rows


# ---------------------------------------------------------------- the table


def _pct(x) -> str:
    return f"{100 * x:.0f}%"


def table(rows: list[dict]) -> str:
    """The markdown results table, one row per model (SFT first)."""
    judged = any(r["judge"] for r in rows)
    head = ["run", "true reward (95% CI)", "gain over SFT, paired (95% CI)", "perfect", "win / tie / loss vs SFT",
            "win rate 95% CI", "Δ held-out log p(chosen)"] + (["judge win / tie / loss"] if judged else [])
    lines = ["| " + " | ".join(head + ["train CPU s"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        low, high = r["reward_ci95"]
        base = r["run"] == BASELINE
        cells = [r["run"], f"{r['reward']:.2f} ({low:.2f}-{high:.2f})",
                 "—" if base else f"{r['gain']:+.2f} ({r['gain_ci95'][0]:+.2f} to {r['gain_ci95'][1]:+.2f}) "
                                  f"{r['verdict']}", _pct(r["perfect"]),
                 "—" if base else f"{_pct(r['win'])} / {_pct(r['tie'])} / {_pct(r['lose'])}",
                 "—" if base else f"{_pct(r['win_ci95'][0])}-{_pct(r['win_ci95'][1])}",
                 f"{r['chosen_logp']:.2f} (SFT)" if base else f"{r['chosen_logp_change']:+.2f}"]
        if judged:
            j = r["judge"]
            cells.append(f"{_pct(j['win']['rate'])} / {_pct(j['tie']['rate'])} / {_pct(j['loss']['rate'])}"
                         if j and j["decided"] else "—")
        cells.append("—" if r["train_cpu_s"] is None else f"{r['train_cpu_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LOSS_NAMING = ("name", "trainer", "dataloader", "data")   # loss config keys that are not hyper-parameters
TUNING_NOTE = (
    "The settings are the tiny model's defaults in `config/tuning/tiny_<loss>.yaml` (each file says how its values "
    "were chosen), and they are not equally tuned: more than one learning rate was tried for DPO, InfoNCA and "
    "SimPO, and two betas for DPO and NCA (the beta0.1 runs); KTO's desirable weight follows the KTO paper; IPO "
    "and cDPO reuse DPO's lr, NCA-pair NCA's; CUT, SLiC and ORPO were not swept. The table compares these "
    "settings, not each loss at its best.")


def hyper_parameters(cfg) -> str:
    """The loss's own settings of a run (`beta 0.5, label_smoothing 0.0`)."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    return ", ".join(f"{k} {v}" for k, v in loss.items() if k not in LOSS_NAMING) or "—"


def settings_table(configs: dict, manifest: dict) -> str:
    """What each run trained with, read from its saved config.yaml, and the overrides the demo passed."""
    lines = ["| run | loss | lr | warmup steps | batch | examples | seed / init seed | loss settings | demo overrides |",
             "|" + "---|" * 9]
    for name, cfg in configs.items():
        extra = " ".join(manifest["overrides"].get(name, [])) or "—"
        lines.append(f"| {name} | {cfg.loss.name} | {cfg.lr:g} | {cfg.warmup_steps} | {cfg.model.batch_size} | "
                     f"{cfg.n_examples} | {cfg.seed} / {cfg.model.init_seed} | {hyper_parameters(cfg)} | {extra} |")
    return "\n".join(lines)


def seeds_text(configs: dict) -> str:
    seeds = sorted({int(cfg.seed) for cfg in configs.values()})
    return (f"One run per model, seed {', '.join(map(str, seeds))} (data order, sampling; init seed of the tiny "
            "model as listed): the 95% intervals above are over prompts, not over seeds or retuning, so neither a "
            "ranking of the losses nor a difference inside their intervals is a finding.")


TITLE = "feedbackalign demo: alignment losses on the built-in `wordsort` task"


def heading(settings: dict) -> list[str]:
    """The title; a --quick run's says SMOKE TEST, with why its numbers are not results (demo.SMOKE_TEST)."""
    if not settings["quick"]:
        return [f"# {TITLE}", ""]
    why = settings.get("smoke_test") or "--quick budgets are far too small to train; these numbers are not results."
    return [f"# SMOKE TEST (--quick): {TITLE}", "", f"**Smoke test: {why}**", ""]


def markdown(rows: list[dict], manifest: dict, sampling: dict, configs: dict) -> str:
    """report.md; `sampling` is the eval.py config the samples were drawn with, `configs` each run's config."""
    s = manifest["settings"]
    times = manifest["timings"].values()
    cpu = sum(t["cpu"] for t in times)
    wall = max(t["end"] for t in times) - min(t["start"] for t in times)
    judge = manifest.get("judge") or "not configured (set OPENAI_BASE_URL or pass --judge-url for judge win rates)"
    return "\n".join(heading(s) + [
        f"Machine: {manifest['machine']}. {'Quick' if s['quick'] else 'Full'} settings: {wall / 60:.1f} min wall "
        f"clock from the first stage's start to the last one's end, {cpu / 60:.1f} min of CPU time in all. Every "
        f"model answers the same {s['n_samples']} held-out test prompts (eval.py ++mode=sample, temperature "
        f"{sampling['temperature']}, top-p {sampling['top_p']}, at most {sampling['max_new_tokens']} new tokens); "
        "the true reward (0-10) scores each answer.",
        "",
        table(rows),
        "",
        "- true reward: mean with a 95% normal interval; perfect: share of answers with reward 10.",
        "- gain over SFT: mean per-prompt difference in true reward with its 95% interval; higher / lower when the "
        "interval excludes 0.",
        "- win / tie / loss: prompt by prompt against the SFT model's answer, by true reward; ties counted apart; "
        "win-rate interval: Wilson 95%.",
        f"- Δ held-out log p(chosen): mean summed log-probability of the best response on the first "
        f"{s['n_logp_prompts']} test prompts, minus the SFT model's (NCA paper, Figure 2: DPO lowers it, NCA keeps "
        "it); the training runs evaluate on the same prompts, so chosen_logp.png starts at the SFT value and "
        "ends at each run's.",
        f"- LLM judge: {judge}.",
        f"- {seeds_text(configs)}",
        "",
        "![training curves](training_curves.png)",
        "![held-out log p(chosen) and log p(rejected), DPO vs NCA](chosen_logp.png)",
        "![true reward](true_reward.png)",
        "",
        "## Settings",
        "",
        "Each alignment run starts from the SFT checkpoint (`model.load_from=<sft run>/LATEST/policy.pt`). "
        + TUNING_NOTE,
        "",
        settings_table(configs, manifest),
        "",
        "Score your own samples of the task: `python -m feedbackalign.task score <samples.json> ...` (eval.py "
        "++mode=sample writes them).",
        "",
        "## Stage timings (wall clock / CPU seconds)",
        "",
        "\n".join(f"- {stage}: {t['wall']:.0f} / {t['cpu']:.0f}" for stage, t in manifest["timings"].items()),
        "",
    ])


# ---------------------------------------------------------------- plots


def _figure(n_panels: int):
    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))  # no pyplot: files only, no display or global state
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_training_curves(metrics: dict[str, list[dict]], path: Path) -> Figure:
    """One panel per run: training loss (EMA-smoothed) and the held-out eval loss."""
    fig, axes = _figure(len(metrics))
    for ax, (name, records) in zip(axes, metrics.items()):
        steps, values = series(records, "loss")
        if steps:
            ax.plot(steps, values, color="0.8", lw=0.8, label="train (each step)")
            ax.plot(steps, ema(values), label="train (EMA 0.9)")
        steps, values = series(records, "eval/loss")
        if steps:
            ax.plot(steps, values, "o-", ms=3, label="held-out")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


FIGURE2 = (("dpo", "C0", "-"), ("nca", "C2", "-"), ("dpo-beta0.1", "C0", "--"), ("nca-beta0.1", "C2", "--"))


def plot_chosen_logp(metrics: dict[str, list[dict]], sft_logp: float, n_prompts: int, path: Path) -> Figure:
    """Held-out log p(chosen) and log p(rejected) over training, DPO versus NCA (the NCA paper's Figure 2), on the
    report's held-out prompts; the SFT model's log p(chosen) from the table is the labelled baseline."""
    fig, axes = _figure(2)
    for ax, side in zip(axes, ("chosen", "rejected")):
        for name, colour, style in FIGURE2:
            steps, values = series(metrics.get(name, []), f"eval/logps/{side}")
            if steps:
                ax.plot(steps, values, style, color=colour, marker="o", ms=3, label=name)
        if side == "chosen":
            ax.axhline(sft_logp, color="0.3", ls=":", lw=1, label="SFT model (table)")
        ax.set_title(f"held-out log p({side}), {n_prompts} test prompts", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("mean summed log-prob")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


VERDICT_COLOURS = {"higher": "C2", "no clear change": "C0", "lower": "C3"}


def plot_true_reward(rows: list[dict], path: Path) -> Figure:
    """Mean true reward per model with its 95% interval on the full 0-10 scale; the SFT baseline as a labelled
    grey bar and line; colours (in the legend) by whether the paired gain over SFT is clearly positive / negative."""
    from matplotlib.patches import Patch

    fig = Figure(figsize=(max(5.0, 0.6 * len(rows) + 2.5), 3.8))
    ax = fig.subplots()
    names = [r["run"] for r in rows]
    means = [r["reward"] for r in rows]
    errors = [[r["reward"] - r["reward_ci95"][0] for r in rows], [r["reward_ci95"][1] - r["reward"] for r in rows]]
    ax.bar(names, means, yerr=errors, capsize=3,
           color=["0.6"] + [VERDICT_COLOURS[r["verdict"]] for r in rows[1:]])
    ax.axhline(rows[0]["reward"], color="0.3", ls=":", lw=1)
    ax.set_ylim(0, 10)
    ax.set_ylabel("mean true reward (0-10)")
    ax.set_title(f"true reward on {rows[0]['n']} held-out prompts (bars: 95% CI)", fontsize=9)
    ax.tick_params(axis="x", labelrotation=40)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    handles = [Patch(color="0.6", label=f"{BASELINE} (baseline); dotted line: its level")]
    handles += [Patch(color=c, label=f"gain over {BASELINE}: {v}") for v, c in VERDICT_COLOURS.items()]
    ax.legend(handles=handles, fontsize=7, loc="lower left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------- the online loops


def collect_online(out: Path, manifest: dict, base: dict[str, float]) -> list[dict]:
    """Per online loop (loop.py): its rounds' records and its last round's answers against SFT's."""
    rows = []
    for name, info in manifest.get("online", {}).items():
        layout = online.Layout(out / info["dir"])
        records = online.read_rounds(layout)
        if not records:
            raise DataError(f"{layout.rounds_log} has no finished round; rerun `python -m showcase.demo` (loops resume)")
        last = max(records)
        rows.append({"run": name, "loss": info["loss"], "rounds": [records[i] for i in sorted(records)],
                     "final": loss_results(name, true_rewards(layout.eval_samples(last)), base),
                     "cpu_s": manifest["timings"].get(f"online {name}", {}).get("cpu")})
    return rows


def online_table(rows: list[dict], offline: list[dict]) -> str:
    """Markdown: true reward per round (95% CI), the last round's paired gain over SFT, the offline run."""
    n_rounds = max(len(r["rounds"]) for r in rows)
    offline_reward = {r["run"]: r["reward"] for r in offline}
    head = ["online run"] + [f"round {i}" + (" (SFT)" if i == 0 else "") for i in range(n_rounds)] + \
        ["gain over SFT after the last round, paired (95% CI)", "offline run (same loss)", "prompts labelled",
         "CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"]]
        for i in range(n_rounds):
            rec = r["rounds"][i] if i < len(r["rounds"]) else None
            cells.append("—" if rec is None else f"{rec['true_reward']:.2f} ({rec['true_reward_ci95'][0]:.2f}-"
                                                 f"{rec['true_reward_ci95'][1]:.2f})")
        f = r["final"]
        cells.append(f"{f['gain']:+.2f} ({f['gain_ci95'][0]:+.2f} to {f['gain_ci95'][1]:+.2f}) {f['verdict']}")
        cells.append(f"{r['loss']} {offline_reward[r['loss']]:.2f}" if r["loss"] in offline_reward else "—")
        cells.append(str(sum(rec.get("items", 0) for rec in r["rounds"])))
        cells.append("—" if r["cpu_s"] is None else f"{r['cpu_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def online_markdown(rows: list[dict], offline: list[dict], manifest: dict) -> str:
    s = manifest["settings"]
    return "\n".join([
        "",
        "## Online: rounds of the model's own samples, labelled by the task",
        "",
        f"Each loop (`loop.py ... labeler=task`) starts from the SFT checkpoint. A round samples "
        f"{s['online_k']} answers to each of {s['online_prompts']} fresh training prompts from the current policy, "
        f"labels them with the task's true reward and critiques, trains {s['online_epochs']} pass(es) over them "
        f"(batches of {s['online_batch_size']}) with the loss (the offline run's settings, its reference the round's "
        "starting policy) from the previous "
        f"round's policy, then answers the same {s['n_samples']} held-out prompts as the table above; round 0 is "
        "the SFT model's answers.",
        "",
        online_table(rows, offline),
        "",
        "![true reward per online round](online_rounds.png)",
        "",
    ])


def plot_online(rows: list[dict], offline: list[dict], path: Path) -> None:
    """True reward per round (95% CI) of each online loop; its loss's offline run as a dashed line of the same
    colour, the SFT model as a dotted grey one."""
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.subplots()
    offline_reward = {r["run"]: r["reward"] for r in offline}
    for k, r in enumerate(rows):
        colour = f"C{k}"
        rounds = [rec["round"] for rec in r["rounds"]]
        means = [rec["true_reward"] for rec in r["rounds"]]
        errors = [[m - rec["true_reward_ci95"][0] for m, rec in zip(means, r["rounds"])],
                  [rec["true_reward_ci95"][1] - m for m, rec in zip(means, r["rounds"])]]
        ax.errorbar(rounds, means, yerr=errors, marker="o", capsize=3, color=colour, label=r["run"])
        if r["loss"] in offline_reward:
            ax.axhline(offline_reward[r["loss"]], color=colour, ls="--", lw=1, label=f"{r['loss']} (offline)")
    ax.axhline(offline[0]["reward"], color="0.4", ls=":", lw=1, label="SFT")
    ax.set_xticks(sorted({rec["round"] for r in rows for rec in r["rounds"]}))
    ax.set_xlabel("round (0 = the SFT model)")
    ax.set_ylabel("mean true reward (0-10), 95% CI")
    ax.set_title("online loops: true reward on held-out prompts per round")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- writing


def build(out: Path) -> Path:
    """Write `<out>/report/` from the demo's manifest; returns the report.md path."""
    out = Path(out)
    manifest = read_json(out / "manifest.json", "demo manifest")
    rows = collect(out, manifest)
    metrics = {name: read_metrics(out / run) for name, run in manifest["runs"].items()}
    configs = {name: OmegaConf.load(out / run / "config.yaml") for name, run in manifest["runs"].items()}
    tmp = make_temporary_folder(out, ".report.")
    try:
        sampling = read_json(out / manifest["samples"][BASELINE], "samples file")["config"]
        online_rows = collect_online(out, manifest, true_rewards(out / manifest["samples"][BASELINE]))
        text = markdown(rows, manifest, sampling, configs)
        if online_rows:
            text += online_markdown(online_rows, rows, manifest)
            (tmp / "online.json").write_text(json.dumps(online_rows, indent=2) + "\n", encoding="utf-8")
            plot_online(online_rows, rows, tmp / "online_rounds.png")
        (tmp / "report.md").write_text(text, encoding="utf-8")
        (tmp / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        plot_training_curves(metrics, tmp / "training_curves.png")
        plot_chosen_logp(metrics, rows[0]["chosen_logp"], manifest["settings"]["n_logp_prompts"],
                         tmp / "chosen_logp.png")
        plot_true_reward(rows, tmp / "true_reward.png")
        swap_in(tmp, out / "report")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report" / "report.md"


def swap_in(new: Path, final: Path) -> None:
    """Replace directory `final` by `new`, never leaving a missing or half-written `final` for longer than a rename."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python report.py <demo output folder, e.g. demo_out>", file=sys.stderr)
        return 2
    try:
        path = build(Path(argv[0]))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
