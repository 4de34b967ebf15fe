"""Named microbatches: what a DataLoader yields and a Trainer reads, by name, never by position.

A `Batch` holds its sequences in named parts (pairs: `chosen` / `rejected`; KTO: `targets` / `kl_partners`;
K-groups: `responses`; CUT: `judged` / `plain`) plus named per-item tensors (`rewards`, `desirable`, ...). The one
forward of a microbatch runs over the concatenation of the parts it needs (`sequences(parts)`), and `split` cuts
its log-probs back into those parts. Each DataLoader declares the `kind` of batch it yields and each Trainer the
kind it trains on, so a loader that does not fit a loss is refused at start (builders.check_pairing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

import torch

from feedbackalign.logprobs import TokenLogps


@dataclass(frozen=True)
class Sequence:
    """One (prompt, response) sequence; the labels are exactly the response tokens."""

    prompt_ids: tuple[int, ...]     # the formatted prompt, tokenised (after truncation)
    response_ids: tuple[int, ...]   # the response tokens, ending with EOS unless truncated


@dataclass(frozen=True)
class BatchKind:
    """A layout: its parts in forward order, the per-item tensors it carries, and the rows per item."""

    name: str
    parts: tuple[str, ...]
    values: tuple[str, ...] = ()
    optional_values: tuple[str, ...] = ()
    doc: str = ""


KINDS = {kind.name: kind for kind in (
    BatchKind("sft", ("targets",), doc="one SFT target per item"),
    BatchKind("conditional_sft", ("targets",), ("desirable",),
              doc="one target per labelled generation, its prompt ending in a control token"),
    BatchKind("pairs", ("chosen", "rejected"), optional_values=("chosen_scores", "rejected_scores"),
              doc="item i is (chosen[i], rejected[i]) on one prompt"),
    BatchKind("unpaired", ("targets", "kl_partners"), ("desirable", "scores"),
              doc="targets[i] with its label and score; kl_partners[i] = (prompt_i, response of item i+1)"),
    BatchKind("groups", ("responses",), ("rewards",),
              doc="K responses per item, row-major; rewards (B, K)"),
    BatchKind("judged", ("judged", "plain"), ("weight_unlike",),
              doc="judged[i]: judgment-conditioned prompt + response; plain[i]: plain prompt + the same response"),
)}


@dataclass
class Batch:
    """One microbatch of B items: named parts of sequences, named per-item tensors, and where it came from."""

    kind: str
    parts: dict[str, list[Sequence]]
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)    # each item's formatted prompt
    sources: list[str] = field(default_factory=list)    # each item's record, for messages
    step: int = 0
    micro: int = 0
    epoch: int = 0

    def __post_init__(self):
        kind = KINDS.get(self.kind)
        if kind is None:
            raise ValueError(f"batch kind '{self.kind}' is not one of {', '.join(KINDS)}")
        if tuple(self.parts) != kind.parts:
            raise ValueError(f"a '{self.kind}' batch has parts {kind.parts}, got {tuple(self.parts)}")
        missing = [v for v in kind.values if v not in self.values]
        unknown = [v for v in self.values if v not in kind.values + kind.optional_values]
        if missing or unknown:
            raise ValueError(f"a '{self.kind}' batch carries {kind.values} (optionally {kind.optional_values}); "
                             f"missing {missing}, unknown {unknown}")

    @property
    def size(self) -> int:
        """Items in the microbatch (B)."""
        return len(self.prompts)

    def sequences(self, parts: Optional[Seq[str]] = None) -> list[Sequence]:
        """The named parts' sequences in forward order (every part when `parts` is None)."""
        return [s for name in self._names(parts) for s in self.parts[name]]

    def split(self, values: TokenLogps, parts: Optional[Seq[str]] = None) -> dict[str, TokenLogps]:
        """Log-probs of `sequences(parts)` cut back into {part: its rows}."""
        out, start = {}, 0
        for name in self._names(parts):
            n = len(self.parts[name])
            out[name] = values.rows(slice(start, start + n))
            start += n
        if start != values.token_logps.shape[0]:
            raise ValueError(f"log-probs have {values.token_logps.shape[0]} rows for {start} sequences of parts "
                             f"{self._names(parts)}")
        return out

    def _names(self, parts: Optional[Seq[str]]) -> tuple[str, ...]:
        if parts is None:
            return tuple(self.parts)
        unknown = [p for p in parts if p not in self.parts]
        if unknown:
            raise ValueError(f"a '{self.kind}' batch has no part(s) {unknown}; its parts are {tuple(self.parts)}")
        return tuple(p for p in self.parts if p in parts)
