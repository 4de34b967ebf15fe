"""The built-in controlled task `wordsort`: sort a few words alphabetically, with a known true reward.

The CPU-scale analogue of the DPO paper's controlled IMDb-sentiment task (Rafailov et al. 2023, Sec. 6.1):
the ground-truth reward is a cheap pure function, so an experiment can measure how much each alignment loss
raises the TRUE reward over the SFT model instead of trusting a learned reward model.

    prompt   [{"role": "user", "content": "Sort these words alphabetically: pen fig air sun"}]
    ideal    "air fig pen sun"

Every Example carries K generations of graded quality, all four kinds of feedback a loss may need:
`scores` (the true reward, 0-10 like UltraFeedback ratings), `judgments` (a CUT-style critique naming the
specific fault, None for a perfect answer), and an `sft_index` that is deliberately imperfect.
`pairs` and `desirable` are left empty/None on purpose: `feedback.pairs_of` derives pairs from the scores
(best vs worst, or all pairs with a margin), and `feedback.desirable_of` derives the unpaired labels from the
judgments (only a perfect answer, reward 10, is desirable), so one source of truth feeds every loss.

Train and test prompts never share a word set: a set belongs to the test split iff the hash of its sorted
words falls in one bucket of TEST_BUCKETS, whatever the seed.

Score a model's answers (the samples files `eval.py ++mode=sample` writes, or a JSON list of samples):

    python -m feedbackalign.task score samples/dpo_tiny.json samples/sft_tiny.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from feedbackalign.feedback import Dataset, Example, last_user_turn
from feedbackalign.errors import DataError

DATASET_NAME = "wordsort"
INSTRUCTION = "Sort these words alphabetically:"

# Concrete nouns that are one token (with their leading space) in the embedded tiny tokenizer.
VOCAB = (
    "air ant arm bed book box cake cat corn cup day dog door egg eye fig fire fish gold hair hand ice key leg "
    "lemon milk nose oil pen pie rain rice rock salt sea sky star sun tea tree wall water wind wood"
).split()
MIN_WORDS, MAX_WORDS = 3, 6
DEFAULT_SIZES = {"train": 4000, "test": 200}
TEST_BUCKETS = 10  # one word set in TEST_BUCKETS goes to the test split
MIN_K, MAX_K = 2, 6
SFT_PERFECT_FRACTION = 0.6  # probability that the SFT demonstration is the perfect answer
PERFECT_REWARD = 10.0

# Prefixes that make a correct answer chatty; each of their words costs one point.
CHATTER = ("Sure:", "Sorted:", "Here they are:", "The sorted words are:")

_WORD = re.compile(r"[a-z0-9]+")
_SORT_LINE = re.compile(r"\bsort\b[^:\n]*:([^\n]*)", re.IGNORECASE)
_EDGE_PUNCT = ",.;!?\"'()"
_PLAIN = re.compile(r"[A-Za-z0-9]+")


# ---------------------------------------------------------------- parsing


def make_prompt(words: list[str]) -> str:
    """The user text of a wordsort prompt."""
    return f"{INSTRUCTION} {' '.join(words)}"


def parse_prompt(prompt: str) -> list[str]:
    """The words to sort, lower-cased, in the order the prompt gives them.

    Finds the last "Sort ...:" in the text (so chat formatting such as "<|user|>\\n...\\n<|assistant|>\\n" or
    "Human: ...  Assistant:" around it is ignored) and takes the run of plain words after the colon, up to
    the end of the line, a special token ("<|assistant|>") or the first non-word (e.g. "Assistant:").
    """
    matches = _SORT_LINE.findall(prompt)
    if not matches:
        raise DataError(f"wordsort prompt {prompt[:80]!r} has no 'Sort ...:' instruction; "
                        f"write it as '{INSTRUCTION} w1 w2 w3'")
    words = []
    for token in matches[-1].split():
        head, special, _ = token.partition("<")  # "fig<|assistant|>": a special token ends the list
        word = head.strip(_EDGE_PUNCT)
        if head.endswith(":") or not _PLAIN.fullmatch(word or "-"):  # "Assistant:" or other non-words
            break
        words.append(word.lower())
        if special:
            break
    if not words:
        raise DataError(f"wordsort prompt {prompt[:80]!r} lists no words after 'Sort ...:'; "
                        f"write it as '{INSTRUCTION} w1 w2 w3'")
    return words


def response_words(response: str) -> list[str]:
    """The response as lower-case words; case and punctuation are ignored."""
    return _WORD.findall(response.lower())


# ---------------------------------------------------------------- the one analysis


@dataclass(frozen=True)
class Analysis:
    """Everything the reward and the judge say about one response (one analysis, two presentations)."""

    target: list[str]       # the prompt's distinct words, sorted: the perfect answer
    found: list[str]        # first occurrence of each prompt word in the response, in response order
    missing: list[str]      # prompt words absent from the response, sorted
    unknown: list[str]      # response words that are not prompt words, in order (repeats kept)
    repeated: list[str]     # prompt words that occur more than once, in order of first occurrence
    ordered_pairs: int      # pairs of found words whose response order is alphabetical
    total_pairs: int        # n(n-1)/2 for the n prompt words
    n_extra: int            # len(response words) - len(found): unknown + repeated occurrences

    @property
    def coverage(self) -> float:
        """C = found / n."""
        return len(self.found) / len(self.target)

    @property
    def order(self) -> float:
        """O = ordered pairs / all n(n-1)/2 pairs of prompt words (O = C when n = 1)."""
        return self.ordered_pairs / self.total_pairs if self.total_pairs else self.coverage

    @property
    def reward(self) -> float:
        """max(0, 5 C + 5 O - X); see `true_reward`."""
        return max(0.0, 5.0 * self.coverage + 5.0 * self.order - self.n_extra)

    @property
    def perfect(self) -> bool:
        return self.found == self.target and self.n_extra == 0


def analyze(prompt: str, response: str) -> Analysis:
    """Compare a response with the sorted prompt words (the shared analysis of `true_reward` and `judge`)."""
    target = sorted(set(parse_prompt(prompt)))
    wanted = set(target)
    words = response_words(response)
    found: list[str] = []
    repeated: list[str] = []
    for w in words:
        if w not in wanted:
            continue
        if w in found:
            if w not in repeated:
                repeated.append(w)
        else:
            found.append(w)
    ordered = sum(1 for i, a in enumerate(found) for b in found[i + 1:] if a < b)
    return Analysis(
        target=target,
        found=found,
        missing=[w for w in target if w not in found],
        unknown=[w for w in words if w not in wanted],
        repeated=repeated,
        ordered_pairs=ordered,
        total_pairs=len(target) * (len(target) - 1) // 2,
        n_extra=len(words) - len(found),
    )


def true_reward(prompt: str, response: str) -> float:
    """The ground-truth reward of `response` to a wordsort `prompt`, in [0, 10].

    With P the n distinct words of the prompt (`parse_prompt`) and R the response's words (lower-cased runs
    of letters/digits, so case and punctuation are ignored):

        C = |P found in R| / n                               coverage
        O = #{a < b in P: both in R, a first} / (n(n-1)/2)  all-pairs order (O = C when n = 1)
        X = |R| - |P found in R|                             extra words: not in P, repeats, chatter
        reward = max(0, 5 C + 5 O - X)

    It is 10 exactly when R is the sorted P and nothing else. Examples for P = {air, fig, pen, sun}:
    one adjacent swap 5 + 5*5/6; a missing word 5*3/4 + 5*3/6; one extra word 9; reversed 5; empty 0.
    """
    return analyze(prompt, response).reward


# ---------------------------------------------------------------- the judge


def _quoted(words: list[str]) -> str:
    items = [f"'{w}'" for w in words]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _about(words: list[str], one: str, many: str) -> str:
    return f"The word {_quoted(words)} {one}." if len(words) == 1 else f"The words {_quoted(words)} {many}."


def _order_faults(found: list[str], ordered_pairs: int, limit: int = 3) -> list[str]:
    """Name the adjacent inversions of the found words (all reversed: say so once)."""
    if len(found) >= 2 and ordered_pairs == 0:
        return ["The words are in reverse alphabetical order."]
    faults = [f"'{b}' should come before '{a}'." for a, b in zip(found, found[1:]) if b < a]
    if len(faults) > limit:
        faults = faults[:limit] + ["Other words are out of order too."]
    return faults


def critique(a: Analysis) -> Optional[str]:
    """The natural-language critique of an analysis: each specific fault, or None when perfect."""
    if a.perfect:
        return None
    if not a.found and not a.unknown:
        return "The response is empty; it should list the words in alphabetical order."
    parts = []
    if a.missing:
        parts.append(_about(a.missing, "is missing", "are missing"))
    if a.unknown:
        parts.append(_about(list(dict.fromkeys(a.unknown)), "was not in the list", "were not in the list"))
    if a.repeated:
        parts.append(_about(a.repeated, "is repeated", "are repeated"))
    parts.extend(_order_faults(a.found, a.ordered_pairs))
    return " ".join(parts)


def judge(prompt: str, response: str) -> Optional[str]:
    """A CUT-style judgment of `response` naming its specific faults ("The word 'fig' is missing."), or None
    for a perfect answer. Written from the same `analyze` as `true_reward`."""
    return critique(analyze(prompt, response))


# ---------------------------------------------------------------- generations of graded quality


def _swap(s, rng, prompt_order):
    i = rng.randrange(len(s) - 1)
    return s[:i] + [s[i + 1], s[i]] + s[i + 2:]


def _extra(s, rng, prompt_order):
    i = rng.randrange(len(s) + 1)
    return s[:i] + [rng.choice([w for w in VOCAB if w not in s])] + s[i:]


def _repeat(s, rng, prompt_order):
    i = rng.randrange(len(s))
    return s[:i + 1] + s[i:]


def _short_chatter(s, rng, prompt_order):
    return [rng.choice(CHATTER[:2])] + s


def _long_chatter(s, rng, prompt_order):
    return [rng.choice(CHATTER[2:])] + s


def _missing(s, rng, prompt_order):
    i = rng.randrange(len(s))
    return s[:i] + s[i + 1:]


def _missing_and_swap(s, rng, prompt_order):
    return _swap(_missing(s, rng, prompt_order), rng, prompt_order)


def _reversed(s, rng, prompt_order):
    return s[::-1]


def _echo(s, rng, prompt_order):
    return list(prompt_order)


def _shuffled(s, rng, prompt_order):
    out = list(s)
    while out == s:
        rng.shuffle(out)
    return out


NEAR_MISSES = (_swap, _extra, _repeat, _short_chatter)  # one small fault: the imperfect SFT demonstrations
OTHER_FAULTS = (_long_chatter, _missing, _missing_and_swap, _reversed, _echo, _shuffled)


def _candidates(s: list[str], prompt_order: list[str], rng: random.Random, kinds, draws: int) -> list[str]:
    return [" ".join(kind(s, rng, prompt_order)) for kind in kinds for _ in range(draws)]


def _generations(prompt: str, words: list[str], k: int, rng: random.Random) -> tuple[list[str], int]:
    """K responses with distinct true rewards: the perfect one, a near miss, and k-2 other faults, in a
    random order; returns them with the index of the SFT demonstration."""
    s = sorted(words)
    perfect = " ".join(s)
    near = rng.choice(_candidates(s, words, rng, NEAR_MISSES, 1))
    chosen = {round(true_reward(prompt, perfect), 6): perfect, round(true_reward(prompt, near), 6): near}
    pool = _candidates(s, words, rng, NEAR_MISSES + OTHER_FAULTS, 2)
    rng.shuffle(pool)
    for text in pool:
        if len(chosen) == k:
            break
        chosen.setdefault(round(true_reward(prompt, text), 6), text)
    if len(chosen) < k:
        raise DataError(f"wordsort: could not draw {k} responses with distinct rewards for {prompt!r}; "
                        f"use a smaller k (at most {MAX_K})")
    texts = list(chosen.values())[:k]
    rng.shuffle(texts)
    sft = perfect if rng.random() < SFT_PERFECT_FRACTION else near
    return texts, texts.index(sft)


# ---------------------------------------------------------------- prompts and the getter


def split_of(words: list[str]) -> str:
    """'test' or 'train' for a word set, by a hash of its sorted distinct words (seed-independent)."""
    digest = hashlib.sha256(" ".join(sorted(set(words))).encode("utf-8")).hexdigest()
    return "test" if int(digest[:8], 16) % TEST_BUCKETS == 0 else "train"


def _draw_prompts(split: str, n: int, rng: random.Random) -> list[list[str]]:
    """n word lists of the split, each a distinct word set, never given already in sorted order."""
    seen: set[tuple[str, ...]] = set()
    out: list[list[str]] = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        words = rng.sample(VOCAB, rng.randint(MIN_WORDS, MAX_WORDS))
        key = tuple(sorted(words))
        if key in seen or split_of(words) != split:
            continue
        while words == sorted(words):
            rng.shuffle(words)
        seen.add(key)
        out.append(words)
    if len(out) < n:
        raise DataError(f"wordsort: only {len(out)} distinct {split} prompts could be drawn; ask for fewer")
    return out


def _check_args(split: str, n_prompts: Optional[int], k: int) -> int:
    if split not in DEFAULT_SIZES:
        raise DataError(f"wordsort has no split '{split}': use one of {', '.join(DEFAULT_SIZES)}")
    if not (isinstance(k, int) and MIN_K <= k <= MAX_K):
        raise DataError(f"wordsort: k={k!r} generations per prompt is not allowed; use {MIN_K}..{MAX_K}")
    n = DEFAULT_SIZES[split] if n_prompts is None else n_prompts
    if not (isinstance(n, int) and n > 0):
        raise DataError(f"wordsort: n_prompts={n_prompts!r} must be a positive integer")
    return n


def make_example(words: list[str], split: str, index: int, k: int, rng: random.Random) -> Example:
    """One wordsort Example: K graded generations with scores, judgments and an imperfect SFT target."""
    prompt = make_prompt(words)
    generations, sft_index = _generations(prompt, words, k, rng)
    analyses = [analyze(prompt, g) for g in generations]
    return Example(
        prompt=[{"role": "user", "content": prompt}],
        generations=generations,
        scores=[a.reward for a in analyses],
        judgments=[critique(a) for a in analyses],
        sft_index=sft_index,
        dataset_name=DATASET_NAME,
        source=f"{DATASET_NAME}:{split}:{index}",
    )


def get_wordsort(split: str, data_dir=None, *, n_prompts: Optional[int] = None, seed: int = 0,
                 k: int = 4) -> Dataset:
    """The wordsort split, generated deterministically from `seed` (data_dir is ignored: nothing is read).

    Defaults: 4000 train / 200 test prompts of 3-6 words, k=4 generations each. The same (split, seed, k)
    always gives the same Dataset, and a smaller n_prompts gives a prefix of a larger one.
    """
    n = _check_args(split, n_prompts, k)
    prompts = _draw_prompts(split, n, random.Random(f"{DATASET_NAME}|{split}|{seed}"))
    examples = [make_example(words, split, i, k, random.Random(f"{DATASET_NAME}|{split}|{seed}|{i}"))
                for i, words in enumerate(prompts)]
    return Dataset(DATASET_NAME, examples)


# ---------------------------------------------------------------- eval samples


def _prompt_text(value, where: str) -> str:
    """A sample's prompt as text: a string, or chat turns (the last user turn)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, dict) and "content" in t for t in value):
        return last_user_turn(value)
    raise DataError(f"{where}: the prompt must be a string or a list of chat turns, got {type(value).__name__}")


