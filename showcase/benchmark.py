"""Throughput benchmark: this framework's trainers side by side with TRL's DPOTrainer (a benchmark, not a test).

    python -m showcase.benchmark                                # DPO on HH and wordsort, ours vs TRL, live + cached
    python -m showcase.benchmark --steps 10 --datasets wordsort # quicker (10 measured steps is the minimum)
    python -m showcase.benchmark --skip-trl --losses nca kto    # ours only
    python -m showcase.benchmark --scaling                      # step time vs sequence length and K, cache pass

Every configuration runs in its own subprocess, one after the other (clean peak RSS, no shared state). Ours is
the real trainer built by `builders.build_trainer` from the real config (tiny model, packed layout); TRL's DPOTrainer gets
the same tiny model and seed-0 init, an explicit frozen reference, and exactly the token ids our loader produced
(same pairs, same order, same truncation), fp32, no gradient checkpointing, batch 8 pairs, max_length 256.

Definitions (docs/performance.md): tokens = sum over the sequences a step forwards of len(prompt) + len(response)
(a pair counts prompt+chosen + prompt+rejected: what an unshared, unpadded forward processes), padding excluded,
counted identically for both; steady state = the steps after `--warmup`, wall clock between step ends (data,
forward, backward, optimizer, logging all included); peak RSS = the subprocess's ru_maxrss.

Fewer than MIN_STEPS measured steps are refused: over a handful of steps one slow step (an allocation, a page
fault, a neighbour's burst on a shared CPU) decides the ratio (5 steps once gave 12.2x, with TRL's precomputed
reference slower than its live one). `--few-steps` runs them anyway as a smoke check, labelled as such.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
UNITS = {"dpo": "pairs", "nca": "groups", "kto": "items"}
MIN_STEPS = 10    # measured steps below which ratios are artefacts (see the docstring)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


# ---------------------------------------------------------------- configuration shared by both sides


def hh_train_alias(data_dir: Path, work: Path) -> Path:
    """A data_dir whose hh_rlhf/<subset>/train.jsonl.gz link to the local test files (the shared samples hold
    only HH's test split), so `builders.build_trainer` loads HH unchanged."""
    alias = work / "data"
    for subset in sorted((data_dir / "hh_rlhf").iterdir()):
        if (subset / "test.jsonl.gz").is_file():
            (alias / "hh_rlhf" / subset.name).mkdir(parents=True, exist_ok=True)
            link = alias / "hh_rlhf" / subset.name / "train.jsonl.gz"
            if not link.exists():
                link.symlink_to((subset / "test.jsonl.gz").resolve())
    return alias


def compose(spec: dict, work: Path):
    """The real Hydra config for one run of ours."""
    from feedbackalign.configuration import compose as compose_config

    overrides = [f"loss={spec['loss']}", "model=tiny", f"datasets=[{spec['dataset']}]", f"cache_dir={work}/runs",
                 f"reference_cache_dir={work}/refcache", f"model.batch_size={spec['batch']}",
                 f"model.max_length={spec['max_length']}", f"model.max_prompt_length={spec['max_length'] // 2}",
                 f"model.forward_layout={spec['layout']}", f"cache_reference_logprobs={spec['cached']}",
                 f"n_examples={spec['batch'] * (spec['warmup'] + spec['steps'])}", "n_eval_examples=0",
                 "do_first_eval=false", "warmup_steps=0", "export_hf=false", "exp_name=bench", "overwrite=true"]
    if spec["dataset"] == "hh":
        overrides.append(f"data_dir={hh_train_alias(Path(spec['data_dir']), work)}")
    if spec["loss"] == "nca":
        overrides += [f"loss.data.n_responses={spec['k']}", f"++dataset_options.wordsort.k={spec['k']}"]
    return compose_config(overrides)


def sequence_tokens(sequences) -> int:
    return sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)


def summarize(times: list[float], tokens: list[int], units: list[int], warmup: int) -> dict:
    t, n, u = sum(times[warmup:]), sum(tokens[warmup:]), sum(units[warmup:])
    return {"tokens_per_s": n / t, "units_per_s": u / t, "s_per_step": t / len(times[warmup:]),
            "tokens_per_step": n / len(tokens[warmup:])}


# ---------------------------------------------------------------- ours


