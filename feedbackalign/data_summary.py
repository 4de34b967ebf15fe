"""What a dataset holds before you commit GPUs: feedback counts, K distribution, token lengths, truncation.

    python -m feedbackalign.data_summary --datasets hh oasst --data_dir ../shared/data --split test \\
        --tokenizer tiny --max_length 512 --max_prompt_length 256

Counts use the converters of feedback.py and the formatting/tokenising/truncation of dataloader.py, so the
numbers are the ones the loaders will see. A sequence is one (prompt, generation); it counts as truncated
when the HALOs rule (dataloader.truncate) shortens its prompt or response.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Optional

import numpy as np

from dataloader import PromptFormat, check_example, encode_prompt, encode_response, format_prompt, truncate
from dataloader import uses_chat_template
from feedbackalign.feedback import Dataset, desirable_of, groups_of, pairs_of
from feedbackalign.errors import DataError

PERCENTILES = (50, 90, 99)


def length_stats(lengths: list[int]) -> dict:
    """p50/p90/p99 (numpy's linear interpolation) and max of token lengths; empty -> zeros."""
    if not lengths:
        return {**{f"p{q}": 0.0 for q in PERCENTILES}, "max": 0}
    values = np.asarray(lengths, dtype=np.float64)
    return {**{f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}, "max": int(values.max())}


def summarize(dataset: Dataset, tokenizer, *, max_length: int = 512, max_prompt_length: int = 256,
              pair_mode: str = "best_worst", pair_margin: float = 0.0, desirable_threshold: Optional[float] = None,
              n_responses: Optional[int] = None, **prompt_format) -> dict:
    """Counts of one dataset as the loaders would see it (prompt_format: the DataLoader's prefix/suffix keys)."""
    fmt = PromptFormat(**prompt_format)
    special = not uses_chat_template(tokenizer)
    counts = Counter()
    k_distribution: Counter = Counter()
    prompt_lengths, response_lengths = [], []
    for n, ex in enumerate(dataset):
        where = ex.source or f"dataset '{dataset.name}' example {n}"
        check_example(ex, where)
        counts["generations"] += len(ex.generations)
        counts["pairs"] += len(pairs_of(ex, pair_mode, pair_margin))
        labels = desirable_of(ex, desirable_threshold)
        counts["desirable"] += sum(d is True for d in labels)
        counts["undesirable"] += sum(d is False for d in labels)
        counts["judged"] += sum(isinstance(j, str) and bool(j.strip()) for j in (ex.judgments or []))
        k_distribution.update(len(idx) for idx, _ in groups_of(ex, n_responses))
        prompt_ids = encode_prompt(tokenizer, format_prompt(ex.prompt, tokenizer, fmt, where), special=special)
        prompt_lengths.append(len(prompt_ids))
        for text in ex.generations:
            response_ids = encode_response(tokenizer, text)
            response_lengths.append(len(response_ids))
            p, (r,) = truncate(prompt_ids, [response_ids], max_length, max_prompt_length)
            counts["truncated"] += (len(p), len(r)) != (len(prompt_ids), len(response_ids))
    return {"dataset": dataset.name, "prompts": len(dataset), "generations": counts["generations"],
            "pairs": counts["pairs"], "desirable": counts["desirable"], "undesirable": counts["undesirable"],
            "judged": counts["judged"], "k_distribution": dict(sorted(k_distribution.items())),
            "prompt_tokens": length_stats(prompt_lengths), "response_tokens": length_stats(response_lengths),
            "sequences": len(response_lengths), "truncated": counts["truncated"]}


def render(summary: dict) -> str:
    """A short human-readable block for one dataset."""
    def stats(s):
        return " ".join(f"{k}={v:g}" for k, v in s.items())
    ks = ", ".join(f"K={k}: {n}" for k, n in summary["k_distribution"].items()) or "none"
    return "\n".join([
        f"== {summary['dataset']}",
        f"  prompts {summary['prompts']}  generations {summary['generations']}  pairs {summary['pairs']}",
        f"  desirable {summary['desirable']}  undesirable {summary['undesirable']}  judged {summary['judged']}",
        f"  K-groups {ks}",
        f"  prompt tokens   {stats(summary['prompt_tokens'])}",
        f"  response tokens {stats(summary['response_tokens'])}",
        f"  truncated {summary['truncated']} of {summary['sequences']} sequences",
    ])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", required=True, help="getter names, e.g. hh oasst")
    parser.add_argument("--data_dir", default=None, help="local upstream-format files (default: the hub)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tokenizer", default="tiny", help="'tiny', a hub name or a local directory")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--max_prompt_length", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print one JSON object per dataset")
    args = parser.parse_args(argv)
    try:
        from feedbackalign import getters
        from feedbackalign.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        for name in args.datasets:
            dataset = getters.get_dataset(name, args.split, data_dir=args.data_dir)
            summary = summarize(dataset, tokenizer, max_length=args.max_length,
                                max_prompt_length=args.max_prompt_length)
            print(json.dumps(summary) if args.json else render(summary), flush=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
