"""Per-sequence completion log-probs for every sequence of a microbatch in ONE forward pass.

Two layouts give the same numbers (to float tolerance; tests/test_logprobs.py):

- `padded`: the classic layout, sequences right-padded to the batch's longest (DPO reference code, HALOs).
- `packed`: padding-free and prefix-shared. Sequences that share a prompt (a pair, a K-group, a KTO item and its
  KL partner) become one group: the prompt once, then each distinct response, all groups laid end to end in ONE
  row with no padding, position ids restarting after each prompt (the shared-prompt layout of arXiv 2410.20305).
  Attention runs per sequence: `prefix_shared_attention` gathers each (prompt, response) pair's queries, keys and
  values into a small causal batch, so its cost is the sum of per-sequence squares, never the square of the row
  (no O(S^2) mask). Logits are computed only at label positions (`logits_to_keep`) and log-softmax never
  materialises: we gather the label logit and subtract a chunked logsumexp.

Values are response-aligned: column k is the k-th response token, so CUT's token-by-token ratio and the
reference cache's token-level entries line up across prompts of different lengths.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np
import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from feedbackalign.errors import ConfigError

LOGSUMEXP_CHUNK = 4096
SHARED_ATTENTION = "prefix_shared"  # registered as "prefix_shared|<the model's own implementation>"
# A 4-D placeholder: transformers passes 4-D masks through untouched, so no (T, T) mask is ever built for the
# packed row; prefix_shared_attention ignores it.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
BUCKET_RATIO = 0.75  # attention rows in one bucket are >= 0.75 x its longest: <= ~44% padded attention work


@dataclass
class TokenLogps:
    """Response-aligned token log-probs (N, L) with a bool mask; padding columns hold 0."""

    token_logps: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor | None = None  # (N, L, H) last hidden state at the positions that predict each token
    tokens: int = 0  # non-pad tokens the forward computed (a shared prompt counts once)
    positions: int = 0  # positions the forward computed, padding included
    sequence_tokens: int = 0  # sum of len(prompt) + len(response): what an unshared, unpadded forward computes
    logits: int = 0  # non-pad positions whose LM-head logits the forward computed (throughput.forward_flops)

    @property
    def sums(self) -> torch.Tensor:
        return (self.token_logps * self.mask).sum(-1)

    @property
    def counts(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def rows(self, index) -> "TokenLogps":
        hidden = self.hidden[index] if self.hidden is not None else None
        return TokenLogps(self.token_logps[index], self.mask[index], hidden)

    @staticmethod
    def from_rows(rows: Seq[torch.Tensor], device=None, dtype=torch.float32) -> "TokenLogps":
        """Stack variable-length 1-D token log-prob rows (e.g. from the reference cache)."""
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        mask = response_mask(lengths).to(device)
        values = torch.zeros(mask.shape, dtype=dtype, device=device)
        if len(rows):
            values[mask] = torch.cat([r.reshape(-1) for r in rows]).to(device=device, dtype=dtype)
        return TokenLogps(values, mask)


def response_mask(lengths: torch.Tensor) -> torch.Tensor:
    """(N,) lengths -> (N, max length) bool mask of the first `length` columns of each row."""
    width = int(lengths.max()) if len(lengths) else 0
    return torch.arange(width, device=lengths.device) < lengths.unsqueeze(-1)


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] as logit[label] - logsumexp(logits), chunked over rows: (M, V), (M,) -> (M,)."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lse = torch.cat([torch.logsumexp(c.float(), dim=-1) for c in logits.split(LOGSUMEXP_CHUNK)]) if len(logits) else \
        logits.new_zeros(0)
    return picked.float() - lse


def _scatter_rows(values: torch.Tensor, lengths: list[int], hidden: torch.Tensor | None) -> TokenLogps:
    """Flat (M,) values in sequence order -> response-aligned (N, L)."""
    mask = response_mask(torch.tensor(lengths, dtype=torch.long)).to(values.device)
    out = values.new_zeros(mask.shape)
    out[mask] = values
    hid = None
    if hidden is not None:
        hid = hidden.new_zeros(*mask.shape, hidden.shape[-1])
        hid[mask] = hidden
    return TokenLogps(out, mask, hid)


def _check_prompts(sequences) -> None:
    if not sequences:
        raise ValueError("log-probs of an empty microbatch: pass at least one sequence")
    if any(not s.prompt_ids for s in sequences):
        raise ValueError("a sequence has an empty prompt: its first response token has no predicting position "
                         "(the dataloader always formats a non-empty prompt)")


def padded_logps(model, sequences, pad_token_id: int, with_hidden: bool = False) -> TokenLogps:
    """The plain layout: right-pad to the longest sequence, full forward, gather response positions."""
    _check_prompts(sequences)
    device = next(model.parameters()).device
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
    width = max(lengths)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    rows, cols, labels = [], [], []
    for i, s in enumerate(sequences):
        input_ids[i, : lengths[i]] = torch.tensor(s.prompt_ids + s.response_ids)
        attention[i, : lengths[i]] = 1
        p, n = len(s.prompt_ids), len(s.response_ids)
        rows.append(np.full(n, i))
        cols.append(np.arange(p - 1, p - 1 + n))
        labels.append(np.asarray(s.response_ids, dtype=np.int64))
    out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                output_hidden_states=with_hidden, use_cache=False)
    rows_t, cols_t = (torch.from_numpy(np.concatenate(x)).long().to(device) for x in (rows, cols))
    values = label_logps(out.logits[rows_t, cols_t], torch.from_numpy(np.concatenate(labels)).to(device))
    hidden = out.hidden_states[-1][rows_t, cols_t] if with_hidden else None
    result = _scatter_rows(values, [len(s.response_ids) for s in sequences], hidden)
    result.tokens = result.sequence_tokens = result.logits = sum(lengths)
    result.positions = input_ids.numel()
    return result


# ---------------------------------------------------------------- the packed, prefix-shared layout


@dataclass
class PrefixIndex:
    """How attention reads the flat row: one causal attention sequence per (prompt, distinct response), batched
    in buckets of similar length so little attention work is spent on padding."""

    gathers: list[torch.Tensor]  # per bucket (A_b, L_b): flat positions of each sequence's prompt, then response
    source: torch.Tensor  # (T,) index into the buckets' concatenated (A_b * L_b) outputs for each flat position

    def to(self, device) -> "PrefixIndex":
        return PrefixIndex([g.to(device) for g in self.gathers], self.source.to(device))


@dataclass
class PackedLayout:
    """Where every token of every sequence sits in the single flat row."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    index: PrefixIndex
    predictor: torch.Tensor  # (M,) flat position whose logits predict each label, in sequence order
    labels: torch.Tensor  # (M,) the label tokens: every sequence's response, in sequence order
    lengths: list[int]  # response length of each sequence