def run_ours(spec: dict, work: Path) -> dict:
    """Our trainer's steps. The work of each step (KL partners and a live reference included) is what its own
    meter (throughput.Meter) logged: rate x the step's seconds gives back the counts; the steady-state time is
    measured here around each step."""
    import torch

    from feedbackalign import builders

    cfg = compose(spec, work)
    with timed_reference_pass() as reference_pass:
        trainer = builders.build_trainer(cfg, 0, 1, torch.device("cpu"))
    times, tokens, computed, positions, flops, units = [], [], [], [], [], []
    batches = iter(trainer.train_loader)
    for _ in range(spec["warmup"] + spec["steps"]):
        batch = next(batches)
        started = time.perf_counter()
        logged = trainer.train_step([batch])
        times.append(time.perf_counter() - started)
        units.append(batch.size)
        tokens.append(logged["tokens/s"] * logged["s/step"])
        computed.append(logged["computed_tokens/s"] * logged["s/step"])
        positions.append(computed[-1] / (1 - logged["padding_fraction"]))
        flops.append(logged["mfu"] * logged["s/step"] * trainer.peak_flops)
    w = spec["warmup"]
    forwards = 1 if spec["cached"] else 2  # a live reference forwards every sequence the policy forwards, once more
    out = summarize(times, tokens, units, w)
    out.update(reference_pass_s=reference_pass["seconds"], padding_fraction=1 - sum(computed[w:]) / sum(positions[w:]),
               sharing_saving=1 - sum(computed[w:]) / (forwards * sum(tokens[w:])),
               mfu=sum(flops[w:]) / sum(times[w:]) / trainer.peak_flops)
    return out


@contextlib.contextmanager
def timed_reference_pass():
    """Time `ref_cache.build` (the cache pass `builders.build_trainer` runs) by wrapping the real function."""
    from feedbackalign import ref_cache

    record = {"seconds": None}
    build = ref_cache.build

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return build(*args, **kwargs)
        finally:
            record["seconds"] = time.perf_counter() - started

    ref_cache.build = timed
    try:
        yield record
    finally:
        ref_cache.build = build


def run_setup(spec: dict, work: Path) -> dict:
    """Only `builders.build_trainer` with the reference cache pass, whose seconds are returned."""
    import torch

    from feedbackalign import builders

    with timed_reference_pass() as reference_pass:
        builders.build_trainer(compose(spec, work), 0, 1, torch.device("cpu"))
    return {"reference_pass_s": reference_pass["seconds"]}


# ---------------------------------------------------------------- TRL


def pair_rows(cfg, tokenizer, steps: int) -> list[dict]:
    """The pairs of our loader's first `steps` optimizer steps, in order, as TRL's pre-tokenised columns."""
    from feedbackalign import builders

    loader = builders.build_loader(cfg, tokenizer, split="train", train=True)
    rows = []
    for batch, _ in zip(loader, range(steps * cfg.model.gradient_accumulation_steps)):
        for c, r in zip(batch.parts["chosen"], batch.parts["rejected"]):
            rows.append({"prompt_ids": list(c.prompt_ids), "chosen_ids": list(c.response_ids),
                         "rejected_ids": list(r.response_ids)})
    return rows


def trl_rows(spec: dict, work: Path):
    """The pairs of a benchmark configuration (+ its config and tokenizer)."""
    from feedbackalign import builders

    cfg = compose(spec, work)
    tokenizer = builders.build_tokenizer(cfg)
    return pair_rows(cfg, tokenizer, spec["warmup"] + spec["steps"]), cfg, tokenizer


