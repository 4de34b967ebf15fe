"""`python tests/full_disk_driver.py <out_dir> <disk_a> <disk_b> <disk_c> <disk_d>`: run by tests/test_reliability.py
inside a mount namespace (`unshare`) where each <disk_*> is a small, real tmpfs. Runs train.py's `main` in this
process (one import for every case) as a user would run it, and records what the user sees (exit code, the
last stderr line) and what is left on each disk into <out_dir>/report.json; the disks vanish with the
namespace, so their run directories are copied to <out_dir>.

The up-front space check is switched off from here for the cases that must fail in the middle of a write (the
product has no test hook); the failure itself is the kernel's ENOSPC.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"

from feedbackalign import fileio  # noqa: E402

SMALL = ["++dataset_options.wordsort.n_prompts=24", "n_eval_examples=0", "model.batch_size=8", "export_hf=false",
         "warmup_steps=0"]
# 3 SFT steps with a checkpoint after every step (63 MB: the tiny model's weights and AdamW's two moments)
CHECKPOINTED = ["loss=sft", "exp_name=run", "n_examples=24", "intermediate_checkpoints=8", "keep_checkpoints=3",
                *SMALL]
REAL_HAS_SPACE = fileio.has_space


def train(*overrides, disk_check: bool = True) -> dict:
    """train.py's main with these overrides; {"rc", "last_line", "traceback"} of what the user sees."""
    import train as entry

    fileio.has_space = REAL_HAS_SPACE if disk_check else (lambda path, needed: True)
    sys.argv = ["train.py", *overrides]
    err = io.StringIO()
    rc = 0
    try:
        with contextlib.redirect_stderr(err):
            entry.main()
    except SystemExit as e:
        rc = e.code
    finally:
        fileio.has_space = REAL_HAS_SPACE
    lines = err.getvalue().strip().splitlines()
    return {"rc": rc, "last_line": lines[-1] if lines else "", "traceback": "Traceback" in err.getvalue(),
            "stderr_tail": err.getvalue()[-3000:] if rc else ""}


def run_facts(run_dir: Path) -> dict:
    from feedbackalign.checkpoints import load_policy_weights

    checkpoints, latest = run_dir / "checkpoints", run_dir / "LATEST"
    return {"latest": os.readlink(latest) if latest.is_symlink() else None,
            "latest_loads": latest.is_dir() and all(t.isfinite().all() for t in load_policy_weights(latest).values()),
            "entries": sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else [],
            "metrics_steps": [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            if (run_dir / "metrics.jsonl").is_file() else []}


def checkpoint_cases(disk_a: Path, disk_b: Path) -> dict:
    report = {}
    # a: the up-front check refuses step 2's checkpoint (63 MB needed, ~37 MB left): nothing is written
    report["refused"] = train(f"cache_dir={disk_a}", *CHECKPOINTED)
    report["refused"].update(run_facts(disk_a / "run"), free_after=fileio.free_bytes(disk_a))
    # b: the check is fooled, so step 2's torch.save hits ENOSPC mid-file; then space is freed and the run resumed
    report["mid_write"] = train(f"cache_dir={disk_b}", *CHECKPOINTED, disk_check=False)
    report["mid_write"].update(run_facts(disk_b / "run"), free_after=fileio.free_bytes(disk_b))
    subprocess.run(["mount", "-o", "remount,size=256m", str(disk_b)], check=True)
    report["resumed"] = train(f"cache_dir={disk_b}", *CHECKPOINTED, "resume=true")
    report["resumed"].update(run_facts(disk_b / "run"))
    return report


def cache_case(out: Path, disk_c: Path) -> dict:
    """The reference cache pass writes onto a 48 KB disk (the check fooled, so SQLite itself hits ENOSPC): 256
    sequences (~90 KB of rows) in rounds of at most 1024 tokens, so some rounds are written before the disk fills."""
    cache_dir = disk_c / "refcache"
    result = train(f"cache_dir={out / 'cache_runs'}", "loss=dpo", "n_examples=128", "model.batch_size=8",
                   "n_eval_examples=0", "export_hf=false", "cache_reference_logprobs=true",
                   "model.max_tokens_per_forward=1024", f"reference_cache_dir={cache_dir}",
                   "++dataset_options.wordsort.n_prompts=128", disk_check=False)
    files = list(cache_dir.glob("*.sqlite"))
    result["cache_files"] = [str(p) for p in files]
    if files:
        with sqlite3.connect(files[0]) as db:
            from feedbackalign.ref_cache import row_intact

            result["integrity"] = db.execute("PRAGMA integrity_check").fetchone()[0]
            rows = db.execute("SELECT key, n, logps, checksum FROM logps").fetchall()
            result["rows"], result["rows_intact"] = len(rows), sum(row_intact(*row) for row in rows)
    result["run_dir_exists"] = (out / "cache_runs").exists()
    return result


def samples_case(disk: Path) -> dict:
    """An atomic JSON write (eval.py's samples, compare.py's summary) onto a disk that fills up mid-write."""
    path = disk / "samples" / "run.json"
    fileio.write_json_atomic(path, {"old": True})
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    fileio.has_space = lambda p, n: True
    try:
        fileio.write_json_atomic(path, {"samples": ["x" * 1000] * 100}, what="samples")
        message = None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        message = f"{type(e).__name__}: {e}"
    finally:
        fileio.has_space = REAL_HAS_SPACE
    return {"message": message, "content": json.loads(path.read_text()),
            "left": sorted(p.name for p in path.parent.iterdir())}


def main(out: Path, disk_a: Path, disk_b: Path, disk_c: Path, disk_d: Path) -> None:
    report = checkpoint_cases(disk_a, disk_b)
    report["cache"] = cache_case(out, disk_c)
    report["samples"] = samples_case(disk_d)
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:6]))
