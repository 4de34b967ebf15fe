"""Label samples: an eval.py samples file (K responses per prompt) -> feedback in the generic JSONL schema.

    python eval.py --config-path=runs/sft ++mode=sample ++split=train ++n_samples=512 ++n_responses=4 \
        ++samples_dir=samples/
    python label.py -f samples/sft.json -o feedback/sft_task.jsonl --labeler task
    python label.py -f samples/sft.json -o feedback/sft_rm.jsonl --labeler rm --reward_model runs/rm_tiny
    python label.py -f samples/sft.json -o feedback/sft_cut.jsonl --labeler judge --mode judgments --judge gpt-4o
    python train.py loss=nca datasets=[jsonl:feedback/sft_task.jsonl] model.load_from=runs/sft/LATEST/policy.pt

Labelers (feedbackalign/labelers.py):
  task    the built-in wordsort task: true reward (`scores`) and critique (`judgments`) of each response;
  rm      a reward model's score of each response: loss=rm's run directory (its LATEST/hf export), a
          save_pretrained AutoModelForSequenceClassification with one label, or such a hub model;
  judge   an OpenAI-compatible chat model (compare.py's client: --base_url, key from $OPENAI_API_KEY or
          --api_key_env, never printed or written; retries with backoff). --mode scores: a 1-10 rating per
          response (UltraFeedback's four aspects); pairs: every pair of responses asked in both orders, a
          preference only when both agree; judgments: a CUT-style critique per response, null for "No error".

One record per prompt is appended to the output (-o) as soon as it is labelled, flushed and fsync'd; a rerun of
the same command labels only the prompts missing from it (a torn last line from a crash is cut off). Scores,
pairs and judgments become what each loss needs through the loaders' converters: pairs and labels for DPO and
KTO, K-groups for NCA/InfoNCA/GRPO, judgments for CUT. Responses that are empty are left out (the schema needs
text); a prompt the judge's answers give no label for is not written (counted; a rerun asks again).

Exit codes (as compare.py's): 0 every prompt labelled; 2 a user error (file, option, key, request refused);
3 prompts remain unlabelled because the judge kept failing (rerun); 130 interrupted (rerun).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import compare
from feedbackalign import labelers
from feedbackalign.errors import UserError, one_line, report


def build_parser() -> argparse.ArgumentParser:
    positive = compare.positive
    p = argparse.ArgumentParser(prog="label.py", description="Label an eval.py samples file with the task's true "
                                "reward, a reward model or an LLM judge (see the module docstring).")
    p.add_argument("-f", "--samples", required=True, type=Path, help="samples JSON written by eval.py")
    p.add_argument("-o", "--output", required=True, type=Path, help="feedback JSONL, appended to and resumed")
    p.add_argument("--labeler", required=True, choices=labelers.LABELERS)
    rm = p.add_argument_group("labeler rm")
    rm.add_argument("--reward_model", help="loss=rm run directory, save_pretrained directory or hub name")
    rm.add_argument("--batch_size", type=positive(int), default=16, help="responses per forward (default 16)")
    rm.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="reward model dtype (default: bfloat16 on a GPU, float32 on CPU)")
    judge = p.add_argument_group("labeler judge (the connection options are compare.py's)")
    judge.add_argument("--mode", choices=labelers.JUDGE_MODES, default="scores", help="what the judge gives")
    judge.add_argument("--judge", default=compare.DEFAULT_JUDGE, help=f"model name (default {compare.DEFAULT_JUDGE})")
    judge.add_argument("--base_url", default=None, help="OpenAI-compatible URL (default $OPENAI_BASE_URL or OpenAI)")
    judge.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    judge.add_argument("--concurrency", type=positive(int), default=8, help="prompts labelled at once (default 8)")
    judge.add_argument("--max_retries", type=int, default=6, help="retries per request (default 6)")
    judge.add_argument("--timeout", type=positive(float), default=60.0, help="seconds per request (default 60)")
    judge.add_argument("--backoff", type=positive(float), default=1.0, help="first retry wait in seconds (doubles)")
    judge.add_argument("--backoff_max", type=positive(float), default=60.0, help="longest retry wait in seconds")
    judge.add_argument("--temperature", type=float, default=0.0, help="judge sampling temperature (default 0)")
    judge.add_argument("--seed", type=int, default=0, help="sent to the judge (best effort) and seeds the jitter")
    return p


def run(args: argparse.Namespace) -> int:
    """Build the labeler, label what the output lacks, print the summary; returns the exit code."""
    client = None
    if args.labeler == "task":
        labeler = labelers.TaskLabeler()
    elif args.labeler == "rm":
        if not args.reward_model:
            return fail("--labeler rm needs --reward_model (a loss=rm run directory or a sequence classifier)",
                        compare.EXIT_ERROR)
        labeler = labelers.RewardModelLabeler(args.reward_model, args.batch_size, dtype=args.dtype)
    else:
        if args.max_retries < 0:
            return fail(f"--max_retries must be >= 0, got {args.max_retries}", compare.EXIT_ERROR)
        judge, client, base_url = labelers.make_judge(args.judge, args.base_url, args.api_key_env, args.timeout,
                                                      args.max_retries, args.backoff, args.backoff_max,
                                                      args.temperature, args.seed)
        labeler = labelers.JudgeLabeler(judge, args.mode, args.concurrency, judge.stop)
        print(f"judge {args.judge} at {base_url}, mode {args.mode}", flush=True)
    try:
        result = labelers.label_file(args.samples, args.output, labeler)
    finally:
        if client is not None:
            client.close()
    print(summary(result, args.output), flush=True)
    o = result.outcome
    remain = f"{result.items - result.already - result.labelled} of {result.items} prompts are not in {args.output}"
    if o.fatal:
        return fail(f"judge {args.judge} refused a request ({o.fatal}): "
                    f"{compare.fatal_hint(o.fatal, args.api_key_env)}; {remain}", compare.EXIT_ERROR)
    if o.write_error:
        return fail(f"{o.write_error}: free space or fix permissions, then rerun; {remain}", compare.EXIT_ERROR)
    if o.exhausted:
        return fail(f"judge {args.judge} kept failing ({o.exhausted}); {remain}: rerun the same command to label "
                    "them", compare.EXIT_INCOMPLETE)
    if o.interrupted:
        return fail(f"interrupted; {remain}: rerun the same command to label them", compare.EXIT_INTERRUPTED)
    return compare.EXIT_OK


def summary(result: labelers.LabelResult, output: Path) -> str:
    lines = [f"labelled {result.labelled} of {result.items} prompts into {output} ({result.already} were already "
             f"there)"]
    if result.unlabelled:
        lines.append(f"  {result.unlabelled} prompt(s) got no label (no parseable answer, or only empty responses): "
                     "not written; a rerun asks again")
    if result.empty_responses:
        lines.append(f"  {result.empty_responses} empty response(s) left out (the feedback schema needs text)")
    return "\n".join(lines)


def fail(message: str, code: int) -> int:
    return report("label.py", message, code)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one clear line and a non-zero exit code for every failure a user can cause."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        return fail(one_line(err), compare.EXIT_ERROR)
    except OSError as err:
        return fail(f"{err}: fix the path or free space, then rerun (labelled prompts are kept)", compare.EXIT_ERROR)
    except KeyboardInterrupt:
        return fail("interrupted; labelled prompts are kept in the output: rerun the same command",
                    compare.EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
