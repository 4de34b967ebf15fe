"""Precision, rank-0 loading and sharded state on the real tiny model.

One process: bf16 compute with fp32 master weights learns at lr 1e-6 like fp32 (its losses are bf16's, not fp32's)
while pure bf16 storage warns and learns almost nothing; every stored part has its dtype; dtype settings fail
before anything is written; intermediate checkpoints are sharded only; a checkpoint's metadata cannot run code;
an unknown GPU logs no MFU instead of aborting; `tools/gpu_check_precision.py --cpu` (FSDP2 in one process).

Two processes (one torchrun launch of this file as a driver, gloo): a rank that built the model on the meta device
holds rank 0's weights bit for bit after the broadcast (and the bf16 reference copied from them); LoRA with bf16
compute trains under FSDP2; a run saved by 2 processes resumes in 1 with the uninterrupted run's per-step losses;
QLoRA with 2 processes stops with one line.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch

from feedbackalign import builders, checkpoints, models, throughput
from feedbackalign.errors import CheckpointError, ConfigError
from helpers import REPO, make_config, make_trainer, run_script
from test_distributed import torchrun

LN2 = math.log(2)
BF16 = ["++model.compute_dtype=bfloat16"]
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"]


def losses(trainer) -> list[dict]:
    """The training steps' records (not the evaluation after the last step)."""
    records = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    return [r for r in records if "loss" in r]


def dpo_at_lr_1e6(run_root, *overrides):
    """8 DPO steps at lr 1e-6 (real models train at 5e-7); returns (trainer, per-step records, fraction of
    policy weights the run changed)."""
    trainer = make_trainer(run_root, "loss=dpo", "lr=1e-6", "n_examples=64", *overrides)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.train()
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in trainer.policy.named_parameters())
    return trainer, losses(trainer), changed / sum(p.numel() for p in trainer.policy.parameters())


def matmul_output_dtype(trainer) -> torch.dtype:
    """The output dtype of the policy's first Linear (the packed forward's LM head returns fp32 log-probs)."""
    seen = []
    linear = next(m for m in trainer.policy.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    trainer.policy_logps(next(iter(trainer.train_loader)), grad=False)
    handle.remove()
    return seen[0]


def late_margin(records) -> float:
    return sum(r["rewards/margins"] for r in records[-3:]) / 3


def test_bf16_compute_with_fp32_master_weights_learns_like_fp32_and_pure_bf16_does_not(tmp_path):
    fp32, fp32_log, fp32_changed = dpo_at_lr_1e6(tmp_path / "fp32")
    mixed, mixed_log, mixed_changed = dpo_at_lr_1e6(tmp_path / "mixed", *BF16)
    with pytest.warns(UserWarning, match=r"model\.policy_dtype=bfloat16 stores the TRAINED weights .* learns little"):
        _, pure_log, pure_changed = dpo_at_lr_1e6(tmp_path / "pure", *BF16, "model.policy_dtype=bfloat16",
                                                  "model.reference_dtype=bfloat16")
    # fp32 master weights and AdamW moments, computed in bf16 (autocast: one process, not sharded)
    assert {p.dtype for p in mixed.policy.parameters()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in mixed.optimizer.state.values()} == {torch.float32}
    assert matmul_output_dtype(mixed) == torch.bfloat16 and matmul_output_dtype(fp32) == torch.float32
    # every weight moves and the margin grows as in fp32 (within 2x); the losses are bf16's, not fp32's
    assert fp32_changed > 0.99 and mixed_changed > 0.99
    assert late_margin(fp32_log) > 1e-3 and 0.5 < late_margin(mixed_log) / late_margin(fp32_log) < 2
    assert mixed_log[-1]["loss"] < LN2 - 1e-3 and fp32_log[-1]["loss"] < LN2 - 1e-3
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(fp32_log[1:], mixed_log[1:])]
    assert max(differences) > 1e-6 and max(differences) < 1e-3
    # pure bf16: almost every AdamW update rounds away
    assert pure_changed < 0.05 and late_margin(pure_log) < 0.25 * late_margin(fp32_log)
    print(f"lr 1e-6, 8 steps: changed fp32 {fp32_changed:.4f}, fp32 master + bf16 compute {mixed_changed:.4f}, pure "
          f"bf16 {pure_changed:.4f}; late margins {late_margin(fp32_log):.2e} / {late_margin(mixed_log):.2e} / "
          f"{late_margin(pure_log):.2e}")