def _groups(sequences) -> list[tuple[tuple[int, ...], list[tuple[int, ...]], list[list[int]]]]:
    """Group by prompt; inside a group, each distinct response once with the sequence indices that use it."""
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, s in enumerate(sequences):
        groups.setdefault(tuple(s.prompt_ids), {}).setdefault(tuple(s.response_ids), []).append(i)
    return [(p, list(r.keys()), list(r.values())) for p, r in groups.items()]


def pack(sequences) -> PackedLayout:
    """Lay prompt groups end to end: prompt once, then each distinct response (no padding anywhere)."""
    _check_prompts(sequences)
    ids, pos, spans, first_row = [], [], [], []  # spans: (prompt start, p, response start, n) per attention seq
    predictors: list = [None] * len(sequences)
    at = 0
    for prompt, responses, users in _groups(sequences):
        p = len(prompt)
        ids.append(np.asarray(prompt, dtype=np.int64))
        pos.append(np.arange(p))
        first_row.append((at, p, len(spans)))
        start = at + p
        for resp, seq_ids in zip(responses, users):
            n = len(resp)
            ids.append(np.asarray(resp, dtype=np.int64))
            pos.append(np.arange(p, p + n))
            spans.append((at, p, start, n))
            where = np.concatenate([[at + p - 1], np.arange(start, start + n - 1)])[:n]
            for i in seq_ids:
                predictors[i] = where
            start += n
        at = start
    index = _prefix_index(spans, first_row, at)
    labels = np.concatenate([np.asarray(s.response_ids, dtype=np.int64) for s in sequences])
    return PackedLayout(torch.from_numpy(np.concatenate(ids)).unsqueeze(0),
                        torch.from_numpy(np.concatenate(pos)).unsqueeze(0), index,
                        torch.from_numpy(np.concatenate(predictors).astype(np.int64)), torch.from_numpy(labels),
                        [len(s.response_ids) for s in sequences])


