"""GPU checks of precision, loading and sharded state, in ONE process with FSDP2 (`use_fsdp=true`):

1. master_weights: DPO with fp32 master weights and bf16 compute (the default of every real model config) moves
   almost every weight at a real-model learning rate, and the forward really runs in bf16; the same run with bf16
   weights (`model.policy_dtype=bfloat16`, pure bf16) moves almost none.
2. lora: LoRA under FSDP2 (adapters fp32, base bf16, bf16 compute) trains through its first backward, which used to
   fail after FSDP2's lazy initialisation in the reference pass.
3. dcp_resume: a run saved at step 2 (an intermediate checkpoint: sharded state only) and resumed from it gives the
   uninterrupted run's step-3 loss.

    python tools/gpu_check_precision.py [--cpu] [--out FILE.json]

Default: a random-init Llama of Llama-3.2-1B's exact shape (shipped architecture, no download) on cuda:0,
sequences up to 512 tokens. `--cpu`: the same code on the embedded tiny model on CPU (the test suite runs it).
Writes one JSON object {"device", "model", "checks": {name: {figures..., "ok"}}, "ok", "seconds"} to --out (default
stdout); exit 0 when every check is ok, 1 otherwise. It needs the package's dependencies (hydra-core, omegaconf,
datasets, peft, accelerate); tools/gpu_check.sh installs them on a bare GPU machine, runs this script and folds its
JSON into its own output. On the GPU it takes ~2-4 minutes (four 1.2B-parameter builds, ~30 training steps) and up
to ~35 GB of temporary disk for fp32 checkpoints, removed after each check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from feedbackalign import builders, checkpoints  # noqa: E402
from feedbackalign.configuration import compose  # noqa: E402

COMMON = ["loss=dpo", "datasets=[wordsort]", "use_fsdp=true", "do_first_eval=false", "n_eval_examples=0",
          "export_hf=false", "warmup_steps=0", "model.batch_size=8", "model.lora.dropout=0.0"]
# The models: the tiny one on CPU with a real model's dtypes; Llama-3.2-1B's shape with random weights on a GPU
# (config/model/llama1b-random.yaml: the real models' defaults, fp32 master weights, bf16 compute and reference).
MODELS = {
    "cpu": ["model=tiny", "++model.compute_dtype=bfloat16", "model.reference_dtype=bfloat16",
            "++dataset_options.wordsort.n_prompts=64"],
    "cuda": ["model=llama1b-random", "model.attn_implementation=sdpa", "model.gradient_accumulation_steps=1",
             "model.max_length=512", "model.max_prompt_length=256", "++dataset_options.wordsort.n_prompts=64"],
}
LR = {"cpu": "1e-6", "cuda": "5e-7"}  # the real models' default lr on the GPU


def build(run_root: Path, kind: str, *overrides):
    cfg = compose([f"cache_dir={run_root}", *COMMON, *MODELS[kind], *overrides])
    device = torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")
    return builders.build_trainer(cfg, 0, 1, device)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: local(p.detach()).float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed_fraction(model, before: dict[str, torch.Tensor]) -> float:
    changed = total = 0
    for name, p in model.named_parameters():
        if name in before:
            changed += int((local(p.detach()).float().cpu() != before[name]).sum())
            total += before[name].numel()
    return changed / max(total, 1)


def records(trainer) -> list[dict]:
    return [json.loads(line) for line in trainer.metrics_path.read_text().splitlines() if '"loss"' in line]


def compute_dtype_seen(trainer) -> str:
    """The dtype the LM head really computes in (FSDP2 all-gathers in the compute dtype)."""
    seen = []
    head = trainer.policy.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: seen.append(str(out.dtype)))
    try:
        trainer.policy_logps(next(iter(trainer.train_loader)), grad=False)
    finally:
        handle.remove()
    return seen[0]


def master_weights(root: Path, kind: str, steps: int) -> dict:
    """fp32 master weights + bf16 compute against pure bf16, same data and lr."""
    out = {}
    for name, dtype in (("fp32_master", "float32"), ("pure_bf16", "bfloat16")):
        trainer = build(root / name, kind, f"lr={LR[kind]}", f"n_examples={8 * steps}",
                        f"model.policy_dtype={dtype}")
        before = snapshot(trainer.policy)
        trainer.train()
        rec = records(trainer)
        out[name] = {"changed_fraction": changed_fraction(trainer.policy, before),
                     "stored_dtype": str(next(local(p) for p in trainer.policy.parameters()).dtype),
                     "adam_state_dtype": str(next(iter(trainer.optimizer.state.values()))["exp_avg"].dtype),
                     "compute_dtype": compute_dtype_seen(trainer),
                     "losses": [r["loss"] for r in rec], "margins": [r["rewards/margins"] for r in rec]}
        shutil.rmtree(trainer.run_dir)
    master, pure = out["fp32_master"], out["pure_bf16"]
    out["ok"] = (master["changed_fraction"] > 0.9 and pure["changed_fraction"] < 0.2
                 and master["stored_dtype"] == master["adam_state_dtype"] == "torch.float32"
                 and master["compute_dtype"] == "torch.bfloat16" and master["losses"][-1] < master["losses"][0])
    return out


def lora(root: Path, kind: str, steps: int) -> dict:
    trainer = build(root, kind, "model.lora.enabled=true", "model.lora.r=8", "lr=1e-3" if kind == "cuda" else "lr=5e-3",
                    f"n_examples={8 * steps}")
    trainer.train()
    rec = records(trainer)
    dtypes = {("adapter" if "lora_" in n else "base"): str(local(p).dtype) for n, p in trainer.policy.named_parameters()}
    grads_ok = all(p.grad is None for p in trainer.policy.parameters())  # zeroed after each step
    out = {"losses": [r["loss"] for r in rec], "margins": [r["rewards/margins"] for r in rec], "dtypes": dtypes,
           "compute_dtype": compute_dtype_seen(trainer)}
    out["ok"] = (grads_ok and dtypes == {"adapter": "torch.float32", "base": "torch.bfloat16"}
                 and out["compute_dtype"] == "torch.bfloat16" and rec[-1]["rewards/margins"] > rec[0]["rewards/margins"])
    return out


def dcp_resume(root: Path, kind: str) -> dict:
    """3 steps with a sharded-only checkpoint at step 2; then LATEST back to step 2, resume, step 3 again."""
    run = ["exp_name=resume", f"lr={LR[kind]}", "n_examples=24", "intermediate_checkpoints=16"]
    first = build(root, kind, *run)
    first.train()
    uninterrupted = records(first)
    step2, step3 = checkpoints.checkpoint_dirs(first.run_dir)
    sharded_only = not (step2 / "policy.pt").exists() and (step2 / checkpoints.SHARDED / ".metadata").is_file()
    state_gib = sum(f.stat().st_size for f in (step2 / checkpoints.SHARDED).iterdir()) / 2 ** 30
    checkpoints.point_latest(first.run_dir, step2)
    shutil.rmtree(step3)  # disk: at 1B a checkpoint is ~15 GB of fp32 weights and AdamW moments
    resumed = build(root, kind, *run, "resume=true")
    assert resumed.step == 2
    resumed.train()
    again = records(resumed)
    diff = abs(again[-1]["loss"] - uninterrupted[-1]["loss"])
    tolerance = 1e-5 if kind == "cpu" else 1e-3  # GPU kernels are not bitwise deterministic by default
    return {"sharded_only_intermediate": sharded_only, "sharded_state_gib": round(state_gib, 2),
            "step3_loss": uninterrupted[-1]["loss"],
            "step3_loss_resumed": again[-1]["loss"], "abs_difference": diff, "tolerance": tolerance,
            "ok": sharded_only and [r["step"] for r in again] == [1, 2, 3] and diff <= tolerance}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny model on CPU (what the test suite runs)")
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per check (default 6 CPU, 8 GPU)")
    args = parser.parse_args(argv)
    kind = "cpu" if args.cpu else "cuda"
    if kind == "cuda" and not torch.cuda.is_available():
        print("gpu_check_precision: error: no CUDA device; run with --cpu for the CPU version", file=sys.stderr)
        return 2
    steps = args.steps or (6 if kind == "cpu" else 8)
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(0) if kind == "cuda" else "cpu",
              "model": "tiny" if kind == "cpu" else "llama-3.2-1b (random init)", "torch": torch.__version__,
              "checks": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_precision_") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = Path(tmp)
        for name, check in (("master_weights", lambda where: master_weights(where, kind, steps)),
                            ("lora", lambda where: lora(where, kind, steps)),
                            ("dcp_resume", lambda where: dcp_resume(where, kind))):
            t0 = time.perf_counter()
            try:
                result["checks"][name] = check(root / name)
            except Exception as e:  # noqa: BLE001 - a failing check is a result to report, not a crash
                result["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            result["checks"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            shutil.rmtree(root / name, ignore_errors=True)  # its checkpoints, before the next check writes its own
            if kind == "cuda":
                result["checks"][name]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                torch.cuda.reset_peak_memory_stats()
    result["ok"] = all(c["ok"] for c in result["checks"].values())
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
