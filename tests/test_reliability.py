"""What a crash, a full disk or a typo does to a run: nothing is lost or corrupted, and the user reads one line.

- exp_name is one directory name; overwrite=true deletes only that run's directory, after every other check.
- Config values are checked before anything touches disk (the bad-input corpus, extended to configs).
- metrics.jsonl: every line fsync'd before the next step (seen at the syscall); a torn last line is cut on resume.
- Full disks, real ones (tmpfs in a mount namespace, /dev/full): checkpoint refused up front or failing mid-write,
  the reference cache and an atomic JSON write failing mid-write; LATEST untouched, temporaries removed.
- An eval split smaller than one batch is evaluated whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from feedbackalign import checkpoints, fileio, validation
from feedbackalign.errors import ConfigError, DataError, EnvError
from helpers import REPO, make_config, make_trainer, run_script
from feedbackalign.throughput import TIMING_METRICS


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def cache_dir_with_neighbours(root: Path) -> Path:
    """A cache_dir holding another run and the reference cache: what no exp_name or overwrite may touch."""
    cache_dir = root / "runs"
    (cache_dir / "other_run" / "checkpoints").mkdir(parents=True)
    (cache_dir / "other_run" / "config.yaml").write_text("exp_name: other_run\n")
    (cache_dir / "reference_cache").mkdir()
    (cache_dir / "reference_cache" / "0123.sqlite").write_bytes(b"entries")
    return cache_dir


# ---------------------------------------------------------------- exp_name and overwrite


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", " "])
def test_exp_name_must_be_one_directory_name(tmp_path, name):
    """Before: exp_name=. with overwrite=true deleted cache_dir (other runs, the reference cache); ../x wrote
    outside it."""
    cache_dir_with_neighbours(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"exp_name=.* must be one directory name"):
        builders_build(tmp_path / "runs", f"exp_name='{name}'", "overwrite=true")
    assert snapshot(tmp_path) == before


def builders_build(cache_dir, *overrides):
    from feedbackalign import builders

    return builders.build_trainer(make_config(cache_dir, *overrides), 0, 1, torch.device("cpu"))


def test_overwrite_replaces_the_run_directory_and_nothing_else(tmp_path):
    cache_dir = cache_dir_with_neighbours(tmp_path)
    mine = cache_dir / "mine"
    (mine / "checkpoints" / "step-000009").mkdir(parents=True)
    (mine / "config.yaml").write_text("exp_name: mine\n")
    (mine / "stale.txt").write_text("from the run being replaced")
    neighbours = {k: v for k, v in snapshot(cache_dir).items() if not k.startswith("mine")}

    with pytest.raises(ConfigError, match="lr=-1 must be > 0"):       # a bad value: refused before any deletion
        builders_build(cache_dir, "exp_name=mine", "overwrite=true", "lr=-1")
    assert (mine / "stale.txt").is_file()
    with pytest.raises(ConfigError, match="already exists"):
        builders_build(cache_dir, "exp_name=mine")

    trainer = builders_build(cache_dir, "exp_name=mine", "overwrite=true", "loss=sft")
    assert trainer.run_dir == mine and not (mine / "stale.txt").exists() and not (mine / "checkpoints").exists()
    assert "exp_name: mine" in (mine / "config.yaml").read_text() and "loss:" in (mine / "config.yaml").read_text()
    assert {k: v for k, v in snapshot(cache_dir).items() if not k.startswith("mine")} == neighbours


def test_overwrite_refuses_what_is_not_a_run_directory_or_holds_the_reference_cache(tmp_path):
    cache_dir = tmp_path / "runs"
    notes = cache_dir / "notes"
    notes.mkdir(parents=True)
    (notes / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"not a run directory \(no config.yaml\)"):
        builders_build(cache_dir, "exp_name=notes", "overwrite=true")
    assert (notes / "thesis.tex").read_text() == "years of work"

    run = cache_dir / "run"
    (run / "refcache").mkdir(parents=True)
    (run / "config.yaml").write_text("exp_name: run\n")
    (run / "refcache" / "entries.sqlite").write_bytes(b"entries")
    with pytest.raises(ConfigError, match="holds reference_cache_dir"):
        builders_build(cache_dir, "exp_name=run", "overwrite=true", f"reference_cache_dir={run / 'refcache'}")
    assert (run / "refcache" / "entries.sqlite").read_bytes() == b"entries"


def test_a_new_run_keeps_a_reference_cache_built_inside_its_own_directory(tmp_path):
    """The cache pass creates <run_dir>/refcache before the run directory is set up; that is not an old run to
    replace (it used to be deleted under the open cache)."""
    cache = tmp_path / "dpo_tiny" / "refcache"
    trainer = make_trainer(tmp_path, "loss=dpo", "n_examples=8", "cache_reference_logprobs=true",
                           f"reference_cache_dir={cache}")
    assert trainer.reference_cache.path.parent == cache and trainer.reference_cache.path.is_file()
    assert trainer.train_step([next(iter(trainer.train_loader))])["loss"] > 0


# ---------------------------------------------------------------- config values, before anything touches disk

BAD_VALUES = [
    (["lr=-1"], "lr=-1 must be > 0"),
    (["lr=0"], "lr=0 must be > 0"),
    (["lr=fast"], "lr=fast is not a number"),
    (["loss=dpo", "loss.beta=-0.1"], r"loss.beta=-0.1 must be > 0 \(the inverse temperature"),
    (["loss=dpo", "loss.beta=0"], "loss.beta=0 must be > 0"),
    (["loss=ipo", "loss.tau=0"], "loss.tau=0 must be > 0"),
    (["loss=nca", "loss.alpha=0"], "loss.alpha=0 must be > 0"),
    (["loss=orpo", "loss.alpha=-1"], "loss.alpha=-1 must be > 0"),
    (["loss=cdpo", "loss.label_smoothing=0.5"], r"loss.label_smoothing=0.5 must be in \[0, 0.5\)"),
    (["loss=kto", "loss.desirable_weight=-1"], "loss.desirable_weight=-1 must be >= 0"),
    (["loss=kto", "loss.desirable_weight=0", "loss.undesirable_weight=0"], "nothing to learn"),
    (["loss=slic", "loss.delta=0"], "loss.delta=0 must be > 0"),
    (["loss=simpo", "loss.gamma_beta_ratio=-0.5"], "loss.gamma_beta_ratio=-0.5 must be >= 0"),
    (["loss=cut", "loss.weight_unlike=-1"], "loss.weight_unlike=-1 must be >= 0"),
    (["loss=ppo", "loss.cliprange=1.5"], r"loss.cliprange=1.5 must be in \(0, 1\)"),
    (["loss=ppo", "loss.gamma=1.1"], r"loss.gamma=1.1 must be in \[0, 1\]"),
    (["loss=grpo", "loss.epsilon=0"], r"loss.epsilon=0 must be in \(0, 1\)"),
    (["loss=grpo", "loss.beta=-0.01"], r"loss.beta=-0.01 must be >= 0 \(GRPO's KL-penalty weight"),
    (["model.batch_size=6", "model.gradient_accumulation_steps=4"],
     r"model.batch_size=6 must be a multiple of processes x model.gradient_accumulation_steps = 1 x 4 = 4"),
    (["model.batch_size=0"], "model.batch_size=0 must be an integer >= 1"),
    (["model.eval_batch_size=0"], "model.eval_batch_size=0 must be an integer >= 1"),
    (["model.max_prompt_length=128", "model.max_length=128"],
     "model.max_prompt_length=128 must be < model.max_length=128"),
    (["model.max_grad_norm=0"], "model.max_grad_norm=0 must be > 0"),
    (["model.forward_layout=flat"], "model.forward_layout=flat is not one of packed, padded"),
    (["model.lora.enabled=true", "model.lora.r=0"], "model.lora.r=0 must be an integer >= 1"),
    (["n_examples=0"], "n_examples=0 must be an integer >= 1 or null"),
    (["n_epochs=1.5"], "n_epochs=1.5 must be an integer >= 1 or null"),
    (["eval_every=0"], "eval_every=0 must be an integer >= 1"),
    (["warmup_steps=-1"], "warmup_steps=-1 must be an integer >= 0"),
    (["weight_decay=-0.1"], "weight_decay=-0.1 must be >= 0"),
    (["lr_schedule=cosin"], "lr_schedule=cosin is not one of constant, linear, cosine"),
    (["optimizer=Adamw"], "optimizer=Adamw is not a torch.optim optimizer"),
    (["max_nonfinite_steps=0"], "max_nonfinite_steps=0 must be an integer >= 1"),
    (["use_fsdp=maybe"], "use_fsdp=maybe is not one of auto, True, False"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_fail_naming_the_key_before_anything_touches_disk(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        builders_build(tmp_path, "exp_name=run", "cache_reference_logprobs=true", *overrides)
    assert not any(tmp_path.iterdir())


def test_batch_sizes_must_split_over_the_processes():
    cfg = make_config("unused", "model.batch_size=8", "model.eval_batch_size=8")
    validation.validate(cfg, world_size=2)
    validation.validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"model.batch_size=8 must be a multiple of processes x "
                                          r"model.gradient_accumulation_steps = 3 x 1 = 3.*model.batch_size=6"):
        validation.validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match=r"model.eval_batch_size=8 must be a multiple of the 3 processes"):
        validation.validate(make_config("unused", "model.batch_size=9", "model.eval_batch_size=8"), world_size=3)


def test_every_shipped_config_passes_validation():
    for loss in sorted(p.stem for p in (REPO / "config" / "loss").glob("*.yaml")):
        validation.validate(make_config("unused", f"loss={loss}"))
    for model in sorted(p.stem for p in (REPO / "config" / "model").glob("*.yaml")):
        if model != "base_model":
            cfg = make_config("unused", f"model={model}")
            validation.validate(cfg, world_size=cfg.model.batch_size // cfg.model.gradient_accumulation_steps)


def test_train_py_bad_value_is_one_line_exit_2_and_nothing_on_disk(tmp_path):
    result = run_script(str(REPO / "train.py"), "loss=dpo", "loss.beta=-0.1", f"cache_dir={tmp_path / 'runs'}",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "train.py: error: loss.beta=-0.1 must be > 0 (the inverse temperature of the implicit reward (DPO, KTO, "
        "NCA, SimPO); <= 0 reverses or removes the preference)"]
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- metrics.jsonl: durable lines, torn tail repaired


def test_every_metrics_line_is_fsynced_before_the_next_step(tmp_path, monkeypatch):
    """Seen at the syscall: after each step's line is written, an fsync of metrics.jsonl's descriptor finds the
    file at exactly that line's end (a SIGKILL keeps the page cache, so only this shows a missing fsync)."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        real_fsync(fd)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    trainer = make_trainer(tmp_path, "loss=sft", "n_examples=24", "optimizer=SGD", "eval_every=8")
    trainer.train()
    path = str(trainer.metrics_path)
    ends, end = [], 0
    for line in trainer.metrics_path.read_bytes().splitlines(keepends=True):
        end += len(line)
        ends.append(end)
    assert len(ends) == 3
    assert [size for name, size in synced if name == path] == ends


