"""Per-sequence completion log-probs for every sequence of a microbatch in ONE forward pass.

Two layouts give the same numbers (to float tolerance; tests/test_logprobs.py):

- `padded`: the classic layout, sequences right-padded to the batch's longest (DPO reference code, HALOs).
- `packed`: padding-free and prefix-shared. Sequences that share a prompt (a pair, a K-group, a KTO item and its
  KL partner) become one group: the prompt once, then each distinct response, with a block-causal mask so each
  response sees the prompt and itself only, and position ids restarting after the prompt (the shared-prompt
  attention of arXiv 2410.20305). Groups are packed first-fit into rows of `row_tokens`. Logits are computed only
  at label positions (`logits_to_keep`), and log-softmax never materialises: we gather the label logit and
  subtract a chunked logsumexp.

Values are response-aligned: column k is the k-th response token, so CUT's token-by-token ratio and the
reference cache's token-level entries line up across prompts of different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

LOGSUMEXP_CHUNK = 4096


@dataclass
class TokenLogps:
    """Response-aligned token log-probs (N, L) with a bool mask; padding columns hold 0."""

    token_logps: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor | None = None  # (N, L, H) last hidden state at the positions that predict each token
    tokens: int = 0  # non-pad tokens the forward computed (a shared prompt counts once)
    positions: int = 0  # positions the forward computed, padding included

    @property
    def sums(self) -> torch.Tensor:
        return (self.token_logps * self.mask).sum(-1)

    @property
    def counts(self) -> torch.Tensor:
        return self.mask.sum(-1)

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)

    def rows(self, index) -> "TokenLogps":
        hidden = self.hidden[index] if self.hidden is not None else None
        return TokenLogps(self.token_logps[index], self.mask[index], hidden)

    @staticmethod
    def from_rows(rows: Seq[torch.Tensor], device=None, dtype=torch.float32) -> "TokenLogps":
        """Stack variable-length 1-D token log-prob rows (e.g. from the reference cache)."""
        width = max((len(r) for r in rows), default=0)
        values = torch.zeros(len(rows), width, dtype=dtype, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            values[i, : len(r)] = r.to(device=device, dtype=dtype)
            mask[i, : len(r)] = True
        return TokenLogps(values, mask)


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] as logit[label] - logsumexp(logits), chunked over rows: (M, V), (M,) -> (M,)."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lse = torch.cat([torch.logsumexp(c.float(), dim=-1) for c in logits.split(LOGSUMEXP_CHUNK)]) if len(logits) else \
        logits.new_zeros(0)
    return picked.float() - lse


def _scatter_rows(values: torch.Tensor, lengths: list[int], hidden: torch.Tensor | None) -> TokenLogps:
    """Flat (M,) values in sequence order -> response-aligned (N, L)."""
    n, width = len(lengths), max(lengths, default=0)
    mask = torch.zeros(n, width, dtype=torch.bool, device=values.device)
    for i, r in enumerate(lengths):
        mask[i, :r] = True
    out = values.new_zeros(n, width)
    out[mask] = values
    hid = None
    if hidden is not None:
        hid = hidden.new_zeros(n, width, hidden.shape[-1])
        hid[mask] = hidden
    return TokenLogps(out, mask, hid)


def padded_logps(model, sequences, pad_token_id: int, with_hidden: bool = False) -> TokenLogps:
    """The plain layout: right-pad to the longest sequence, full forward, gather response positions."""
    device = next(model.parameters()).device
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
    width = max(lengths)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    rows, cols, labels = [], [], []
    for i, s in enumerate(sequences):
        ids = list(s.prompt_ids) + list(s.response_ids)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        p = len(s.prompt_ids)
        rows += [i] * len(s.response_ids)
        cols += range(p - 1, p - 1 + len(s.response_ids))
        labels += s.response_ids
    out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                output_hidden_states=with_hidden, use_cache=False)
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    values = label_logps(out.logits[rows_t, cols_t], torch.tensor(labels, device=device))
    hidden = out.hidden_states[-1][rows_t, cols_t] if with_hidden else None
    result = _scatter_rows(values, [len(s.response_ids) for s in sequences], hidden)
    result.tokens, result.positions = sum(lengths), input_ids.numel()
    return result


@dataclass
class PackedLayout:
    """Where every token of every sequence sits in the packed rows."""

    input_ids: torch.Tensor  # (R, S)
    position_ids: torch.Tensor  # (R, S)
    attention_mask: torch.Tensor  # (R, 1, S, S) bool, True = may attend
    predictor: list[torch.Tensor]  # per row: flat positions whose logits predict a label
    labels: list[torch.Tensor]  # per row: the label token at each of those positions
    order: list[torch.Tensor]  # per row: index into the flat (sequence-ordered) label list
    real_tokens: int  # non-pad tokens processed (shared prompts counted once)


def _groups(sequences) -> list[tuple[tuple[int, ...], list[tuple[int, ...]], list[list[int]]]]:
    """Group by prompt; inside a group, each distinct response once with the sequence indices that use it."""
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, s in enumerate(sequences):
        groups.setdefault(tuple(s.prompt_ids), {}).setdefault(tuple(s.response_ids), []).append(i)
    return [(p, list(r.keys()), list(r.values())) for p, r in groups.items()]


def pack(sequences, pad_token_id: int, row_tokens: int) -> PackedLayout:
    """First-fit-decreasing packing of prompt groups into rows, with the block-causal prefix-sharing mask."""
    groups = _groups(sequences)
    sizes = [len(p) + sum(len(r) for r in rs) for p, rs, _ in groups]
    capacity = max(row_tokens, max(sizes))
    rows: list[list[int]] = []
    loads: list[int] = []
    for g in sorted(range(len(groups)), key=lambda g: -sizes[g]):
        for r, load in enumerate(loads):
            if load + sizes[g] <= capacity:
                rows[r].append(g)
                loads[r] += sizes[g]
                break
        else:
            rows.append([g])
            loads.append(sizes[g])
    offsets = [0]
    for s in sequences:
        offsets.append(offsets[-1] + len(s.response_ids))
    width = max(loads)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    mask = torch.zeros((n_rows, 1, width, width), dtype=torch.bool)
    predictor, labels, order = [], [], []
    for r, members in enumerate(rows):
        at, pred, lab, ordr = 0, [], [], []
        for g in members:
            prompt, responses, users = groups[g]
            p = len(prompt)
            input_ids[r, at: at + p] = torch.tensor(prompt)
            position_ids[r, at: at + p] = torch.arange(p)
            mask[r, 0, at: at + p, at: at + p] = torch.ones(p, p, dtype=torch.bool).tril()
            start = at + p
            for resp, seq_ids in zip(responses, users):
                n = len(resp)
                input_ids[r, start: start + n] = torch.tensor(resp)
                position_ids[r, start: start + n] = torch.arange(p, p + n)
                mask[r, 0, start: start + n, at: at + p] = True
                mask[r, 0, start: start + n, start: start + n] = torch.ones(n, n, dtype=torch.bool).tril()
                positions = [at + p - 1] + list(range(start, start + n - 1))
                for i in seq_ids:
                    pred += positions
                    lab += resp
                    ordr += range(offsets[i], offsets[i] + n)
                start += n
            at = start
        # pad positions attend to themselves so no softmax row is empty
        for t in range(at, width):
            mask[r, 0, t, t] = True
        predictor.append(torch.tensor(pred, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
        order.append(torch.tensor(ordr, dtype=torch.long))
    return PackedLayout(input_ids, position_ids, mask, predictor, labels, order, sum(loads))


def packed_logps(model, sequences, pad_token_id: int, row_tokens: int = 2048, with_hidden: bool = False
                 ) -> TokenLogps:
    """The packed, prefix-shared layout; numerically the padded layout's values."""
    device = next(model.parameters()).device
    layout = pack(sequences, pad_token_id, row_tokens)
    keep = torch.unique(torch.cat(layout.predictor)) if len(layout.predictor) > 1 else layout.predictor[0].unique()
    out = model(input_ids=layout.input_ids.to(device), position_ids=layout.position_ids.to(device),
                attention_mask=layout.attention_mask.to(device), logits_to_keep=keep.to(device),
                output_hidden_states=with_hidden, use_cache=False)
    where = torch.full((layout.input_ids.shape[1],), -1, dtype=torch.long)
    where[keep] = torch.arange(len(keep))
    total = sum(len(o) for o in layout.order)
    values = torch.zeros(total, dtype=torch.float32, device=device)
    hidden = None
    if with_hidden:
        last = out.hidden_states[-1]
        hidden = last.new_zeros(total, last.shape[-1])
    for r in range(len(layout.predictor)):
        cols = where[layout.predictor[r]].to(device)
        dst = layout.order[r].to(device)
        values[dst] = label_logps(out.logits[r, cols], layout.labels[r].to(device))
        if with_hidden:
            hidden[dst] = last[r, layout.predictor[r].to(device)]
    result = _scatter_rows(values, [len(s.response_ids) for s in sequences], hidden)
    result.tokens, result.positions = layout.real_tokens, layout.input_ids.numel()
    return result


def sequence_logps(model, sequences, pad_token_id: int, layout: str = "packed", row_tokens: int = 2048,
                   with_hidden: bool = False) -> TokenLogps:
    """Response-aligned token log-probs of `sequences` under `model`, in the chosen layout."""
    if layout == "packed":
        return packed_logps(model, sequences, pad_token_id, row_tokens, with_hidden)
    if layout == "padded":
        return padded_logps(model, sequences, pad_token_id, with_hidden)
    raise ValueError(f"unknown forward layout '{layout}': use packed or padded")
