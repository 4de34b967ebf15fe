"""Disk cost of the reference log-prob cache on real data: bytes per response token and per sequence.

    python tools/ref_cache_disk_cost.py [--data_dir ../shared/data] [--dataset hh_helpful] [--pairs 1024]

Builds the cache (tiny model, tiny tokenizer) over the test split's first `--pairs` pairs at two length limits
and prints, for each: sequences, mean response tokens, file bytes per token, bytes per sequence beyond the
4-byte values (key twice, checksum, SQLite row and B-tree). The README's figures come from this command.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
from pathlib import Path

import torch

from feedbackalign import builders, ref_cache
from feedbackalign.configuration import compose


def measure(data_dir: str, dataset: str, pairs: int, max_length: int, out: Path) -> str:
    cfg = compose([f"cache_dir={out}", "loss=dpo", f"datasets=[{dataset}]", f"data_dir={data_dir}",
                   f"reference_cache_dir={out / str(max_length)}", "model.eval_batch_size=32",
                   f"n_eval_examples={pairs}", f"model.max_length={max_length}",
                   f"model.max_prompt_length={max_length // 2}"])
    tokenizer = builders.build_tokenizer(cfg)
    loader = builders.build_loader(cfg, tokenizer, split="test", train=False)
    model = builders.build_policy(cfg, tokenizer, torch.device("cpu"))
    cache = ref_cache.build(cfg, tokenizer, model, ref_cache.reference_identity(model, 1), [loader], rank=0,
                            world_size=1)
    counts = [n for (n,) in sqlite3.connect(cache.path).execute("SELECT n FROM logps")]
    tokens, size = sum(counts), cache.path.stat().st_size
    return (f"max_length={max_length}: {len(counts)} sequences, {tokens / len(counts):.0f} response tokens each, "
            f"{size / tokens:.2f} B/token, {(size - 4 * tokens) / len(counts):.0f} B/sequence beyond the values")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=os.environ.get(  # the tests' convention (tests/conftest.py)
        "FEEDBACKALIGN_SHARED_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data")))
    parser.add_argument("--dataset", default="hh_helpful")
    parser.add_argument("--pairs", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        for max_length in (128, 768):
            print(measure(args.data_dir, args.dataset, args.pairs, max_length, Path(out)), flush=True)


if __name__ == "__main__":
    main()