def test_every_checkpoint_file_is_fsynced_before_latest_moves(tmp_path, monkeypatch):
    """Seen at the syscall, by inode (so a rename after the fsync counts): every file of the new checkpoint and
    the directories holding it are fsync'd while LATEST still names the previous checkpoint, and the run
    directory once LATEST names the new one."""
    trainer = make_trainer(tmp_path, "loss=sft", "n_examples=8", "export_hf=true")
    trainer.save()
    latest = trainer.run_dir / "LATEST"
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        real_fsync(fd)
        synced.append((os.fstat(fd).st_ino, os.readlink(latest)))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    previous = os.readlink(latest)
    trainer.step = 1
    trainer.save()
    new = latest.resolve()
    assert os.readlink(latest) != previous
    before = {inode for inode, pointing in synced if pointing == previous}
    files = [p for p in new.rglob("*") if p.is_file()]
    assert len(files) >= 5 and (new / "hf" / "config.json") in files
    assert {p.stat().st_ino for p in [*files, new, new.parent]} <= before
    assert trainer.run_dir.stat().st_ino in {inode for inode, pointing in synced if pointing != previous}


def test_read_json_lines_cuts_only_a_torn_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert fileio.read_json_lines(path) == ([{"step": 1}, {"step": 2}], True)
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n\0\0\0\0')                  # zeros a crash can leave
    assert fileio.read_json_lines(path) == ([{"step": 1}, {"step": 2}], True)
    path.write_bytes(b'{"step": 1}\n{"step": 2}')                            # whole, only the newline lost
    assert fileio.read_json_lines(path) == ([{"step": 1}, {"step": 2}], False)
    path.write_bytes(b'{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(DataError, match=rf"{path} line 2 is not a JSON object"):
        fileio.read_json_lines(path)


def test_a_torn_last_metrics_line_is_cut_on_resume(tmp_path):
    """A crash during step 3 (after checkpoint 2) left half a line and zeros: resume=true cuts them and writes
    step 3 again (and the final evaluation after it), equal to the uninterrupted run's."""
    run = ["loss=sft", "exp_name=run", "n_examples=24", "intermediate_checkpoints=8", "keep_checkpoints=3",
           "deterministic=true"]
    full = make_trainer(tmp_path, *run)
    full.train()
    torch.use_deterministic_algorithms(False)
    lines = full.metrics_path.read_bytes().splitlines(keepends=True)
    checkpoints.point_latest(full.run_dir, full.run_dir / "checkpoints" / "step-000002")
    full.metrics_path.write_bytes(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2] + b"\0" * 64)

    resumed = make_trainer(tmp_path, *run, "resume=true")
    assert resumed.step == 2
    resumed.train()
    torch.use_deterministic_algorithms(False)
    records = [json.loads(line) for line in resumed.metrics_path.read_text().splitlines()]
    expected = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [r["step"] for r in expected] == [1, 2, 3, 3]   # the last: final eval
    assert records[:2] == expected[:2]
    for record, reference in zip(records[2:], expected[2:]):
        assert {k: v for k, v in record.items() if k not in TIMING_METRICS} == \
            pytest.approx({k: v for k, v in reference.items() if k not in TIMING_METRICS}, rel=1e-5)


