"""Reference log-prob cache: token-level values on disk, keyed by content, valid for every loss.

Key of one entry = sha256(reference identity, tokenizer identity, prompt token ids, response token ids). The label
mask is the prompt/response split itself, so two losses that see the same sequence share the entry, and a KTO KL
partner (x_i, y_j) is just another sequence. Values are the response-aligned token log-probs in float32, so
losses needing sums, means or per-token ratios are all served.

Storage: one SQLite file per reference identity, `<reference_cache_dir>/<identity>.sqlite`, table
`logps(key BLOB PRIMARY KEY, n INTEGER, logps BLOB)` with raw little-endian float32 bytes: nothing executable is
ever loaded. Cost: 4 bytes per response token on disk (+ ~70 bytes per sequence for key and index); in memory only
the microbatch being looked up.

Ranks build their own share of the missing entries and write them under SQLite's file lock (WAL); with several
nodes `reference_cache_dir` must be on a shared filesystem.
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

from feedback import DataError
from logprobs import TokenLogps, sequence_logps


def weights_fingerprint(model: torch.nn.Module) -> str:
    """blake2b of every parameter and buffer (name, dtype, shape, bytes): the reference's identity.

    LoRA adapter weights are left out: the reference of a LoRA run is the base with adapters disabled."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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


class ReferenceCache:
    """Lookups and inserts of token-level reference log-probs for one (reference, tokenizer) identity."""

    def __init__(self, directory, reference_id: str, tokenizer_id: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.identity = hashlib.sha256(f"{reference_id}|{tokenizer_id}".encode()).hexdigest()[:32]
        self.prefix = self.identity.encode()
        self.path = self.directory / f"{self.identity}.sqlite"
        self.db = sqlite3.connect(self.path, timeout=600, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS logps (key BLOB PRIMARY KEY, n INTEGER NOT NULL, logps BLOB NOT NULL)")
        self.db.commit()

    def key(self, sequence) -> bytes:
        return sequence_key(self.prefix, sequence)

    def missing(self, keys: list[bytes]) -> set[bytes]:
        present = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i: i + 500]
            rows = self.db.execute(f"SELECT key FROM logps WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            present.update(r[0] for r in rows)
        return set(keys) - present

    def insert(self, keys: list[bytes], values: TokenLogps) -> None:
        rows = []
        for i, key in enumerate(keys):
            v = values.token_logps[i][values.mask[i]].detach().float().cpu().numpy().astype("<f4")
            rows.append((key, len(v), v.tobytes()))
        self.db.executemany("INSERT OR IGNORE INTO logps VALUES (?, ?, ?)", rows)
        self.db.commit()

    def lookup(self, sequences, device=None) -> TokenLogps:
        """Token log-probs of `sequences`, response-aligned, from disk; a miss is a bug in the cache pass."""
        keys = [self.key(s) for s in sequences]
        found = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            chunk = unique[i: i + 500]
            for key, n, blob in self.db.execute(
                    f"SELECT key, n, logps FROM logps WHERE key IN ({','.join('?' * len(chunk))})", chunk):
                found[key] = np.frombuffer(blob, dtype="<f4", count=n)
        rows = []
        for key, seq in zip(keys, sequences):
            if key not in found or len(found[key]) != len(seq.response_ids):
                raise DataError(f"reference cache {self.path} has no entry for a sequence of this run; delete the "
                                "file and rerun to rebuild it")
            rows.append(torch.from_numpy(found[key].copy()))
        return TokenLogps.from_rows(rows, device=device)

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM logps").fetchone()[0]


def _all_sequences(loaders) -> list:
    """Every sequence the run will see, in this rank's share: iterate each loader once and put it back."""
    seen = {}
    for loader in loaders:
        if loader is None:
            continue
        state = loader.state_dict()
        for batch in loader:
            for s in batch["sequences"]:
                seen.setdefault((s.prompt_ids, s.response_ids), s)
        loader.load_state_dict(state)
    return list(seen.values())


@torch.no_grad()
def fill(cache: ReferenceCache, model, sequences, pad_token_id: int, *, layout: str, row_tokens: int,
         batch_sequences: int, context=None) -> tuple[int, int]:
    """Compute and store the missing entries among `sequences`; returns (hits, misses)."""
    keys = [cache.key(s) for s in sequences]
    missing = cache.missing(keys)
    todo = [(k, s) for k, s in zip(keys, sequences) if k in missing]
    was_training = model.training
    model.eval()
    with context if context is not None else nullcontext():
        for i in range(0, len(todo), batch_sequences):
            chunk = todo[i: i + batch_sequences]
            values = sequence_logps(model, [s for _, s in chunk], pad_token_id, layout, row_tokens)
            cache.insert([k for k, _ in chunk], values)
    model.train(was_training)
    return len(sequences) - len(todo), len(todo)


def build(cfg, tokenizer, model, loaders, *, rank: int, world_size: int) -> ReferenceCache:
    """The cache pass before training: every sequence of the run, sharded across ranks; prints hits/misses."""
    identity = "|".join([weights_fingerprint(model), str(cfg.model.reference_dtype)])
    cache = ReferenceCache(cfg.reference_cache_dir, identity, tokenizer_fingerprint(tokenizer))
    started = time.perf_counter()
    sequences = _all_sequences(loaders)
    context = model.disable_adapter() if hasattr(model, "disable_adapter") else None
    hits, misses = fill(cache, model, sequences, tokenizer.pad_token_id, layout=cfg.model.forward_layout,
                        row_tokens=cfg.model.pack_tokens, batch_sequences=max(2, 2 * cfg.model.eval_batch_size),
                        context=context)
    counts = torch.tensor([hits, misses], dtype=torch.long)
    if world_size > 1:
        dist.all_reduce(counts)
        dist.barrier()
    if rank == 0:
        print(f"reference cache {cache.path}: {counts[0].item()} hits, {counts[1].item()} misses computed "
              f"({time.perf_counter() - started:.1f}s, {cache.count()} entries)", flush=True)
    cache.stats = {"hits": int(counts[0]), "misses": int(counts[1])}
    return cache