def test_stored_dtypes_frozen_weights_in_bf16_trained_in_fp32_rotary_buffers_fp32(tmp_path):
    """reference_dtype stores the reference and a LoRA run's base; adapters are trained in fp32 with fp32
    gradients; the rotary inverse frequencies stay fp32 (casting them would shift long positions)."""
    full = make_trainer(tmp_path / "full", "loss=dpo", *BF16, "model.reference_dtype=bfloat16")
    assert {p.dtype for p in full.reference.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in full.reference.buffers()} == {torch.float32}
    assert {p.dtype for p in full.policy.parameters()} == {torch.float32}

    lora = make_trainer(tmp_path / "lora", "loss=dpo", *BF16, *LORA, "model.reference_dtype=bfloat16",
                        "model.activation_checkpointing=true")  # recomputation in backward keeps the bf16 autocast
    dtypes = {("adapter" if "lora_" in n else "base"): p.dtype for n, p in lora.policy.named_parameters()}
    assert dtypes == {"adapter": torch.float32, "base": torch.bfloat16}
    assert {b.dtype for b in lora.policy.buffers()} == {torch.float32}
    batch = next(iter(lora.train_loader))
    policy, reference = lora.forward(batch)
    loss, _ = lora.loss(batch, policy, reference, None)
    assert loss.item() == pytest.approx(LN2, abs=1e-6)  # the reference is the policy with adapters off: same compute
    loss.backward()
    grads = {p.grad.dtype for p in lora.policy.parameters() if p.grad is not None}
    assert grads == {torch.float32}
    assert all(p.grad is None for n, p in lora.policy.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("overrides, message", [
    (["++model.compute_dtype=float16"], r"model\.compute_dtype=float16 is not supported: use bfloat16"),
    (["model.reference_dtype=bfloat16"], r"model\.reference_dtype=bfloat16 stores weights in lower precision than "
                                         r"model\.compute_dtype=float32"),
    (["model.policy_dtype=int8"], r"model dtype 'int8' is unknown"),
    (["consolidate_checkpoints=sometimes"], r"consolidate_checkpoints=sometimes is not one of final, all"),
    (["use_fsdp=true", *LORA, "model.lora.load_in_4bit=true"], r"load_in_4bit=true \(QLoRA\) trains in one process"),
])
def test_precision_and_checkpoint_settings_fail_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_trainer(tmp_path, "loss=dpo", *overrides)
    assert not any(tmp_path.iterdir())


def test_intermediate_checkpoints_are_sharded_only_and_read_back_like_consolidated_ones(tmp_path):
    """Every checkpoint holds the DCP state; policy.pt only the final one (or every one, consolidate=all). An
    intermediate checkpoint's weights read from its shards equal the consolidated policy.pt of the same step."""
    run = ["loss=sft", "n_examples=16", "intermediate_checkpoints=8", "keep_checkpoints=3"]
    sharded = make_trainer(tmp_path / "sharded", *run)
    sharded.train()
    first, final = checkpoints.checkpoint_dirs(sharded.run_dir)
    assert (first / "state" / ".metadata").is_file() and not (first / "policy.pt").exists()
    assert (final / "policy.pt").is_file() and (final / "state" / ".metadata").is_file()
    everywhere = make_trainer(tmp_path / "all", *run, "consolidate_checkpoints=all")
    everywhere.train()
    consolidated = checkpoints.load_policy_weights(checkpoints.checkpoint_dirs(everywhere.run_dir)[0])
    from_shards = checkpoints.load_policy_weights(first)
    assert sorted(from_shards) == sorted(consolidated)
    assert all(torch.equal(from_shards[k], consolidated[k]) for k in consolidated)


class RunsCode:
    """A pickle payload that would create a file if unpickled with pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def dotted_global_call(module: str, name: str, argument: str) -> bytes:
    """A protocol-4 pickle that calls `module`'s attribute path `name` (e.g. "os.system") on `argument`."""
    def text(x):
        return b"\x8c" + bytes([len(x.encode())]) + x.encode()  # SHORT_BINUNICODE
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(argument) + b"\x85R."  # STACK_GLOBAL TUPLE1 REDUCE


@pytest.mark.parametrize("payload, refused", [
    ("reduce", r"posix\.system"),
    ("dotted", r"torch\.distributed\.checkpoint\.filesystem\.os\.system"),  # a path through an allowed module
])
def test_a_crafted_checkpoint_metadata_cannot_run_code(tmp_path, payload, refused):
    trainer = make_trainer(tmp_path, "loss=sft", "n_examples=8")
    trainer.train()
    marker = tmp_path / "code-ran"
    metadata = checkpoints.latest_dir(trainer.run_dir) / "state" / ".metadata"
    metadata.write_bytes(pickle.dumps(RunsCode(marker)) if payload == "reduce" else
                         dotted_global_call("torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}"))
    with pytest.raises(CheckpointError, match=rf"cannot read .*\.metadata \({refused} is not part of a checkpoint's "
                                              r"metadata\)"):
        make_trainer(tmp_path, "loss=sft", "n_examples=8", "resume=true")
    assert not marker.exists()


def test_an_unknown_gpu_logs_no_mfu_with_a_note_instead_of_aborting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery X1")
    with pytest.warns(UserWarning, match="no known peak for GPU 'NVIDIA Mystery X1': MFU is not logged; set peak_flops"):
        assert throughput.peak_flops(None, torch.device("cuda", 0), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert throughput.peak_flops(None, torch.device("cuda", 0), torch.bfloat16) == throughput.GPU_PEAKS["H200"]


def test_an_empty_model_has_meta_parameters_real_buffers_and_its_ties():
    """What ranks other than 0 build: no parameter memory (even at 1.2B), the computed rotary buffers, the tie of
    embeddings and LM head (which FSDP2 must see as one parameter)."""
    empty = models.build_model("tiny", torch.float32, empty=True)
    full = models.build_model("tiny", torch.float32)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(empty.buffers(), full.buffers()))
    big = models.build_model("random", torch.float32, architecture="llama-3.2-1b", empty=True)
    assert sum(p.numel() for p in big.parameters()) > 1.2e9 and {p.device.type for p in big.parameters()} == {"meta"}


def test_gpu_check_precision_runs_on_cpu(tmp_path):
    """The GPU check script's CPU mode: FSDP2 in one process (use_fsdp=true), bf16 compute on fp32 shards against
    pure bf16, LoRA under FSDP2, a resume from a sharded-only checkpoint."""
    out = tmp_path / "precision.json"
    result = run_script(str(REPO / "tools" / "gpu_check_precision.py"), "--cpu", "--steps", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert all(check["ok"] for check in checks.values()), checks
    assert checks["master_weights"]["fp32_master"]["changed_fraction"] > 0.99
    assert checks["master_weights"]["pure_bf16"]["changed_fraction"] < 0.05
    assert checks["dcp_resume"]["abs_difference"] <= 1e-5


# ---------------------------------------------------------------- two processes

DCP_RUN = ["loss=dpo", "model.batch_size=8", "++dataset_options.wordsort.n_prompts=32", "n_eval_examples=0",
           "warmup_steps=1", "export_hf=false"]
CASES = {
    # model.load_from = weights no rank could draw from a seed: only a broadcast can give rank 1 these
    "broadcast": ["loss=dpo", *BF16, "model.reference_dtype=bfloat16", "n_examples=16"],
    "lora": ["loss=dpo", *BF16, *LORA, "model.reference_dtype=bfloat16", "lr=5e-3", "n_examples=48",
             "n_eval_examples=0"],
    "dcp": [*DCP_RUN, "n_examples=16"],
    "qlora": ["loss=dpo", *LORA, "model.lora.load_in_4bit=true"],
}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision_two_ranks")
    start = models.build_model("tiny", torch.float32, seed=7).state_dict()
    torch.save({"step_idx": 0, "state": start, "metrics": {}}, root / "start.pt")
    result = torchrun(__file__, str(root), *CASES, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def rank_report(root: Path, rank: int) -> dict:
    return json.loads((root / f"rank{rank}.json").read_text())


def test_a_rank_built_on_meta_holds_rank0s_weights_bit_for_bit(two_processes):
    start = torch.load(two_processes / "start.pt", weights_only=True)["state"]
    held = torch.load(two_processes / "rank1_weights.pt", weights_only=True)
    r0, r1 = rank_report(two_processes, 0)["broadcast"], rank_report(two_processes, 1)["broadcast"]
    assert r1["built_on"] == ["meta"] and r0["built_on"] == ["cpu"]   # rank 1 never had weights of its own
    assert r1["weights_read"] == 0 and r0["weights_read"] == 1         # only rank 0 read model.load_from
    assert sorted(held["policy"]) == sorted(start)
    assert all(torch.equal(held["policy"][k], start[k]) for k in start)
    assert all(torch.equal(held["reference"][k], start[k].to(torch.bfloat16)) for k in start)
    assert r1["tied"] and r1["policy_shard_dtypes"] == ["torch.float32"]


def test_lora_trains_under_fsdp2_with_bf16_compute_on_two_processes(two_processes):
    report = rank_report(two_processes, 0)["lora"]
    records = [json.loads(line) for line in (two_processes / "lora" / "dpo_tiny" / "metrics.jsonl").read_text()
               .splitlines()]
    margins = [r["rewards/margins"] for r in records]
    assert margins[0] == 0.0 and min(margins[-2:]) > 0.05
    assert records[-1]["loss"] < LN2 - 0.01
    assert report["dtypes"] == {"adapter": "torch.float32", "base": "torch.bfloat16"}


def test_a_run_saved_by_two_processes_resumes_in_one_with_the_uninterrupted_losses(two_processes, tmp_path):
    saved = two_processes / "dcp" / "dpo_tiny"
    shards = sorted(p.name for p in (checkpoints.latest_dir(saved) / "state").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]                 # each rank wrote its own shard
    one = [*DCP_RUN, "n_examples=24", "model.gradient_accumulation_steps=2"]
    make_trainer(tmp_path / "full", *one).train()
    resumed = make_trainer(tmp_path / "resumed", *one, f"resume={saved}")
    assert resumed.step == 2 and not distributed_is_sharded(resumed)
    resumed.train()
    uninterrupted = [json.loads(line) for line in (tmp_path / "full" / "dpo_tiny" / "metrics.jsonl").read_text()
                     .splitlines()]
    after = [json.loads(line) for line in (saved / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [r["step"] for r in uninterrupted] == [1, 2, 3]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(after, uninterrupted))
    print(f"2 processes -> resumed in 1: max |loss - uninterrupted| = {worst:.2e}")
    assert worst <= 1e-5


def distributed_is_sharded(trainer) -> bool:
    from feedbackalign import distributed

    return distributed.is_sharded(trainer.policy)


def test_qlora_with_two_processes_stops_with_one_line(two_processes):
    for rank in (0, 1):
        message = rank_report(two_processes, rank)["qlora"]
        assert "model.lora.load_in_4bit=true (QLoRA) trains in one process, but this run has 2 processes" in message
        assert "\n" not in message


def drive(root: Path, names: list[str]) -> None:
    """Driver (run by torchrun): each case in this process group; rank<r>.json reports what each rank saw."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from feedbackalign import distributed

    rank, local_rank, world_size = distributed.world_from_env()
    device = distributed.init(rank, local_rank, world_size)
    report: dict = {}
    built_on, reads = [], []
    build_policy, read_weights = builders.build_policy, checkpoints.load_policy_weights

    def recording_build_policy(*args, **kwargs):
        policy = build_policy(*args, **kwargs)
        built_on.append(next(policy.parameters()).device.type)
        return policy

    def recording_read(*args, **kwargs):
        reads.append(args)
        return read_weights(*args, **kwargs)

    builders.build_policy, checkpoints.load_policy_weights = recording_build_policy, recording_read
    try:
        for name in names:
            cfg = make_config(root / name, *CASES[name])
            if name == "broadcast":
                cfg = make_config(root / name, *CASES[name], f"model.load_from={root / 'start.pt'}")
                trainer = builders.build_trainer(cfg, rank, world_size, device)
                full = StateDictOptions(full_state_dict=True)  # every rank gathers the whole tensors
                held = {"policy": get_model_state_dict(trainer.policy, options=full),
                        "reference": get_model_state_dict(trainer.reference, options=full)}
                if rank == 1:
                    torch.save(held, root / "rank1_weights.pt")
                policy = trainer.policy
                report[name] = {"built_on": list(built_on), "weights_read": len(reads),
                                "tied": policy.lm_head.weight is policy.model.embed_tokens.weight,
                                "policy_shard_dtypes": sorted({str(p.to_local().dtype) for p in policy.parameters()})}
            elif name == "lora":
                trainer = builders.build_trainer(cfg, rank, world_size, device)
                trainer.train()
                report[name] = {"dtypes": {("adapter" if "lora_" in n else "base"): str(p.to_local().dtype)
                                           for n, p in trainer.policy.named_parameters()}}
            elif name == "qlora":
                try:
                    builders.build_trainer(cfg, rank, world_size, device)
                    report[name] = "no error"
                except ConfigError as e:
                    report[name] = str(e)
            else:
                builders.build_trainer(cfg, rank, world_size, device).train()
    finally:
        builders.build_policy, checkpoints.load_policy_weights = build_policy, read_weights
        (root / f"rank{rank}.json").write_text(json.dumps(report))
        distributed.shutdown()


if __name__ == "__main__":
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    warnings.simplefilter("ignore")
    drive(Path(sys.argv[1]), sys.argv[2:])
