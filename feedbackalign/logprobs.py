"""Per-sequence completion log-probs for every sequence of a microbatch, in packed forwards of bounded size.

Two layouts give the same numbers (to float tolerance; tests/test_logprobs.py):

- `padded`: the classic layout, sequences right-padded to the batch's longest (DPO reference code, HALOs).
- `packed`: padding-free and prefix-shared. Sequences that share a prompt (a pair, a K-group, a KTO item and its
  KL partner) become one group: the prompt once, then each distinct response, groups laid end to end in one row
  with no padding, position ids restarting after each prompt (the shared-prompt layout of arXiv 2410.20305).

Memory of the packed layout is bounded three ways (docs/performance.md has the figures at 7B):

- **A token budget per forward** (`max_tokens`, config `model.max_tokens_per_forward`): a microbatch whose packed
  row would be longer runs as several packed forwards of whole prompt groups (a group longer than the budget is
  cut between its responses, its prompt repeated). Their log-probs are joined before the loss, so the result is
  the one-forward result; what each forward keeps for backward is its block inputs when activation checkpointing
  is on (one hidden vector per token per layer), and every transient (a layer's activations, its recomputation in
  backward, the attention mask) is bounded by the budget, never by how long the responses happen to be.
- **Label log-probs without logits**: the LM head is applied only at label positions, in chunks of rows
  (`LinearLabelLogps`): each chunk's (rows x vocab) logits live inside the chunk; backward recomputes them. Kept
  for backward: the hidden rows and one logsumexp per label. No (labels x vocab) tensor outlives its chunk.
- **Attention without copies** on CUDA: FlexAttention (`torch.nn.attention.flex_attention`) over the packed row
  with a block mask of the prefix-shared causal structure, grouped-query heads read in place (no K/V repeat, no
  per-sequence q/k/v). Elsewhere (CPU, or `model.packed_attention=sdpa`) `prefix_shared_attention` gathers each
  (prompt, response) pair's q/k/v into causal batches of similar length and runs SDPA (`is_causal`): the exact
  fallback, whose cost is the sum of per-sequence squares, never the square of the row. Neither builds a (T, T)
  mask for the whole row.

Values are response-aligned: column k is the k-th response token, so CUT's token-by-token ratio and the
reference cache's token-level entries line up across prompts of different lengths.
"""

from __future__ import annotations

import functools
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np
import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from feedbackalign.errors import ConfigError

LOGSUMEXP_CHUNK = 4096  # rows per logsumexp of a full-logits forward (the padded layout)
LOGITS_CHUNK_BYTES = 128 * 2 ** 20  # fp32 logits of one chunk of label rows in LinearLabelLogps
SHARED_ATTENTION = "prefix_shared"  # registered as "prefix_shared|<the model's own implementation>"
PACKED_ATTENTION = ("auto", "flex", "sdpa")  # model.packed_attention: auto = flex on CUDA, sdpa elsewhere
FLEX_BLOCK = 128  # FlexAttention's tile (queries x keys) of its block-sparse mask
FLEX_MASK_ROWS = 16  # query tiles whose (rows x T) mask is evaluated at once while building the block mask
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
    tokens: int = 0  # non-pad tokens the forwards computed (a shared prompt counts once per forward)
    positions: int = 0  # positions the forwards computed, padding included
    sequence_tokens: int = 0  # sum of len(prompt) + len(response): what an unshared, unpadded forward computes
    logits: int = 0  # non-pad positions whose LM-head logits the forwards computed (throughput.forward_flops)

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


# ---------------------------------------------------------------- label log-probs without a logits tensor


