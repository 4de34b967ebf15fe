"""Reference log-prob cache: token-level values on disk, keyed by content, valid for every loss.

Key of one entry = sha256(reference identity, tokenizer identity, prompt token ids, response token ids). The label
mask is the prompt/response split itself, so two losses that see the same sequence share the entry, and a KTO KL
partner (x_i, y_j) is just another sequence. Values are the response-aligned token log-probs in float32, so
losses needing sums, means or per-token ratios (PPO) are all served. The reference identity hashes the weights
(names normalised, LoRA adapters left out), so a LoRA run (base with adapters disabled) and a full run from the
same base share entries.

Storage: one SQLite file per identity, `<reference_cache_dir>/<identity>.sqlite`, table
`logps(key BLOB PRIMARY KEY, n INTEGER, logps BLOB)` with raw little-endian float32 bytes: nothing executable is
ever loaded. Disk: 4 bytes per response token + ~140 bytes per sequence (key twice, row and B-tree overhead;
6.2 B/token at HH's 65 tokens a response with the tiny tokenizer, 4.7 at 300). Memory: only the microbatch being
looked up, (N, L) float32 + bool mask. A lookup is one indexed SELECT per microbatch (~0.1 ms per sequence).

The cache pass (`build`) runs before training: every rank lists the sequences it will see; rank 0 decides which
are missing (each computed once, by the lowest rank that holds it); ranks compute their share in rounds (equal
rounds on every rank, so a sharded FSDP reference works) and rank 0 writes each round. With several nodes
`reference_cache_dir` must be on a filesystem every node sees.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from feedbackalign.checkpoints import plain_name
from feedbackalign.batches import Sequence
from feedbackalign.errors import CheckpointError
from feedbackalign.logprobs import TokenLogps, sequence_logps
from feedbackalign.models import is_lora
from feedbackalign.progress import progress

QUERY_CHUNK = 500  # keys per SQL `IN (...)` (SQLite's variable limit is larger; this keeps statements short)


def weights_fingerprint(model: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """blake2b of every parameter and buffer (normalised name, dtype, shape, bytes): the reference's identity.
    `dtype`: fingerprint the parameters as stored in that dtype (cast one tensor at a time), buffers as they are.

    LoRA adapter weights are left out: the reference of a LoRA run is the base with adapters disabled."""
    h = hashlib.blake2b(digest_size=16)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)} if dtype is not None else set()
    tensors = sorted((plain_name(n), n, t) for n, t in model.state_dict().items() if "lora_" not in n)
    size = {n: t.numel() * (dtype.itemsize if n in params else t.element_size()) for _, n, t in tensors}
    with progress(desc="fingerprint", total=sum(size.values()), unit="B", unit_scale=True,
                  leave=False) as bar:  # 7B bf16: 14.5 GB, ~50 s at 0.3 GB/s here
        for name, key, tensor in tensors:
            t = tensor.detach().cpu()
            t = (t.to(dtype) if key in params else t).contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself: no copy
            bar.update(size[key])
    return h.hexdigest()


def reference_identity(model: torch.nn.Module, world_size: int, dtype: torch.dtype | None = None) -> str:
    """The weights fingerprint (as stored in `dtype`, if given), computed once on rank 0 (the rank that holds
    the full weights) and broadcast.

    Call before sharding: it reads the full tensors."""
    value = [weights_fingerprint(model, dtype) if world_size == 1 or dist.get_rank() == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def sequence_key(prefix: bytes, sequence) -> bytes:
    h = hashlib.sha256(prefix)
    h.update(np.asarray(sequence.prompt_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(sequence.response_ids, dtype=np.int64).tobytes())
    return h.digest()


def token_rows(keys: list[bytes], values: TokenLogps) -> list[tuple[bytes, int, bytes]]:
    """(key, n, float32 bytes) per sequence: the response-aligned values under the mask."""
    rows = []
    for i, key in enumerate(keys):
        v = values.token_logps[i][values.mask[i]].detach().float().cpu().numpy().astype("<f4")
        rows.append((key, len(v), v.tobytes()))
    return rows


class ReferenceCache:
    """Lookups and inserts of token-level reference log-probs for one (reference, tokenizer) identity."""

    def __init__(self, directory, reference_id: str, tokenizer_id: str, create: bool = True):
        self.directory = Path(directory)
        self.identity = hashlib.sha256(f"{reference_id}|{tokenizer_id}".encode()).hexdigest()[:32]
        self.prefix = self.identity.encode()
        self.path = self.directory / f"{self.identity}.sqlite"
        self.stats = {"hits": 0, "misses": 0}
        try:
            if create:
                self.directory.mkdir(parents=True, exist_ok=True)
            elif not self.path.is_file():
                raise CheckpointError(f"reference cache {self.path} is not visible on this process: put "
                                "reference_cache_dir on a filesystem every node shares")
            self.db = sqlite3.connect(self.path, timeout=600, check_same_thread=False)
            if create:
                self.db.execute("CREATE TABLE IF NOT EXISTS logps "
                                "(key BLOB PRIMARY KEY, n INTEGER NOT NULL, logps BLOB NOT NULL)")
                self.db.commit()
        except (OSError, sqlite3.Error) as e:
            raise CheckpointError(f"reference_cache_dir={self.directory}: cannot open {self.path.name} ({e}); point "
                            "reference_cache_dir at a writable directory or delete the damaged file") from None

    def key(self, sequence) -> bytes:
        return sequence_key(self.prefix, sequence)

    def _select(self, columns: str, keys: list[bytes]):
        for i in range(0, len(keys), QUERY_CHUNK):
            chunk = keys[i: i + QUERY_CHUNK]
            yield from self.db.execute(f"SELECT {columns} FROM logps WHERE key IN ({','.join('?' * len(chunk))})",
                                       chunk)

    def missing(self, keys) -> set[bytes]:
        keys = list(dict.fromkeys(keys))
        return set(keys) - {row[0] for row in self._select("key", keys)}

    def insert_rows(self, rows: list[tuple[bytes, int, bytes]]) -> None:
        """Insert (key, n, bytes) rows in one transaction (atomic: a crash leaves the file consistent)."""
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO logps VALUES (?, ?, ?)", rows)

    def lookup(self, sequences, device=None) -> TokenLogps:
        """Token log-probs of `sequences`, response-aligned, from disk; a miss means the cache pass missed it."""
        keys = [self.key(s) for s in sequences]
        found = {key: np.frombuffer(blob, dtype="<f4", count=n)
                 for key, n, blob in self._select("key, n, logps", list(dict.fromkeys(keys)))}
        rows = []
        for key, seq in zip(keys, sequences):
            if key not in found or len(found[key]) != len(seq.response_ids):
                raise CheckpointError(f"reference cache {self.path} has no entry for a sequence of this run; delete the "
                                "file and rerun to rebuild it")
            rows.append(torch.from_numpy(found[key].copy()))
        return TokenLogps.from_rows(rows, device=device)

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM logps").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def all_sequences(loaders, parts=None) -> list:
    """Every sequence of the named batch `parts` (None: all) the run will see, in this rank's share: iterate each
    loader once and put it back."""
    seen = {}
    for loader in loaders:
        if loader is None:
            continue
        state = loader.state_dict()
        loader.load_state_dict({**state, "next_step": 0})
        for batch in loader:
            for s in batch.sequences(parts):
                seen.setdefault((s.prompt_ids, s.response_ids), s)
        loader.load_state_dict(state)
    return list(seen.values())


def plan(cache, sequences, rank: int, world_size: int) -> tuple[list, int, int]:
    """([(key, sequence)] this rank computes, global hits, global misses): rank 0 asks the file which of all
    ranks' distinct keys are missing; each missing key is computed once, by the lowest rank that holds it."""
    mine = dict((cache.key(s), s) for s in sequences)
    if world_size == 1:
        missing = cache.missing(list(mine))
        return [(k, s) for k, s in mine.items() if k in missing], len(mine) - len(missing), len(missing)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, list(mine))
    union = list(dict.fromkeys(k for keys_of_rank in everyone for k in keys_of_rank))
    decided = [sorted(cache.missing(union)) if rank == 0 else None]
    dist.broadcast_object_list(decided, src=0)
    missing = set(decided[0])
    owner = {}
    for r, keys_of_rank in enumerate(everyone):
        for k in keys_of_rank:
            if k in missing:
                owner.setdefault(k, r)
    return [(k, s) for k, s in mine.items() if owner.get(k) == rank], len(union) - len(missing), len(missing)