class StepClock:
    """A TrainerCallback's clock: the wall time at train begin and at each optimizer step's end."""

    def __init__(self):
        self.ends = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def trl_dpo(policy, reference, rows: list[dict], tokenizer, work: Path, *, steps: int, batch: int, lr: float,
            beta: float, max_length: int, max_grad_norm: float, seed: int, precompute: bool, accumulation: int = 1,
            bf16: bool = False, gradient_checkpointing: bool = False):
    """TRL's DPOTrainer trained for `steps` optimizer steps on `rows` (pre-tokenised prompt/chosen/rejected ids,
    in order), its own tokenisation skipped; returns (trainer, per-step seconds, reference pass seconds).

    `batch` pairs per optimizer step in `accumulation` microbatches; `bf16` is the HF Trainer's mixed precision
    (fp32 weights, bf16 autocast); the device is CUDA when there is one."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class SameTokensDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer fed our token ids: its own tokenisation step returns the dataset unchanged."""

        reference_pass_s = None

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, *args, **kwargs):
            started = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            type(self).reference_pass_s = time.perf_counter() - started
            return out

    class Clock(StepClock, TrainerCallback):
        pass

    args = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=batch // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr, beta=beta,
        max_length=max_length, precompute_ref_log_probs=precompute, gradient_checkpointing=gradient_checkpointing,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to=[], logging_steps=steps, save_strategy="no",
        eval_strategy="no", train_sampling_strategy="sequential", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=max_grad_norm, optim="adamw_torch", seed=seed, dataloader_num_workers=0,
        disable_tqdm=True)
    clock = Clock()
    trl = SameTokensDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tokenizer, callbacks=[clock])
    trl.train()
    return trl, clock.step_times(), SameTokensDPOTrainer.reference_pass_s


def trl_step_work(rows: list[dict], batch: int, step: int) -> tuple[list[int], int]:
    """(sequence lengths, padded positions) of TRL's step `step`: each pair's prompt+chosen and prompt+rejected,
    padded to the step's longest (TRL pads chosen and rejected together)."""
    pairs = rows[step * batch: (step + 1) * batch]
    lengths = [len(p["prompt_ids"]) + len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    return lengths, len(lengths) * max(lengths)


def run_trl(spec: dict, work: Path) -> dict:
    import torch

    from feedbackalign import models
    from feedbackalign import throughput

    rows, cfg, tokenizer = trl_rows(spec, work)
    policy = models.build_model(cfg.model.name_or_path, torch.float32, seed=cfg.model.init_seed)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    n_steps = spec["warmup"] + spec["steps"]
    trl, times, reference_pass_s = trl_dpo(
        policy, reference, rows, tokenizer, work, steps=n_steps, batch=spec["batch"], lr=float(cfg.lr),
        beta=float(cfg.loss.beta), max_length=spec["max_length"], max_grad_norm=float(cfg.model.max_grad_norm),
        seed=cfg.seed, precompute=spec["cached"])
    fresh = models.build_model(cfg.model.name_or_path, torch.float32, seed=cfg.model.init_seed)  # TRL patched its own
    agreement = reference_agreement(trl.train_dataset, fresh) if spec["cached"] else None
    tokens, units, positions, flops = [], [], [], []
    for step in range(len(times)):
        lengths, padded = trl_step_work(rows, spec["batch"], step)
        tokens.append(sum(lengths))
        units.append(len(lengths) // 2)
        positions.append(padded)
        context = throughput.causal_context(lengths)  # FLOPs of the non-pad positions only
        flops.append(throughput.training_flops(policy.config, sum(lengths), context)
                     + (0.0 if spec["cached"] else throughput.forward_flops(policy.config, sum(lengths), context)))
    w = spec["warmup"]
    out = summarize(times, tokens, units, w)
    out.update(reference_pass_s=reference_pass_s, reference_max_abs_diff=agreement,
               padding_fraction=1 - sum(tokens[w:]) / sum(positions[w:]), sharing_saving=0.0,
               mfu=throughput.mfu(sum(flops[w:]), sum(times[w:]), throughput.peak_flops(None, torch.device("cpu"))))
    return out


def reference_agreement(dataset, reference) -> float:
    """Largest |TRL's precomputed reference log-prob - ours (packed layout)| over the run's pairs: both sides
    score the same sequences the same way."""
    import torch

    from feedbackalign.batches import Sequence
    from feedbackalign.logprobs import packed_logps

    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), 32):
            rows = dataset[start: start + 32]
            seqs = [Sequence(tuple(p), tuple(r)) for key in ("chosen_ids", "rejected_ids")
                    for p, r in zip(rows["prompt_ids"], rows[key])]
            ours = packed_logps(reference, seqs).sums
            theirs = torch.tensor(rows["ref_chosen_logps"] + rows["ref_rejected_logps"])
            worst = max(worst, (ours - theirs).abs().max().item())
    return worst


# ---------------------------------------------------------------- one configuration per subprocess