def length_buckets(lengths: list[int], ratio: float = BUCKET_RATIO) -> list[list[int]]:
    """Indices by decreasing length, cut into buckets whose members are at least `ratio` x the bucket's longest."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if buckets and lengths[i] >= ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _prefix_index(spans, first_row, total: int) -> PrefixIndex:
    """Gather rows [prompt, response] per attention sequence (bucketed by length) and, per flat position, where
    its output lives: a response token in its own row, a prompt token in its group's first row (all rows of a
    group agree on the prompt: causal attention never looks past it)."""
    lengths = [p + n for _, p, _, n in spans]
    base = [0] * len(spans)  # offset of each attention row in the concatenated outputs
    gathers, offset = [], 0
    for bucket in length_buckets(lengths):
        width = lengths[bucket[0]]
        gather = np.zeros((len(bucket), width), dtype=np.int64)
        for r, a in enumerate(bucket):
            at, p, start, n = spans[a]
            gather[r, :p] = np.arange(at, at + p)
            gather[r, p: p + n] = np.arange(start, start + n)
            base[a] = offset + r * width
        gathers.append(torch.from_numpy(gather))
        offset += gather.size
    source = np.empty(total, dtype=np.int64)
    for a, (at, p, start, n) in enumerate(spans):
        source[start: start + n] = base[a] + np.arange(p, p + n)
    for at, p, a in first_row:
        source[at: at + p] = base[a] + np.arange(p)
    return PrefixIndex(gathers, torch.from_numpy(source))


def prefix_shared_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            prefix_index: PrefixIndex | None = None, **kwargs):
    """Causal attention of each (prompt, response) sequence inside the flat row; the model's own attention
    implementation when the forward carries no `prefix_index` (padded batches, generation)."""
    if prefix_index is None:
        return _base_attention(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)
    window, longest = kwargs.get("sliding_window"), max(g.shape[1] for g in prefix_index.gathers)
    if kwargs.get("softcap") is not None or (window is not None and longest > window):
        raise ConfigError(f"{type(module).__name__}: attention softcapping or a sliding window shorter than a sequence "
                         f"({longest} tokens) is not supported by the packed layout; set model.forward_layout=padded")
    heads, dim = query.shape[1], query.shape[-1]
    outputs = []
    for gather in prefix_index.gathers:
        n_rows, width = gather.shape

        def rows(x):  # (1, h, T, D) -> (A_b, h, L_b, D)
            return x[0].index_select(1, gather.reshape(-1)).view(x.shape[1], n_rows, width, dim).transpose(0, 1)

        q, k, v = rows(query), rows(key), rows(value)
        if k.shape[1] != heads:  # grouped-query attention
            k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        outputs.append(out.transpose(1, 2).reshape(n_rows * width, heads, dim))
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return out.index_select(0, prefix_index.source).unsqueeze(0), None


def _base_attention(module):
    """The attention function the model was built with (the part after 'prefix_shared|')."""
    base = module.config._attn_implementation.split("|", 1)[1]
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(base, None)


def route_attention(model) -> None:
    """Point the model's attention at `prefix_shared_attention` (idempotent). Without a `prefix_index` the
    original implementation runs with its own masks, so padded forwards and generation are unchanged; the
    routing is permanent so activation-checkpointing recomputation in backward takes the same path."""
    config = model.config
    current = config._attn_implementation
    if current.startswith(SHARED_ATTENTION + "|"):
        return
    name = f"{SHARED_ATTENTION}|{current}"
    ALL_ATTENTION_FUNCTIONS.register(name, prefix_shared_attention)
    if current in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = name


def packed_logps(model, sequences, with_hidden: bool = False) -> TokenLogps:
    """The flat, prefix-shared layout; numerically the padded layout's values."""
    device = next(model.parameters()).device
    layout = pack(sequences)
    route_attention(model)
    keep, where = torch.unique(layout.predictor, return_inverse=True)
    out = model(input_ids=layout.input_ids.to(device), position_ids=layout.position_ids.to(device),
                attention_mask=_NO_MASK.to(device), logits_to_keep=keep.to(device),
                output_hidden_states=with_hidden, use_cache=False, prefix_index=layout.index.to(device))
    where = where.to(device)
    values = label_logps(out.logits[0].index_select(0, where), layout.labels.to(device))
    hidden = out.hidden_states[-1][0].index_select(0, layout.predictor.to(device)) if with_hidden else None
    result = _scatter_rows(values, layout.lengths, hidden)
    result.tokens = result.positions = layout.input_ids.shape[1]
    result.logits = len(keep)
    result.sequence_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    return result


def sequence_logps(model, sequences, pad_token_id: int, layout: str = "packed", with_hidden: bool = False) -> TokenLogps:
    """Response-aligned token log-probs of `sequences` under `model`, in the chosen layout (`pad_token_id` fills
    the padded layout)."""
    if layout == "packed":
        return packed_logps(model, sequences, with_hidden)
    if layout == "padded":
        return padded_logps(model, sequences, pad_token_id, with_hidden)
    raise ConfigError(f"model.forward_layout={layout} is unknown: use packed or padded")
