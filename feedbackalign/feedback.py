"""The one data model for four kinds of offline feedback, and the converters between them.

An `Example` is one prompt (chat turns) with its generations and whatever feedback the source carries:

- `scores`      one float per generation (UltraFeedback ratings, the built-in task's true reward);
- `pairs`       (i, j) tuples: generation i preferred over generation j (HH, SHP, OASST ranks);
- `desirable`   one bool per generation (KTO's unpaired labels);
- `judgments`   one natural-language critique or None per generation (CUT, Shepherd).

Converters derive the kinds a loss needs where the math allows:
scores -> pairs / desirable / K-groups; pairs -> desirable; pairs -> K=2 groups with one-hot rewards;
judgments -> desirable (a judged response is undesirable, `None` is desirable).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

from feedbackalign.errors import DataError


Turn = dict  # {"role": one of ROLES, "content": str}
ROLES = ("system", "user", "assistant")


def last_user_turn(turns: list[Turn]) -> str:
    """The content of the last user turn (the last turn when there is none): the instruction of a prompt."""
    users = [t["content"] for t in turns if t.get("role") == "user"]
    return users[-1] if users else turns[-1]["content"]


@dataclass
class Example:
    """One prompt and its generations, with every kind of feedback the source has for them."""

    prompt: list[Turn]
    generations: list[str] = field(default_factory=list)
    scores: Optional[list[float]] = None
    pairs: list[tuple[int, int]] = field(default_factory=list)
    desirable: Optional[list[Optional[bool]]] = None
    judgments: Optional[list[Optional[str]]] = None
    sft_index: Optional[int] = None
    dataset_name: str = ""
    source: str = ""  # where it came from, for error messages: "<file>:<record>" or a hub id

    def prompt_key(self) -> str:
        """A stable identity of the prompt (its turns), used to merge records and to split by hash."""
        text = "\x1e".join(f"{t['role']}\x1f{t['content']}" for t in self.prompt)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def add_generation(self, text: str) -> int:
        """Index of `text` among the generations, appending it if new (records of one prompt share it)."""
        if text in self.generations:
            return self.generations.index(text)
        self.generations.append(text)
        for name in ("scores", "desirable", "judgments"):
            values = getattr(self, name)
            if values is not None:
                values.append(None)
        return len(self.generations) - 1

    def set_feedback(self, index: int, *, score=None, desirable=None, judgment=None, judged=False) -> None:
        """Attach per-generation feedback, creating the per-generation lists on first use."""
        n = len(self.generations)
        if score is not None:
            self.scores = self.scores if self.scores is not None else [None] * n
            self.scores[index] = float(score)
        if desirable is not None:
            self.desirable = self.desirable if self.desirable is not None else [None] * n
            self.desirable[index] = bool(desirable)
        if judged or judgment is not None:
            self.judgments = self.judgments if self.judgments is not None else [None] * n
            self.judgments[index] = judgment

    def prompt_text(self) -> str:
        """The last user turn, for summaries and sample files."""
        return last_user_turn(self.prompt)


@dataclass
class Dataset:
    """A named collection of Examples, one per prompt."""

    name: str
    examples: list[Example]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)


def merge_by_prompt(name: str, examples: Iterable[Example]) -> Dataset:
    """Merge records that share a prompt into one Example (generations de-duplicated, feedback re-indexed)."""
    merged: dict[str, Example] = {}
    for ex in examples:
        key = ex.prompt_key()
        if key not in merged:
            merged[key] = Example(prompt=ex.prompt, dataset_name=ex.dataset_name or name, source=ex.source)
        target = merged[key]
        remap = [target.add_generation(g) for g in ex.generations]
        for i, new in enumerate(remap):
            target.set_feedback(
                new,
                score=ex.scores[i] if ex.scores is not None else None,
                desirable=ex.desirable[i] if ex.desirable is not None else None,
                judgment=ex.judgments[i] if ex.judgments is not None else None,
                judged=ex.judgments is not None,
            )
        for i, j in ex.pairs:
            pair = (remap[i], remap[j])
            if pair not in target.pairs and pair[0] != pair[1]:
                target.pairs.append(pair)
        if ex.sft_index is not None and target.sft_index is None:
            target.sft_index = remap[ex.sft_index]
    return Dataset(name, list(merged.values()))


def in_test_split(example: Example, test_fraction: float = 0.05) -> bool:
    """Deterministic held-out slice by prompt hash, for sources that ship no test split."""
    return int(example.prompt_key()[:8], 16) / 0xFFFFFFFF < test_fraction


# ---------------------------------------------------------------- converters


def has_scores(ex: Example) -> bool:
    return ex.scores is not None and all(s is not None for s in ex.scores) and len(ex.scores) >= 1


def pairs_of(ex: Example, mode: str = "best_worst", margin: float = 0.0) -> list[tuple[int, int]]:
    """Preference pairs: the source's own, else derived from scores.

    best_worst: (argmax, argmin) when they differ by more than `margin` (the NCA/Zephyr binarisation);
    all: every (i, j) with score_i - score_j > margin.
    """
    if ex.pairs:
        return list(ex.pairs)
    if not has_scores(ex):
        return []
    s = ex.scores
    if mode == "best_worst":
        best = max(range(len(s)), key=lambda i: (s[i], -i))
        worst = min(range(len(s)), key=lambda i: (s[i], i))
        return [(best, worst)] if s[best] - s[worst] > margin else []
    if mode == "all":
        return [(i, j) for i, j in itertools.permutations(range(len(s)), 2) if s[i] - s[j] > margin]
    raise DataError(f"unknown pair mode '{mode}': use best_worst or all")


def desirable_of(ex: Example, threshold: Optional[float] = None) -> list[Optional[bool]]:
    """Desirable/undesirable label per generation (None = no label).

    Order of evidence: explicit labels; judgments (critiqued = undesirable, None = desirable); scores
    against `threshold` (default: the midpoint of the score range of the example); pairs (chosen ones
    desirable, rejected ones undesirable, as HALOs unpairs HH).
    """
    n = len(ex.generations)
    if ex.desirable is not None and any(d is not None for d in ex.desirable):
        return list(ex.desirable)
    if ex.judgments is not None:
        return [j is None for j in ex.judgments]
    if has_scores(ex):
        cut = threshold if threshold is not None else (max(ex.scores) + min(ex.scores)) / 2
        if threshold is None and max(ex.scores) == min(ex.scores):
            return [None] * n
        return [s > cut for s in ex.scores] if threshold is None else [s >= cut for s in ex.scores]
    labels: list[Optional[bool]] = [None] * n
    for i, j in ex.pairs:
        labels[i] = True if labels[i] is None else labels[i]
        labels[j] = False
    return labels


def rewards_of(ex: Example) -> Optional[list[float]]:
    """Scalar rewards for K-wise losses: the scores when every generation has one, else None (groups_of then
    makes K=2 groups with one-hot rewards from the pairs)."""
    if has_scores(ex):
        return [float(s) for s in ex.scores]
    return None


def groups_of(ex: Example, k: Optional[int] = None) -> list[tuple[list[int], list[float]]]:
    """K-groups (generation indices, rewards) for NCA/InfoNCA.

    With scores: one group of all generations (or the top-k by the order given when `k` is set, keeping the
    best and worst). Without scores: each preference pair becomes a K=2 group with rewards (1, 0); with
    alpha -> 0 the softmax weights are one-hot, so InfoNCA reduces to DPO (Chen et al. 2024, Sec. 3).
    """
    rewards = rewards_of(ex)
    if rewards is not None and len(rewards) >= 2:
        idx = list(range(len(rewards)))
        if k is not None and len(idx) > k:
            order = sorted(idx, key=lambda i: -rewards[i])
            idx = sorted(order[: k - 1] + [order[-1]])
        return [(idx, [rewards[i] for i in idx])]
    return [([i, j], [1.0, 0.0]) for i, j in ex.pairs]


def check_finite_scores(ex: Example) -> None:
    if ex.scores is None:
        return
    for i, s in enumerate(ex.scores):
        if s is not None and not math.isfinite(s):
            raise DataError(f"{ex.source}: field 'scores'[{i}] is {s}; scores must be finite numbers")