def chunk_rows(vocab: int) -> int:
    """Label rows per LM-head chunk: their fp32 logits take LOGITS_CHUNK_BYTES."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's when it is on for this device, else the input's."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _chunk_logits(hidden, weight, bias, dtype) -> torch.Tensor:
    """(rows, H) x (V, H)^T (+ b) in `dtype`, returned in fp32 (fp64 stays fp64)."""
    logits = F.linear(hidden.to(dtype), weight, None if bias is None else bias.to(dtype))
    return logits.to(torch.promote_types(dtype, torch.float32))


class LinearLabelLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[y] per row of h, in chunks of `chunk_rows(V)` rows (Cut Cross-Entropy's idea,
    Wijmans et al. 2024, with recomputation instead of a fused kernel).

    Forward keeps the hidden rows, the labels and one logsumexp per row; a chunk's fp32 logits are freed when the
    chunk is done. Backward recomputes each chunk's logits: d log softmax(z)[y] / dz = onehot(y) - softmax(z),
    so grad_z = g (onehot(y) - exp(z - lse)), grad_h = grad_z W, grad_W += grad_z^T h (accumulated in W's dtype),
    grad_b += sum(grad_z). Matmuls run in `dtype` (autocast's, passed explicitly: backward runs outside it)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype):
        rows = chunk_rows(weight.shape[0])
        w = weight.to(dtype)
        picked, lse = [], []
        with torch.autocast(hidden.device.type, enabled=False):
            for h, y in zip(hidden.split(rows), labels.split(rows)):
                z = _chunk_logits(h, w, bias, dtype)
                lse.append(torch.logsumexp(z, dim=-1))
                picked.append(z.gather(-1, y.unsqueeze(-1)).squeeze(-1))
                del z
        lse = torch.cat(lse) if lse else hidden.new_zeros(0, dtype=torch.promote_types(dtype, torch.float32))
        ctx.dtype = dtype
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        return (torch.cat(picked) if picked else lse) - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        dtype, rows = ctx.dtype, chunk_rows(weight.shape[0])
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        w = weight.to(dtype)
        grad = grad.to(lse.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                part = slice(start, start + rows)
                g = grad[part].unsqueeze(-1)
                z = _chunk_logits(hidden[part], w, bias, dtype)
                z = z.sub_(lse[part].unsqueeze(-1)).exp_().mul_(-g)  # -g softmax(z)
                z.scatter_add_(-1, labels[part].unsqueeze(-1), g)  # + g at the label
                z = z.to(dtype)
                if need_h:
                    grad_h[part] = (z @ w).to(hidden.dtype)
                if need_w:
                    if grad_w.dtype == dtype:
                        grad_w.addmm_(z.t(), hidden[part].to(dtype))
                    else:
                        grad_w.add_(z.t() @ hidden[part].to(dtype))
                if grad_b is not None:
                    grad_b.add_(z.sum(0).to(grad_b.dtype))
                del z
        return grad_h, grad_w, grad_b, None, None


def linear_label_logps(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[labels]: (M, H), (M,) -> (M,) fp32, chunked (`LinearLabelLogps`)."""
    return LinearLabelLogps.apply(hidden, head.weight, head.bias, labels, compute_dtype(hidden))


@contextmanager
def _label_head(model, labels: torch.Tensor, where: torch.Tensor):
    """While the model runs, its LM head maps the last hidden states at the kept positions to the label
    log-probs, returned as (1, M, 1) in place of the logits (so they leave the model through its output, as FSDP's
    hooks expect). A plain Linear head runs chunked (`linear_label_logps`); any other head (e.g. one carrying LoRA
    adapters) computes its logits and `label_logps` takes the log-softmax."""
    head = model.get_output_embeddings()
    if getattr(model.config, "final_logit_softcapping", None):
        raise ConfigError(f"{type(model).__name__}: final logit softcapping is not supported by the packed layout; "
                          "set model.forward_layout=padded")
    own = head.__dict__.get("forward")  # an instance-level forward another library installed, kept as it was
    plain = type(head) is torch.nn.Linear and own is None

    def label_forward(hidden):  # (1, K, H): the last hidden state at the K kept positions
        rows = hidden[0].index_select(0, where)
        if plain:
            values = linear_label_logps(rows, head, labels)
        else:
            values = label_logps((own or functools.partial(type(head).forward, head))(rows), labels)
        return values.view(1, -1, 1)

    head.forward = label_forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


# ---------------------------------------------------------------- the padded layout


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
    """How the SDPA path reads the flat row: one causal attention sequence per (prompt, distinct response),
    batched in buckets of similar length so little attention work is spent on padding."""

    gathers: list[torch.Tensor]  # per bucket (A_b, L_b): flat positions of each sequence's prompt, then response
    source: torch.Tensor  # (T,) index into the buckets' concatenated (A_b * L_b) outputs for each flat position

    @property
    def longest(self) -> int:
        return max(g.shape[1] for g in self.gathers)

    def to(self, device) -> "PrefixIndex":
        return PrefixIndex([g.to(device) for g in self.gathers], self.source.to(device))