def score_samples(samples: list[dict], prompt_key: str = "prompt", output_key: str = "policy") -> list[float]:
    """The true reward of each eval sample (`sample[output_key]` answering `sample[prompt_key]`)."""
    rewards = []
    for i, sample in enumerate(samples):
        where = f"sample {i}"
        for key in (prompt_key, output_key):
            if not isinstance(sample, dict) or key not in sample:
                raise DataError(f"{where} has no key '{key}'; pass prompt_key/output_key naming the sample fields")
        if not isinstance(sample[output_key], str):
            raise DataError(f"{where}: '{output_key}' must be the output text, got {type(sample[output_key]).__name__}")
        try:
            rewards.append(true_reward(_prompt_text(sample[prompt_key], where), sample[output_key]))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    return rewards


# ---------------------------------------------------------------- command line


def read_samples(path: Path) -> list[dict]:
    """The samples of an eval.py samples file ({"samples": [...]}) or of a JSON list of samples."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; write samples with `python eval.py --config-path=<run> "
                        "++mode=sample`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a JSON samples file ({e})") from None
    samples = data.get("samples") if isinstance(data, dict) else data
    if not isinstance(samples, list):
        raise DataError(f"{path}: expected eval.py's samples file (an object with 'samples') or a list of samples")
    return samples


def score_text(path: Path, rewards: list[float]) -> str:
    from feedbackalign.stats import mean_ci

    mean, low, high = mean_ci(rewards)
    perfect = sum(r == PERFECT_REWARD for r in rewards) / len(rewards)
    n = f"{len(rewards)} sample{'s' if len(rewards) != 1 else ''}"
    return f"{path}: {n}, true reward {mean:.2f} (95% CI {low:.2f}-{high:.2f}), perfect {perfect:.0%}"


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m feedbackalign.task score FILE ...`: the true reward of each file's answers (0-10, task.true_reward),
    its mean with a 95% normal interval, and the share of perfect answers."""
    from feedbackalign.errors import exit_on_user_error

    parser = argparse.ArgumentParser(prog="python -m feedbackalign.task",
                                     description="The built-in wordsort task: score answers by the true reward.")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="true reward of samples files written by eval.py ++mode=sample")
    score.add_argument("files", nargs="+", type=Path)
    score.add_argument("--prompt-key", default="prompt", help="the samples' prompt field (text or chat turns)")
    score.add_argument("--output-key", default="policy", help="the samples' answer field")
    args = parser.parse_args(argv)
    with exit_on_user_error("python -m feedbackalign.task"):
        for path in args.files:
            rewards = score_samples(read_samples(path), args.prompt_key, args.output_key)
            print(score_text(path, rewards), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