# ---------------------------------------------------------------- full disks


def test_metrics_on_a_full_device_is_one_line_naming_the_file(tmp_path):
    """/dev/full: every write fails with the kernel's ENOSPC."""
    trainer = make_trainer(tmp_path, "loss=sft", "n_examples=8")
    trainer.metrics_path = Path("/dev/full")
    with pytest.raises(EnvError, match=r"^no space left on the device of /dev/full for the metrics: it needs at "
                                       r"least \d+ B and the disk filled up while writing it .*resume=true"):
        trainer.log({"loss": 1.0})


def namespaces_work() -> bool:
    """`unshare -rm` can mount a tmpfs here (user namespaces allowed): the full-disk tests need it."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d "
                            "&& umount $d && rmdir $d"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def full_disks(tmp_path_factory):
    """tests/full_disk_driver.py in a mount namespace with four small real tmpfs disks."""
    if not namespaces_work():
        pytest.skip("no mount namespaces here (unshare -rm): cannot make a small real disk to fill")
    out = tmp_path_factory.mktemp("full_disks")
    sizes = {"disk_a": "100m", "disk_b": "100m", "disk_c": "48k", "disk_d": "64k"}
    mounts = []
    for name, size in sizes.items():
        (out / name).mkdir()
        mounts.append(f"mount -t tmpfs -o size={size} tmpfs {out / name}")
    script = (f"{' && '.join(mounts)} && exec {sys.executable} {REPO / 'tests' / 'full_disk_driver.py'} {out} "
              f"{' '.join(str(out / name) for name in sizes)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=out, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "report.json").read_text()), out


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(full_disks):
    case = full_disks[0]["refused"]
    assert case["rc"] == 2 and not case["traceback"]
    assert case["last_line"].startswith("train.py: error: no space left on the device of ")
    assert re.search(r"/run/checkpoints for the checkpoint of step 2: it needs 62\.9 MB, \d+\.\d MB free",
                     case["last_line"])
    assert "free; free space (or lower keep_checkpoints), then resume=true" in case["last_line"]
    assert case["latest"] == "checkpoints/step-000001" and case["latest_loads"]
    assert case["entries"] == ["step-000001"]                           # no temporary
    assert case["metrics_steps"] == [1, 2]


def test_a_checkpoint_failing_mid_write_is_removed_and_resume_finishes_after_space_is_freed(full_disks):
    case = full_disks[0]["mid_write"]
    assert case["rc"] == 2 and not case["traceback"]
    assert re.search(r"for the checkpoint of step 2: it needs at least 62\.9 MB and the disk filled up while "
                     r"writing it \(\d+\.\d MB free now\)", case["last_line"])  # free again after the cleanup
    assert case["latest"] == "checkpoints/step-000001" and case["latest_loads"]
    assert case["entries"] == ["step-000001"]                           # the half-written save was removed
    assert case["free_after"] > 30e6                                    # ... and its space given back
    resumed = full_disks[0]["resumed"]
    assert resumed["rc"] == 0 and resumed["latest"] == "checkpoints/step-000003" and resumed["latest_loads"]
    assert resumed["entries"] == ["step-000001", "step-000002", "step-000003"]
    assert resumed["metrics_steps"] == [1, 2, 3]


def test_the_reference_cache_on_a_full_disk_stops_cleanly_and_stays_whole(full_disks):
    case = full_disks[0]["cache"]
    assert case["rc"] == 2 and not case["traceback"]
    assert f"no space left on the device of {case['cache_files'][0]} for the reference cache (adding entries)" \
        in case["last_line"] and "entries already written are kept" in case["last_line"]
    assert case["integrity"] == "ok" and case["rows"] == case["rows_intact"] > 0      # earlier rounds kept, whole
    assert not case["run_dir_exists"]                                   # the run never started


def test_an_atomic_json_write_on_a_full_disk_keeps_the_old_file(full_disks):
    case = full_disks[0]["samples"]
    assert case["message"].startswith("EnvError: no space left on the device of ")
    assert "run.json for the samples: it needs at least 10" in case["message"] and " KB and the disk filled up" \
        in case["message"]
    assert case["content"] == {"old": True} and case["left"] == ["run.json"]


# ---------------------------------------------------------------- evaluation smaller than a batch


def test_an_eval_split_smaller_than_one_batch_is_evaluated_whole(tmp_path):
    """CUT with 16 eval items and eval batches of 32: before, 'fewer than one global batch' stopped the run."""
    trainer = make_trainer(tmp_path, "loss=cut", "n_eval_examples=16", "model.eval_batch_size=32")
    batches = list(trainer.eval_loader)
    assert [len(b.parts["judged"]) for b in batches] == [16]
    metrics = trainer.evaluate()
    with torch.no_grad():
        policy, reference = trainer.forward(batches[0])
        loss, _ = trainer.loss(batches[0], policy, reference, trainer.step_context(batches))
    assert metrics["eval/loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_eval_batches_keep_a_smaller_last_batch_split_over_processes(tiny_tokenizer):
    """23 eval items, batches of 8, 2 processes: 8 + 8 + 7 items, every item exactly once over both ranks."""
    import dataloader as dl
    from feedbackalign import task

    dataset = task.get_wordsort("test", n_prompts=23)
    seen = []
    for rank in (0, 1):
        loader = dl.SFTDataLoader([dataset], tiny_tokenizer, split="test", batch_size=8, rank=rank, world_size=2,
                                  shuffle=False, drop_last=False, n_examples=None, n_epochs=1)
        sizes = [len(b.parts["targets"]) for b in loader]
        assert sizes == ([4, 4, 4] if rank == 0 else [4, 4, 3])
        seen += [s.prompt_ids for b in loader for s in b.parts["targets"]]
    assert len(seen) == 23 and len(set(seen)) == 23
