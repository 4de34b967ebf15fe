"""The GPU check of memory and speed (driven by tools/gpu_check.sh): one JSON file of figures.

    bash tools/gpu_check.sh                     # one CUDA GPU, ~6 minutes: the figures below at 1B scale
    bash tools/gpu_check.sh --cpu               # the same code, tiny model on CPU (tests/test_gpu_check.py)
    python tools/gpu_check.py --out FILE [--cpu]

On the GPU: `model=llama1b-random`, a random-init Llama of Llama-3.2-1B's shape (1.24B parameters, vocab 128k;
no download), max_length 2048 (prompts up to 1024), fp32 master weights with bf16 compute, FSDP2 in one process
(`use_fsdp=true`), activation checkpointing on, a live reference. Data: UltraFeedback-format records of random one-token words
(prompts 400-1000 words, 4 responses of 300-1000), written under the work folder and read by the real getter
(`datasets=[ultrafeedback] data_dir=...`), tokenised by the tiny tokenizer (ids < 4096 are valid ids of any vocab).
It measures, each run being the real trainer from `builders.build_trainer`:

- ours DPO and NCA (K=4), packed layout (FlexAttention), and DPO padded: tokens/s, MFU (the trainer's meter),
  peak GPU memory (max_memory_allocated / reserved) against the dry-run plan (`memory.plan`);
- packed vs padded exactness on the device: per-token log-probs and parameter gradients of one microbatch
  (fp32, a small Llama: the FlexAttention path forward and backward against padded SDPA);
- TRL's DPOTrainer on the same model shape, the same pairs (our loader's token ids), the same batch and GPU
  (bf16 mixed precision, gradient checkpointing on, like ours): tokens/s, peak memory;
- tools/gpu_check_precision.py's JSON (issue 11's GPU checks) when that script exists.

Targets (issue 12): DPO MFU >= 40%, ours >= 2x TRL tokens/s, peak within 15% of plan; the JSON says which hold.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU = {"model": "llama1b-random", "architecture": "llama-3.2-1b", "max_length": 2048, "max_prompt_length": 1024, "prompt_words": (400, 1000),
       "response_words": (300, 1000), "batch": 16, "accumulation": 4, "warmup": 2, "steps": 3, "bf16": True,
       "exactness_architecture": "tiny"}
CPU = {"model": "tiny", "architecture": "tiny", "max_length": 128, "max_prompt_length": 64, "prompt_words": (20, 50),
       "response_words": (10, 60), "batch": 4, "accumulation": 2, "warmup": 1, "steps": 1, "bf16": False,
       "exactness_architecture": "tiny"}
RUNS = (("dpo", "packed"), ("nca", "packed"), ("dpo", "padded"))
TARGETS = {"dpo_mfu": 0.40, "vs_trl": 2.0, "peak_vs_plan": 0.15}


def write_data(folder: Path, settings: dict, records: int, seed: int = 0) -> Path:
    """`records` UltraFeedback-format records (instruction, 4 completions with distinct overall scores) of random
    words from the wordsort vocabulary (one token each in the tiny tokenizer); returns the data_dir."""
    from feedbackalign.task import VOCAB

    rng = random.Random(seed)

    def text(bounds):
        return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(*bounds)))

    path = folder / "ultrafeedback" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(records):
            scores = rng.sample([1.0, 3.5, 6.0, 8.5], 4)
            completions = [{"response": text(settings["response_words"]), "overall_score": s} for s in scores]
            f.write(json.dumps({"instruction": text(settings["prompt_words"]), "completions": completions}) + "\n")
    return folder


def overrides(settings: dict, work: Path, loss: str, layout: str) -> list[str]:
    """The config of one of our runs: the model config's precision (fp32 master weights and bf16 compute for the
    1B model, fp32 for tiny), FSDP2 in one process, activation checkpointing, a live reference."""
    s = settings
    return [f"loss={loss}", f"model={s['model']}", "datasets=[ultrafeedback]", f"data_dir={work / 'data'}",
            f"cache_dir={work / 'runs'}", f"exp_name={loss}_{layout}", "overwrite=true",
            f"model.max_length={s['max_length']}", f"model.max_prompt_length={s['max_prompt_length']}",
            f"model.batch_size={s['batch']}", f"model.gradient_accumulation_steps={s['accumulation']}",
            f"model.forward_layout={layout}", "model.activation_checkpointing=true", "use_fsdp=true",
            f"n_examples={s['batch'] * (s['warmup'] + s['steps'])}", "n_eval_examples=0", "do_first_eval=false",
            "warmup_steps=0", "export_hf=false", "lr=1e-6"]


def run_ours(settings: dict, work: Path, loss: str, layout: str, device) -> dict:
    """One of our runs: warmup + measured optimizer steps of the real trainer; tokens/s and MFU from its meter
    over the measured steps; peak memory of the whole run against the dry-run plan of the same config."""

    from feedbackalign import builders, distributed, memory
    from feedbackalign.configuration import compose

    cfg = compose(overrides(settings, work, loss, layout))
    plan = memory.plan(cfg, 1, device=device.type)
    logged = []

    def train():
        trainer = builders.build_trainer(cfg, 0, 1, device)
        batches = iter(trainer.train_loader)
        for _ in range(settings["warmup"] + settings["steps"]):
            logged.append(trainer.train_step([next(batches) for _ in range(settings["accumulation"])]))
        return distributed.is_sharded(trainer.policy)

    started = time.perf_counter()
    sharded, peak = measured(train, device)
    measured_steps = logged[settings["warmup"]:]
    steps = measured_steps
    seconds = sum(m["s/step"] for m in steps)
    out = {"loss": loss, "layout": layout, "fsdp": sharded, "steps": len(steps), "s_per_step": seconds / len(steps),
           "tokens_per_s": sum(m["tokens/s"] * m["s/step"] for m in steps) / seconds,
           "mfu": sum(m.get("mfu", float("nan")) * m["s/step"] for m in steps) / seconds,
           "padding_fraction": sum(m["padding_fraction"] for m in steps) / len(steps),
           "loss_first": logged[0]["loss"], "loss_last": logged[-1]["loss"], "plan_gib": plan.peak / memory.GIB,
           "microbatch_packed_tokens_planned": plan.tokens.packed, "wall_s": time.perf_counter() - started}
    out.update(peak_figures(peak, device))
    if peak is not None:
        out["peak_vs_plan"] = out["peak_allocated_gib"] / out["plan_gib"] - 1
    release()
    return out


def measured(function, device):
    """(function(), its peak GPU bytes) on CUDA; (function(), None) on CPU, where measuring every allocation
    would slow the steps ~50x (tests/test_memory.py checks the plan against a measured CPU peak)."""
    from feedbackalign import memory

    return memory.measured_peak(function, device) if device.type == "cuda" else (function(), None)


def peak_figures(peak, device) -> dict:
    import torch

    from feedbackalign import memory

    if peak is None:
        return {"peak_allocated_gib": None}
    return {"peak_allocated_gib": peak / memory.GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / memory.GIB}


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def exactness(settings: dict, work: Path, device) -> dict:
    """Packed (this device's attention path) vs padded per-token log-probs and gradients of one DPO microbatch
    of the check's data, fp32, a small model of `exactness_architecture`."""
    import torch

    from feedbackalign import builders, logprobs, models
    from feedbackalign.configuration import compose

    cfg = compose(overrides(settings, work, "dpo", "packed"))
    tokenizer = builders.build_tokenizer(cfg)
    batch = next(iter(builders.build_loader(cfg, tokenizer, split="train", train=True)))
    sequences = batch.sequences()
    results = []
    for layout in ("padded", "packed"):
        model = models.build_model("random", torch.float32, architecture=settings["exactness_architecture"])
        model = model.to(device)
        values = logprobs.sequence_logps(model, sequences, tokenizer.pad_token_id, layout)
        (values.sums * torch.linspace(-1, 1, len(sequences), device=device)).sum().backward()
        results.append((values, torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    (padded, pad_grad), (packed, packed_grad) = results
    return {"attention_path": logprobs.attention_path("auto", device), "sequences": len(sequences),
            "max_abs_token_logp_diff": (padded.token_logps - packed.token_logps).abs().max().item(),
            "max_rel_grad_diff": ((pad_grad - packed_grad).abs().max() / pad_grad.abs().max()).item()}


def run_trl(settings: dict, work: Path, device) -> dict:
    """TRL's DPOTrainer on the same model shape, pairs, batch and device: tokens/s and peak memory."""
    import torch

    from feedbackalign import builders, models
    from feedbackalign.configuration import compose
    from showcase.benchmark import pair_rows, trl_dpo, trl_step_work

    cfg = compose(overrides(settings, work, "dpo", "packed"))
    tokenizer = builders.build_tokenizer(cfg)
    n_steps = settings["warmup"] + settings["steps"]
    rows = pair_rows(cfg, tokenizer, n_steps)
    bf16 = settings["bf16"]

    def train():
        policy = models.build_model("random", torch.float32, architecture=settings["architecture"]).to(device)
        reference = copy.deepcopy(policy).to(torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
        _, times, _ = trl_dpo(policy, reference, rows, tokenizer, work, steps=n_steps, batch=settings["batch"],
                              accumulation=settings["accumulation"], lr=1e-6, beta=0.1,
                              max_length=settings["max_length"], max_grad_norm=10.0, seed=0, precompute=False,
                              bf16=bf16, gradient_checkpointing=True)
        return times

    started = time.perf_counter()
    times, peak = measured(train, device)
    w = settings["warmup"]
    work_of = [trl_step_work(rows, settings["batch"], step) for step in range(len(times))]
    tokens = sum(sum(lengths) for lengths, _ in work_of[w:])
    out = {"steps": len(times) - w, "s_per_step": sum(times[w:]) / (len(times) - w),
           "tokens_per_s": tokens / sum(times[w:]),
           "padding_fraction": 1 - tokens / sum(padded for _, padded in work_of[w:]),
           "wall_s": time.perf_counter() - started, **peak_figures(peak, device)}
    release()
    return out


def precision_checks(cpu: bool, work: Path) -> dict:
    """tools/gpu_check_precision.py's figures (issue 11), when the script exists."""
    script = REPO / "tools" / "gpu_check_precision.py"
    if not script.is_file():
        return {"skipped": "tools/gpu_check_precision.py is not in this checkout"}
    out = work / "precision.json"
    result = subprocess.run([sys.executable, str(script), "--out", str(out), *(["--cpu"] if cpu else [])], cwd=REPO,
                            capture_output=True, text=True)
    if not out.is_file():  # it writes its figures whether its checks pass (exit 0) or not (exit 1)
        return {"failed": (result.stderr or result.stdout).strip().splitlines()[-5:], "exit_code": result.returncode}
    return {**json.loads(out.read_text()), "exit_code": result.returncode}


def targets(figures: dict) -> dict:
    """Which of issue 12's GPU targets hold (meaningful on a GPU only)."""
    ours = {(r["loss"], r["layout"]): r for r in figures["runs"]}
    dpo = ours[("dpo", "packed")]
    out = {"dpo_mfu >= 0.40": dpo["mfu"] >= TARGETS["dpo_mfu"],
           "peak within 15% of plan": all(abs(r.get("peak_vs_plan", float("inf"))) <= TARGETS["peak_vs_plan"]
                                          for r in figures["runs"])}
    trl = figures.get("trl", {})
    if "tokens_per_s" in trl:
        figures["ratios"] = {"dpo_packed_vs_trl": dpo["tokens_per_s"] / trl["tokens_per_s"],
                             "dpo_packed_vs_padded": dpo["tokens_per_s"] / ours[("dpo", "padded")]["tokens_per_s"]}
        out["ours >= 2x TRL"] = figures["ratios"]["dpo_packed_vs_trl"] >= TARGETS["vs_trl"]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny model on CPU (a functional check)")
    parser.add_argument("--out", type=Path, default=REPO / "gpu_check.json", help="the JSON file written")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--skip-trl", action="store_true", help="leave TRL out")
    args = parser.parse_args(argv)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("WANDB_MODE", "disabled")
    import tempfile

    import torch
    import transformers

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: error: no CUDA GPU visible; run `bash tools/gpu_check.sh --cpu` for the CPU mode")
    device = torch.device("cpu" if args.cpu else "cuda")
    settings = CPU if args.cpu else GPU
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.work or Path(tmp)
        write_data(work / "data", settings, records=2 * settings["batch"] * (settings["warmup"] + settings["steps"]))
        figures = {"mode": "cpu" if args.cpu else "gpu",
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "transformers": transformers.__version__, "settings": settings,
                   "runs": []}
        for loss, layout in RUNS:
            figures["runs"].append(run_ours(settings, work, loss, layout, device))
            print(json.dumps(figures["runs"][-1]), flush=True)
        figures["exactness"] = exactness(settings, work, device)
        print(json.dumps(figures["exactness"]), flush=True)
        if args.skip_trl:
            figures["trl"] = {"skipped": "--skip-trl"}
        else:
            try:
                figures["trl"] = run_trl(settings, work, device)
            except ImportError as e:
                figures["trl"] = {"skipped": f"TRL not importable: {e}"}
        print(json.dumps(figures["trl"]), flush=True)
        figures["precision"] = precision_checks(args.cpu, work)
        figures["targets"] = targets(figures)
    figures["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"gpu_check: figures in {args.out} ({figures['wall_s']:.0f}s); targets: {figures['targets']}", flush=True)


if __name__ == "__main__":
    main()