@dataclass
class PrefixMask:
    """How the FlexAttention path reads the flat row: query t sees key s <= t of its own segment or of its
    group's prompt (a segment is a prompt or one response), as a block-sparse mask over FLEX_BLOCK tiles."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    longest: int  # tokens of the longest (prompt, response) sequence (the sliding-window check)


@dataclass
class PackedLayout:
    """Where every token of every sequence sits in the single flat row."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    spans: list[tuple[int, int, int, int]]  # per attention sequence: (prompt start, prompt length, response start, n)
    first_row: list[tuple[int, int, int]]  # per group: (prompt start, prompt length, its first attention sequence)
    predictor: torch.Tensor  # (M,) flat position whose logits predict each label, in sequence order
    labels: torch.Tensor  # (M,) the label tokens: every sequence's response, in sequence order
    lengths: list[int]  # response length of each sequence

    @property
    def index(self) -> PrefixIndex:
        """The SDPA path's gathers (built on the CPU)."""
        return _prefix_index(self.spans, self.first_row, self.input_ids.shape[1])

    def mask(self, device) -> PrefixMask:
        """The FlexAttention path's block mask, built on `device`."""
        owner, prompt_of = _segments(self.spans, self.first_row, self.input_ids.shape[1])
        return PrefixMask(prefix_block_mask(owner.to(device), prompt_of.to(device)),
                          max(p + n for _, p, _, n in self.spans))


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
    labels = np.concatenate([np.asarray(s.response_ids, dtype=np.int64) for s in sequences])
    return PackedLayout(torch.from_numpy(np.concatenate(ids)).unsqueeze(0),
                        torch.from_numpy(np.concatenate(pos)).unsqueeze(0), spans, first_row,
                        torch.from_numpy(np.concatenate(predictors).astype(np.int64)), torch.from_numpy(labels),
                        [len(s.response_ids) for s in sequences])


def packed_tokens(sequences) -> int:
    """Length of the packed row of `sequences`: each distinct prompt once + each distinct response of it once."""
    return sum(len(p) + sum(len(r) for r in responses) for p, responses, _ in _groups(sequences))


def forward_split(sequences, max_tokens: int | None) -> list[list[int]]:
    """Sequence indices of each packed forward: whole prompt groups, in order, while the packed row stays within
    `max_tokens`; a group longer than that alone is cut between its distinct responses (each piece repeats the
    prompt); a single sequence longer than the budget runs alone. None: one forward."""
    if not max_tokens:
        return [list(range(len(sequences)))]
    units: list[tuple[int, list[int]]] = []  # (packed tokens, sequence indices) that stay together
    for prompt, responses, users in _groups(sequences):
        p, size, piece = len(prompt), len(prompt), []
        for resp, seq_ids in zip(responses, users):
            if piece and size + len(resp) > max_tokens:
                units.append((size, piece))
                size, piece = p, []
            size += len(resp)
            piece += seq_ids
        units.append((size, piece))
    forwards, used = [], 0
    for size, indices in units:
        if forwards and used + size <= max_tokens:
            forwards[-1] += indices
            used += size
        else:
            forwards.append(list(indices))
            used = size
    return [sorted(f) for f in forwards]


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