def run_one(spec: dict) -> dict:
    """Run one configuration in this process and return its figures (+ peak RSS)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        work = Path(tmp)
        runner = {"trl": run_trl, "ours": run_ours, "setup": run_setup}[spec["impl"]]
        out = runner(spec, work)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["threads"] = torch.get_num_threads()
    return out


def launch(spec: dict) -> dict:
    """`run_one` in a fresh interpreter; its figures come back as the last line of stdout."""
    proc = subprocess.run([sys.executable, "-m", "showcase.benchmark", "--one", json.dumps(spec)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **OFFLINE})
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"benchmark run {spec['impl']} {spec['loss']} {spec['dataset']} failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(args) -> list[dict]:
    """Configurations in run order: per dataset, DPO ours/TRL live/cached; then NCA K and KTO (ours)."""
    base = {"batch": args.batch, "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
            "threads": args.threads, "data_dir": str(args.data_dir), "layout": "packed", "k": args.k}
    specs = []
    for dataset in args.datasets:
        for loss in args.losses:
            if loss == "nca" and dataset == "hh":
                continue  # HH has pairs only: K=2
            for cached in (False, True):
                specs.append({**base, "impl": "ours", "loss": loss, "dataset": dataset, "cached": cached})
                if loss == "dpo" and not args.skip_trl:
                    specs.append({**base, "impl": "trl", "loss": loss, "dataset": dataset, "cached": cached})
    return specs


def table(results: list[tuple[dict, dict]]) -> str:
    """A markdown table; the ratio column divides our tokens/s by TRL's for the same dataset and reference mode."""
    trl = {(s["dataset"], s["cached"]): r for s, r in results if s["impl"] == "trl"}
    lines = ["| run | dataset | reference | tokens/s | units/s | s/step | padding | shared prompt saving | MFU "
             "| peak RSS MB | reference pass s | vs TRL |", "|" + "---|" * 12]
    for s, r in results:
        name = "TRL DPOTrainer" if s["impl"] == "trl" else f"ours {s['loss']}" + (f" K={s['k']}" if s["loss"] == "nca"
                                                                                 else "")
        twin = trl.get((s["dataset"], s["cached"])) if s["impl"] == "ours" and s["loss"] == "dpo" else None
        ratio = f"{r['tokens_per_s'] / twin['tokens_per_s']:.2f}x" if twin else "-"
        mode = ("precomputed" if s["impl"] == "trl" else "cached") if s["cached"] else "live"
        lines.append(f"| {name} | {s['dataset']} | {mode} | {r['tokens_per_s']:.0f} | {r['units_per_s']:.2f} "
                     f"{UNITS[s['loss']]} | {r['s_per_step']:.3f} | {r['padding_fraction']:.1%} | "
                     f"{r['sharing_saving']:.1%} | {r['mfu']:.1%} | {r['peak_rss_mb']:.0f} | "
                     f"{'-' if r['reference_pass_s'] is None else format(r['reference_pass_s'], '.1f')} | "
                     f"{ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- scaling report (in this process)


def synthetic(groups: int, k: int, prompt: int, response: int, seed: int = 0):
    """`groups` prompts of `prompt` random tokens, each with `k` responses of `response` tokens."""
    import torch

    from feedbackalign.batches import Sequence

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(10, 4000, (n,), generator=g).tolist())

    return [Sequence(p, ids(response)) for p in (ids(prompt) for _ in range(groups)) for _ in range(k)]