@torch.no_grad()
def fill(cache, model, sequences, pad_token_id: int, *, layout: str, batch_sequences: int, context=None,
         rank: int = 0, world_size: int = 1, sharded: bool = False) -> tuple[int, int]:
    """Compute and store the missing entries among every rank's `sequences`; returns global (hits, misses).

    Every rank runs the same number of rounds (a sharded reference needs every rank in each forward; a rank
    with no work left forwards a dummy); rank 0 gathers and writes each round's rows."""
    todo, hits, misses = plan(cache, sequences, rank, world_size)
    rounds = -(-len(todo) // batch_sequences)
    if world_size > 1:
        total = torch.tensor([rounds], dtype=torch.long, device=next(model.parameters()).device)  # NCCL: on GPU
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        rounds = int(total.item())
    was_training = model.training
    model.eval()
    with context if context is not None else nullcontext():
        for i in range(rounds):
            chunk = todo[i * batch_sequences: (i + 1) * batch_sequences]
            rows = []
            if chunk:
                values = sequence_logps(model, [s for _, s in chunk], pad_token_id, layout)
                rows = token_rows([k for k, _ in chunk], values)
            elif sharded:
                sequence_logps(model, [sequences[0] if sequences else Sequence((pad_token_id,), (pad_token_id,))],
                               pad_token_id, layout)
            if world_size > 1:
                parts = [None] * world_size if rank == 0 else None
                dist.gather_object(rows, parts, dst=0)
                rows = [row for part in parts for row in part] if rank == 0 else []
            if rank == 0 and rows:
                cache.insert_rows(rows)
    model.train(was_training)
    return hits, misses


def build(cfg, tokenizer, model, identity: str, loaders, *, parts=None, rank: int, world_size: int,
          sharded: bool = False) -> ReferenceCache:
    """The cache pass before training: every sequence of the batches' `parts` (the ones the trainer scores with
    the reference; None: all) of the run, sharded across ranks; prints hits/misses.

    `model` is the reference (or, for LoRA, the policy, whose adapters are disabled here); `identity` comes
    from `reference_identity` (taken before sharding)."""
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    started = time.perf_counter()
    writer = open_writer(cfg.reference_cache_dir, identity, tokenizer_id, rank, world_size)
    sequences = all_sequences(loaders, parts)
    context = model.disable_adapter() if is_lora(model) else None
    hits, misses = fill(writer if writer is not None else _KeyOnly(identity, tokenizer_id), model, sequences,
                        tokenizer.pad_token_id, layout=cfg.model.forward_layout,
                        batch_sequences=max(2, 2 * cfg.model.eval_batch_size // max(world_size, 1)),
                        context=context, rank=rank, world_size=world_size, sharded=sharded)
    if world_size > 1:
        dist.barrier()
    cache = writer or ReferenceCache(cfg.reference_cache_dir, identity, tokenizer_id, create=False)
    if rank == 0:
        print(f"reference cache {cache.path}: {hits} hits, {misses} misses computed "
              f"({time.perf_counter() - started:.1f}s, {cache.count()} entries)", flush=True)
    cache.stats = {"hits": hits, "misses": misses}
    return cache


def open_writer(directory, identity: str, tokenizer_id: str, rank: int, world_size: int) -> ReferenceCache | None:
    """Rank 0 opens (creates) the file; its failure is raised on every rank, so no rank waits for it."""
    writer, error = None, [None]
    if rank == 0:
        try:
            writer = ReferenceCache(directory, identity, tokenizer_id, create=True)
        except CheckpointError as e:
            error[0] = str(e)
    if world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise CheckpointError(error[0])
    return writer


class _KeyOnly:
    """The key function of a cache without opening its file (ranks other than 0 during the pass)."""

    def __init__(self, reference_id: str, tokenizer_id: str):
        identity = hashlib.sha256(f"{reference_id}|{tokenizer_id}".encode()).hexdigest()[:32]
        self.prefix = identity.encode()

    def key(self, sequence) -> bytes:
        return sequence_key(self.prefix, sequence)