def _segments(spans, first_row, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner, prompt_of), (T,) each: the segment id of every flat position (a prompt and each response are one
    segment) and the segment id of its group's prompt. Query t may see key s iff s <= t and owner[s] is owner[t]
    or prompt_of[t]."""
    owner = np.empty(total, dtype=np.int64)
    prompt_of = np.empty(total, dtype=np.int64)
    segment = 0
    group_end = [at for at, _, _ in first_row[1:]] + [total]
    for (at, p, _), end in zip(first_row, group_end):
        owner[at: at + p] = segment
        prompt_of[at: end] = segment
        segment += 1
    for _, _, start, n in spans:
        owner[start: start + n] = segment
        segment += 1
    return torch.from_numpy(owner), torch.from_numpy(prompt_of)


def prefix_block_mask(owner: torch.Tensor, prompt_of: torch.Tensor):
    """FlexAttention BlockMask of the prefix-shared causal structure, built FLEX_MASK_ROWS query tiles at a time:
    at most (FLEX_MASK_ROWS x FLEX_BLOCK) x T booleans exist at once (`create_block_mask` would evaluate all T x T
    pairs together: ~3 GB at 16k tokens). A tile pair is `full` (no mask evaluated in the kernel) when every
    pair in it may attend, `partial` when some may; positions past T belong to no segment."""
    from torch.nn.attention.flex_attention import BlockMask

    total, device = owner.shape[0], owner.device
    tiles = -(-total // FLEX_BLOCK)
    padded = tiles * FLEX_BLOCK
    owner = torch.cat([owner, owner.new_full((padded - total,), -1)])
    prompt_of = torch.cat([prompt_of, prompt_of.new_full((padded - total,), -2)])
    keys = torch.arange(padded, device=device)
    partial, full = [], []
    for first in range(0, tiles, FLEX_MASK_ROWS):
        q = torch.arange(first * FLEX_BLOCK, min(tiles, first + FLEX_MASK_ROWS) * FLEX_BLOCK, device=device)
        allowed = (keys <= q.unsqueeze(-1)) & ((owner == owner[q].unsqueeze(-1)) |
                                               (owner == prompt_of[q].unsqueeze(-1)))
        allowed = allowed.view(-1, FLEX_BLOCK, tiles, FLEX_BLOCK)
        some, every = allowed.any(3).any(1), allowed.all(3).all(1)
        partial.append(some & ~every)
        full.append(every)

    def block_lists(blocks):  # (Q tiles, KV tiles) bool -> counts (1,1,Q) and indices (1,1,Q,KV), listed first
        blocks = torch.cat(blocks)
        order = torch.argsort((~blocks).to(torch.int32), dim=-1, stable=True)
        return blocks.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((owner[kv_idx] == owner[q_idx]) | (owner[kv_idx] == prompt_of[q_idx]))

    return BlockMask.from_kv_blocks(*block_lists(partial), *block_lists(full), FLEX_BLOCK, mask_mod,
                                    seq_lengths=(total, total))


def _refuse_unsupported(module, longest: int, kwargs) -> None:
    window = kwargs.get("sliding_window")
    if kwargs.get("softcap") is not None or (window is not None and longest > window):
        raise ConfigError(f"{type(module).__name__}: attention softcapping or a sliding window shorter than a sequence "
                          f"({longest} tokens) is not supported by the packed layout; set model.forward_layout=padded")


def prefix_shared_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            prefix_index: PrefixIndex | PrefixMask | None = None, **kwargs):
    """Causal attention of each (prompt, response) sequence inside the flat row: FlexAttention with the block
    mask (`PrefixMask`) or per-sequence SDPA (`PrefixIndex`); the model's own attention implementation when the
    forward carries no `prefix_index` (padded batches, generation)."""
    if prefix_index is None:
        return _base_attention(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)
    _refuse_unsupported(module, prefix_index.longest, kwargs)
    if isinstance(prefix_index, PrefixMask):
        if dropout:
            raise ConfigError(f"{type(module).__name__}: attention dropout is not supported by "
                              "model.packed_attention=flex; use model.packed_attention=sdpa")
        out = _flex_attention(query.device)(query, key, value, block_mask=prefix_index.block_mask, scale=scaling,
                                            enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2), None
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


@functools.lru_cache(maxsize=None)
def _flex_attention(device: torch.device):
    """FlexAttention compiled into fused kernels on CUDA (shapes become dynamic after the first change, so a new
    row length does not recompile each time); unfused eager elsewhere (CPU: forward only, slow, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cuda":
        return torch.compile(flex_attention)

    def eager(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex_attention(*args, **kwargs)

    return eager


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


def attention_path(requested: str, device: torch.device) -> str:
    """`flex` or `sdpa` for model.packed_attention (`auto`: flex on CUDA, where it runs fused, else sdpa)."""
    if requested not in PACKED_ATTENTION:
        raise ConfigError(f"model.packed_attention={requested} is unknown: use {', '.join(PACKED_ATTENTION)}")
    if requested == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if requested == "flex" and device.type != "cuda" and torch.is_grad_enabled():
        raise ConfigError("model.packed_attention=flex trains on CUDA only (FlexAttention has no CPU backward): "
                          "use model.packed_attention=auto or sdpa")
    return requested


def _packed_forward(model, sequences, with_hidden: bool, attention: str) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                                  PackedLayout, int]:
    """One packed forward: (label log-probs (M,) in sequence order, hidden rows (M, H) or None, layout, logit
    positions)."""
    device = next(model.parameters()).device
    layout = pack(sequences)
    route_attention(model)
    index = layout.mask(device) if attention_path(attention, device) == "flex" else layout.index.to(device)
    keep, where = torch.unique(layout.predictor, return_inverse=True)
    with _label_head(model, layout.labels.to(device), where.to(device)):
        out = model(input_ids=layout.input_ids.to(device), position_ids=layout.position_ids.to(device),
                    attention_mask=_NO_MASK.to(device), logits_to_keep=keep.to(device),
                    output_hidden_states=with_hidden, use_cache=False, prefix_index=index)
    hidden = out.hidden_states[-1][0].index_select(0, layout.predictor.to(device)) if with_hidden else None
    return out.logits.view(-1), hidden, layout, len(keep)


def packed_logps(model, sequences, with_hidden: bool = False, *, max_tokens: int | None = None,
                 attention: str = "auto", forwards: int = 1) -> TokenLogps:
    """The flat, prefix-shared layout in forwards of at most `max_tokens` packed tokens (`forward_split`);
    numerically the padded layout's values. `attention`: model.packed_attention.

    `forwards`: run at least this many forwards. A model sharded with FSDP needs every rank to run the same
    forwards (each gathers the weights with the other ranks), and ranks split their own microbatches; a rank
    with fewer forwards than agreed adds forwards of its shortest sequence, tied into the result with weight 0 so
    that its backward runs too, with zero gradient."""
    _check_prompts(sequences)
    split = forward_split(sequences, max_tokens)
    values, hiddens, order = [], [], []
    tokens = logits = 0
    for indices in split:
        v, h, layout, n_logits = _packed_forward(model, [sequences[i] for i in indices], with_hidden, attention)
        values.append(v)
        hiddens.append(h)
        order += indices
        tokens += layout.input_ids.shape[1]
        logits += n_logits
    shortest = min(sequences, key=lambda s: len(s.prompt_ids) + len(s.response_ids))
    for _ in range(forwards - len(split)):
        padding, _, layout, n_logits = _packed_forward(model, [shortest], False, attention)
        values[0] = values[0] + 0.0 * padding.sum()
        tokens += layout.input_ids.shape[1]
        logits += n_logits
    lengths = [len(s.response_ids) for s in sequences]
    flat_values = values[0] if len(split) == 1 else torch.cat(values).index_select(0, _flat_order(order, lengths,
                                                                                                  values[0].device))
    flat_hidden = None
    if with_hidden:
        flat_hidden = hiddens[0] if len(split) == 1 else torch.cat(hiddens).index_select(
            0, _flat_order(order, lengths, hiddens[0].device))
    result = _scatter_rows(flat_values, lengths, flat_hidden)
    result.tokens = result.positions = tokens
    result.logits = logits
    result.sequence_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    return result


def _flat_order(order: list[int], lengths: list[int], device) -> torch.Tensor:
    """Index into the forwards' concatenated label values (sequences in `order`) that puts them in sequence
    order."""
    starts = np.concatenate([[0], np.cumsum([lengths[i] for i in order])])
    where = {seq: starts[k] for k, seq in enumerate(order)}
    index = np.concatenate([np.arange(where[i], where[i] + lengths[i]) for i in range(len(lengths))])
    return torch.from_numpy(index.astype(np.int64)).to(device)


def forward_options(model_config) -> dict:
    """The keyword arguments of `sequence_logps` a run's `model` config sets."""
    return {"layout": model_config.forward_layout, "max_tokens": model_config.max_tokens_per_forward,
            "attention": model_config.packed_attention}


def forward_count(sequences, layout: str = "packed", max_tokens: int | None = None, **_) -> int:
    """Forwards `sequence_logps` runs for `sequences` (ranks of a sharded model agree on the largest)."""
    return len(forward_split(sequences, max_tokens)) if layout == "packed" else 1


def sequence_logps(model, sequences, pad_token_id: int, layout: str = "packed", with_hidden: bool = False, *,
                   max_tokens: int | None = None, attention: str = "auto", forwards: int = 1) -> TokenLogps:
    """Response-aligned token log-probs of `sequences` under `model`, in the chosen layout (`pad_token_id` fills
    the padded layout; `max_tokens`, `attention` and `forwards` shape the packed one)."""
    if layout == "packed":
        return packed_logps(model, sequences, with_hidden, max_tokens=max_tokens, attention=attention,
                            forwards=forwards)
    if layout == "padded":
        return padded_logps(model, sequences, pad_token_id, with_hidden)
    raise ConfigError(f"model.forward_layout={layout} is unknown: use packed or padded")