def time_forward_backward(model, sequences, layout: str, repeats: int) -> float:
    """Best seconds of one policy forward + backward of `sequences` in `layout`."""
    from feedbackalign.logprobs import sequence_logps

    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warmup
        started = time.perf_counter()
        sequence_logps(model, sequences, 1, layout).sums.sum().backward()
        best = min(best, time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return best


def scaling_rows(model, repeats: int) -> tuple[list[str], list[str]]:
    """Policy forward+backward time of 8 pairs against sequence length, and of 8 groups against K."""
    lengths = ["| prompt + response tokens | packed s | padded s | packed tokens | padded positions |",
               "|---|---|---|---|---|"]
    for total in (64, 128, 256, 512):
        seqs = synthetic(8, 2, total // 2, total // 2)
        packed, padded = (time_forward_backward(model, seqs, lay, repeats) for lay in ("packed", "padded"))
        lengths.append(f"| {total} | {packed:.3f} | {padded:.3f} | {8 * (total // 2) * 3} | {16 * total} |")
    ks = ["| K | packed s | padded s | packed tokens (P + K R per group) | padded positions (K (P + R)) |",
          "|---|---|---|---|---|"]
    for k in (2, 4, 8):
        seqs = synthetic(8, k, 128, 32)
        packed, padded = (time_forward_backward(model, seqs, lay, repeats) for lay in ("packed", "padded"))
        ks.append(f"| {k} | {packed:.3f} | {padded:.3f} | {8 * (128 + 32 * k)} | {8 * k * 160} |")
    return lengths, ks


def cache_pass_rows(args) -> list[str]:
    """Seconds of the reference cache pass (`ref_cache.build` inside `builders.build_trainer`) against DPO pairs."""
    dataset = "hh" if (args.data_dir / "hh_rlhf").is_dir() else "wordsort"
    rows = [f"| {dataset} pairs | sequences | cache pass s | pairs/s |", "|---|---|---|---|"]
    for pairs in (64, 128, 256, 512):
        spec = {"batch": args.batch, "max_length": args.max_length, "steps": pairs // args.batch, "warmup": 0,
                "threads": args.threads, "data_dir": str(args.data_dir), "layout": "packed", "k": args.k,
                "loss": "dpo", "dataset": dataset, "impl": "setup", "cached": True}
        seconds = launch(spec)["reference_pass_s"]
        rows.append(f"| {pairs} | {2 * pairs} | {seconds:.1f} | {pairs / seconds:.0f} |")
    return rows


PROFILE_GROUPS = {"matmul (linear layers, LM head)": ("aten::mm", "aten::addmm", "aten::bmm"),
                  "attention (sdpa fwd+bwd)": ("scaled_dot_product",),
                  "gather/scatter (layout, attention rows)": ("index_select", "index_add", "gather", "scatter",
                                                              "index", "embedding"),
                  "log-softmax (logsumexp)": ("logsumexp", "exp", "sub"),
                  "optimizer (AdamW)": ("_foreach", "lerp", "addcdiv", "addcmul", "sqrt")}


def profile_rows(args) -> list[str]:
    """Where a DPO step's CPU time goes (ours, cached reference, HH or wordsort), by operator family."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from feedbackalign import builders

    dataset = "hh" if (args.data_dir / "hh_rlhf").is_dir() else "wordsort"
    spec = {"batch": args.batch, "max_length": args.max_length, "steps": 4, "warmup": 1, "threads": args.threads,
            "data_dir": str(args.data_dir), "layout": "packed", "k": args.k, "loss": "dpo", "dataset": dataset,
            "cached": True}
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        trainer = builders.build_trainer(compose(spec, Path(tmp)), 0, 1, torch.device("cpu"))
        batches = iter(trainer.train_loader)
        trainer.train_step([next(batches)])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(spec["steps"]):
                trainer.train_step([next(batches)])
    totals = {name: 0.0 for name in [*PROFILE_GROUPS, "other (norms, activations, rotary, autograd)"]}
    for event in prof.key_averages():
        name = next((g for g, keys in PROFILE_GROUPS.items() if any(k in event.key for k in keys)),
                    "other (norms, activations, rotary, autograd)")
        totals[name] += event.self_cpu_time_total
    whole = sum(totals.values())
    rows = [f"| operator family ({dataset}) | share of CPU time |", "|---|---|"]
    return rows + [f"| {name} | {value / whole:.1%} |" for name, value in totals.items()]


def scaling_report(args) -> str:
    import torch

    from feedbackalign import models

    if args.threads:
        torch.set_num_threads(args.threads)
    model = models.build_model("tiny", torch.float32, seed=0)
    lengths, ks = scaling_rows(model, repeats=2)
    parts = ["Policy forward + backward, 8 pairs (prompt = response = half the length):", *lengths, "",
             "Policy forward + backward, 8 groups, prompt 128 + K responses of 32 tokens:", *ks, "",
             "Reference cache pass (no-grad packed forwards + SQLite writes):", *cache_pass_rows(args),
             "", "Profile of ours, DPO, cached reference:", *profile_rows(args)]
    return "\n".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10,
                   help=f"measured steps per run (after the warmup), at least {MIN_STEPS} unless --few-steps")
    p.add_argument("--few-steps", action="store_true",
                   help=f"allow fewer than {MIN_STEPS} measured steps: a smoke check whose figures are not measurements")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    p.add_argument("--datasets", nargs="+", default=["hh", "wordsort"], choices=["hh", "wordsort"])
    p.add_argument("--losses", nargs="+", default=["dpo", "nca", "kto"], choices=["dpo", "nca", "kto"])
    p.add_argument("--skip-trl", action="store_true", help="run only this framework")
    p.add_argument("--batch", type=int, default=8, help="pairs / groups / items per step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--k", type=int, default=4, help="responses per NCA group")
    p.add_argument("--repeats", type=int, default=1, help="run the whole plan this many times; report medians")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the shared data samples (for hh)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--scaling", action="store_true", help="print the scaling report instead")
    p.add_argument("--one", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    if args.scaling:
        print(load_line("before"), flush=True)
        print(scaling_report(args))
        print(load_line("after"))
        return
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.batch < 2:
        raise SystemExit("error: need --steps >= 1, --warmup >= 0, --repeats >= 1 and --batch >= 2")
    if args.steps < MIN_STEPS and not args.few_steps:
        raise SystemExit(f"error: --steps {args.steps}: fewer than {MIN_STEPS} measured steps give artefacts, not "
                         f"throughput (one slow step decides the ratio); use --steps {MIN_STEPS} or more, or "
                         "--few-steps for a smoke check")
    few = f"SMOKE CHECK: {args.steps} measured steps (< {MIN_STEPS}): these figures are not measurements" \
        if args.steps < MIN_STEPS else None
    if few:
        print(few, flush=True)
    if not args.skip_trl and "dpo" in args.losses and importlib.util.find_spec("trl") is None:
        raise SystemExit("error: TRL is not installed: pip install trl (a benchmark-only dependency) "
                         "or pass --skip-trl")
    if "hh" in args.datasets and not (args.data_dir / "hh_rlhf").is_dir():
        raise SystemExit(f"error: {args.data_dir / 'hh_rlhf'} not found: pass --data-dir <shared data> or "
                         "--datasets wordsort")
    print(load_line("before"), flush=True)
    runs = []  # (spec, [result per repeat])
    for spec in plan(args):
        runs.append((spec, []))
    for repeat in range(args.repeats):  # whole plan per repeat: ours and TRL alternate under the same load
        for spec, results in runs:
            started = time.perf_counter()
            results.append(launch(spec))
            print(f"[{repeat + 1}/{args.repeats}] {spec['impl']:4s} {spec['loss']} {spec['dataset']:8s} "
                  f"{'cached' if spec['cached'] else 'live':6s} {results[-1]['tokens_per_s']:7.0f} tokens/s  "
                  f"{results[-1]['s_per_step']:.3f} s/step  ({time.perf_counter() - started:.0f}s)", flush=True)
    print(load_line("after") + "\n")
    print(table([(spec, median_run(results)) for spec, results in runs]))
    print(ratio_lines(runs))
    if few:
        print(few)
    if args.json:
        args.json.write_text(json.dumps([{"spec": s, "results": r} for s, r in runs], indent=1))


def load_line(when: str) -> str:
    """The 1-minute load average, flagged when other work competes for the cores."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    busy = f" (above {cores} cores: timings are contended; --threads 1 is steadier)" if load > cores else ""
    return f"load average {when}: {load:.2f}{busy}"


def ratio_lines(runs) -> str:
    """Per-repeat DPO ratios (ours / TRL tokens/s) and the reference log-prob agreement on the same pairs."""
    lines, by_key = [], {(s["impl"], s["loss"], s["dataset"], s["cached"]): r for s, r in runs}
    for (impl, loss, dataset, cached), trl in by_key.items():
        ours = by_key.get(("ours", loss, dataset, cached))
        if impl != "trl" or ours is None:
            continue
        ratios = ", ".join(f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x" for o, t in zip(ours, trl))
        lines.append(f"DPO {dataset} {'cached vs precomputed' if cached else 'live'}: ours/TRL per repeat {ratios}")
        if cached:
            worst = max(t["reference_max_abs_diff"] for t in trl)
            lines.append(f"  TRL's precomputed reference log-probs vs ours on the same pairs: max |diff| {worst:.2e}")
    return "\n".join(lines)


def median_run(results: list[dict]) -> dict:
    """The repeat with the median tokens/s (all its figures together)."""
    return sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]


if __name__ == "__main__":
    main()
