"""A finished run in a few lines: what train.py prints last, also written to <run_dir>/summary.json.

- train: the loss's metrics averaged over the last WINDOW optimizer steps (one step of a small batch is noisy);
- held-out: the evaluation after the last step (BasicTrainer.train evaluates the final weights);
- wall time: the whole `train()` call of this process (evaluations and checkpoints included); tokens/s: every
  sequence token the steps forwarded (throughput.Meter's count) over the seconds spent in steps;
- paths: metrics.jsonl, LATEST (policy.pt, loadable with model.load_from) and the save_pretrained export.

On several processes the step metrics are already reduced over ranks (every rank holds the same values, tokens/s
summed over ranks), so each rank can build the summary; rank 0 prints it and writes summary.json.
"""

from __future__ import annotations

import math
import os
from collections import deque
from pathlib import Path

from feedbackalign.throughput import TIMING_METRICS

FILE = "summary.json"
WINDOW = 10
BOOKKEEPING = ("lr", "grad_norm", "skipped_steps", "padding_fraction")   # per-step values that are not the loss's


class Window:
    """The loss metrics of the last `size` steps, and the totals of every step: tokens forwarded, seconds."""

    def __init__(self, size: int = WINDOW):
        self.recent: deque[dict[str, float]] = deque(maxlen=size)
        self.tokens = 0.0
        self.seconds = 0.0

    def add(self, metrics: dict[str, float]) -> None:
        self.recent.append({k: v for k, v in metrics.items() if k not in TIMING_METRICS + BOOKKEEPING})
        self.tokens += metrics["tokens/s"] * metrics["s/step"]
        self.seconds += metrics["s/step"]

    def means(self) -> dict[str, float]:
        """Each metric's mean over the window's steps where it is finite."""
        out = {}
        for key in dict.fromkeys(k for record in self.recent for k in record):
            values = [r[key] for r in self.recent if key in r and math.isfinite(r[key])]
            if values:
                out[key] = sum(values) / len(values)
        return out


def summarize(cfg, run_dir: Path, *, steps: int, examples: int, window: Window, evaluated: dict[str, float],
              eval_examples: int, seconds: float, skipped_steps: int) -> dict:
    """The summary of a run that just finished (JSON-ready)."""
    run_dir = Path(run_dir).absolute()
    latest = run_dir / "LATEST"
    return {
        "exp_name": cfg.exp_name, "loss": cfg.loss.name, "model": cfg.model.name, "seed": cfg.seed,
        "steps": steps, "examples": examples, "skipped_steps": skipped_steps,
        "wall_s": seconds, "step_s": window.seconds,
        "tokens_per_s": window.tokens / window.seconds if window.seconds else None,
        "train": window.means(), "train_steps_averaged": len(window.recent),
        "eval": {k.removeprefix("eval/"): v for k, v in evaluated.items()}, "eval_examples": eval_examples,
        "paths": {"metrics": str(run_dir / "metrics.jsonl"), "latest": str(latest),
                  "policy": str(latest / "policy.pt"),
                  "hf": str(latest / "hf") if cfg.export_hf and (latest / "hf").is_dir() else None},
    }


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def shown(path: str | None) -> str:
    """A path relative to the working directory when it lies below it, else absolute."""
    if path is None:
        return "none (export_hf=false)"
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def metric_text(metrics: dict[str, float]) -> str:
    ordered = sorted(metrics, key=lambda k: (k != "loss", k))
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in ordered) or "none"


def render(summary: dict) -> str:
    """The lines train.py prints at the end of a run."""
    rate = summary["tokens_per_s"]
    speed = f"{duration(summary['step_s'])} in steps, {rate:,.0f} tokens/s" if rate else "no steps run"
    skipped = f", {summary['skipped_steps']} non-finite steps skipped" if summary["skipped_steps"] else ""
    paths = summary["paths"]
    held_out = (f"  held-out ({summary['eval_examples']} examples): {metric_text(summary['eval'])}"
                if summary["eval"] else "  held-out: not evaluated (n_eval_examples=0)")
    return "\n".join([
        f"run {summary['exp_name']} (loss={summary['loss']}, model={summary['model']}, seed {summary['seed']}): "
        f"{summary['steps']} steps, {summary['examples']} examples, {duration(summary['wall_s'])} wall "
        f"({speed}){skipped}",
        f"  train (mean of the last {summary['train_steps_averaged']} steps): {metric_text(summary['train'])}",
        held_out,
        f"  metrics    {shown(paths['metrics'])}",
        f"  checkpoint {shown(paths['latest'])} (start from it: model.load_from={shown(paths['policy'])})",
        f"  HF export  {shown(paths['hf'])}",
    ])
