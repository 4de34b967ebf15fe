"""The reference log-prob cache on the real tiny model and loaders: cached = live reference (sums and token
values), entries shared by content across losses, seeds and batch sizes, plain float32 bytes on disk."""

from __future__ import annotations

import math
import sqlite3
import time

import numpy as np
import pytest
import torch

from feedbackalign import ref_cache
from feedbackalign.errors import CheckpointError
from helpers import make_trainer
from feedbackalign.throughput import TIMING_METRICS

RUN = ["n_examples=16", "++dataset_options.wordsort.n_prompts=16", "n_eval_examples=0"]


def steps(trainer, n=2):
    """Metrics of the first n optimizer steps (timing keys dropped)."""
    out = []
    for _, batch in zip(range(n), trainer.train_loader):
        metrics = trainer.train_step([batch])
        out.append({k: v for k, v in metrics.items() if k not in TIMING_METRICS})
    return out


@pytest.mark.parametrize("loss", ["dpo", "kto", "nca", "infonca", "ppo"])
def test_cached_reference_gives_the_live_losses(tmp_path, loss):
    """Same token-level reference values (KTO's KL partners and PPO's per-token ratios included) and the same
    losses over two optimizer steps, live vs cached; the cached run holds no reference model."""
    live = make_trainer(tmp_path / "live", f"loss={loss}", *RUN)
    cached = make_trainer(tmp_path / "cached", f"loss={loss}", *RUN, "cache_reference_logprobs=true")
    assert cached.reference is None and live.reference is not None
    batch = next(iter(live.train_loader))
    parts = live.reference_parts
    for part, a in live.reference_logps(batch, parts).items():
        b = cached.reference_logps(batch, parts)[part]
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.token_logps, b.token_logps, rtol=0, atol=1e-5)
    for step, (x, y) in enumerate(zip(steps(live), steps(cached))):
        assert set(x) == set(y)
        for key in x:
            if step == 0 and key == "rewards/accuracies":
                continue  # policy == reference: every margin is 0 up to float noise, and "margin > 0" is noise
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), key


def test_entries_are_shared_across_losses_seeds_and_batch_sizes(tmp_path, capsys):
    """A run with another loss over the same sequences computes nothing; K-groups reuse the pairs' sequences;
    KTO's KL partners depend on the microbatch, so a new batch size computes only the new partners."""
    shared = f"reference_cache_dir={tmp_path / 'refcache'}"

    def cache_pass(name, *overrides):
        trainer = make_trainer(tmp_path / name, *RUN, "cache_reference_logprobs=true", shared, *overrides)
        return trainer.reference_cache.stats

    first = cache_pass("dpo", "loss=dpo")
    assert first["hits"] == 0 and first["misses"] > 0
    assert cache_pass("ncapair", "loss=ncapair") == {"hits": first["misses"], "misses": 0}
    assert cache_pass("dpo_seed", "loss=cdpo", "seed=1", "model.batch_size=4")["misses"] == 0
    nca = cache_pass("nca", "loss=nca")
    assert nca["hits"] == first["misses"] and nca["misses"] > 0   # best and worst of each K=4 group were cached
    assert cache_pass("infonca", "loss=infonca")["misses"] == 0
    kto = cache_pass("kto", "loss=kto")
    assert kto["hits"] > 0 and kto["misses"] > 0                    # targets cached, KL partners new
    assert cache_pass("ppo", "loss=ppo")["misses"] == 0
    smaller = cache_pass("kto_b4", "loss=kto", "model.batch_size=4")
    assert 0 < smaller["misses"] < kto["misses"] and smaller["hits"] > 0
    printed = capsys.readouterr().out
    assert printed.count("misses computed") == 8 and f"0 hits, {first['misses']} misses computed" in printed


def test_disk_format_is_plain_float32_and_cost_per_token(tmp_path):
    """Rows are (sha256 key, n, n float32 little-endian values), nothing pickled; reports bytes per token and
    lookup time (for the README)."""
    trainer = make_trainer(tmp_path, "loss=nca", "cache_reference_logprobs=true",
                           "++dataset_options.wordsort.n_prompts=32", "n_eval_examples=0")
    cache = trainer.reference_cache
    rows = sqlite3.connect(cache.path).execute("SELECT key, n, logps FROM logps").fetchall()
    assert len(rows) == cache.stats["misses"] > 0
    assert all(len(key) == 32 and len(blob) == 4 * n for key, n, blob in rows)
    tokens = sum(n for _, n, _ in rows)
    per_token = cache.path.stat().st_size / tokens
    batch = next(iter(trainer.train_loader))
    sequences = batch.sequences()
    started = time.perf_counter()
    for _ in range(20):
        values = cache.lookup(sequences)
    per_sequence = (time.perf_counter() - started) / (20 * len(sequences))
    first = np.frombuffer(dict((k, b) for k, _, b in rows)[cache.key(sequences[0])], dtype="<f4")
    assert np.array_equal(first, values.token_logps[0, : len(first)].numpy())
    print(f"reference cache: {len(rows)} sequences, {tokens} tokens ({tokens / len(rows):.1f}/sequence), "
          f"{per_token:.2f} disk bytes/token, lookup {per_sequence * 1e6:.0f} us/sequence")
    assert 4 <= per_token < 4 + 300 * len(rows) / tokens   # 4 bytes a token + SQLite's row/index/page overhead


def test_a_missing_entry_and_an_unusable_directory_fail_clearly(tmp_path):
    trainer = make_trainer(tmp_path / "run", "loss=dpo", *RUN, "cache_reference_logprobs=true")
    from feedbackalign.batches import Sequence

    with pytest.raises(CheckpointError, match="has no entry"):
        trainer.reference_cache.lookup([Sequence((5, 6), (7, 8))])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(CheckpointError, match="reference_cache_dir"):
        make_trainer(tmp_path / "bad", "loss=dpo", *RUN, "cache_reference_logprobs=true",
                     f"reference_cache_dir={not_a_dir}")


def flip_stored_values(path, count: int) -> int:
    """Flip one exponent byte inside each of `count` stored value blobs, in the file itself (as a bad disk or a
    stray write would), leaving SQLite's own structure valid; returns how many were flipped."""
    with sqlite3.connect(path) as db:
        blobs = [blob for (blob,) in db.execute("SELECT logps FROM logps ORDER BY key LIMIT ?", (count,))]
    data = bytearray(path.read_bytes())
    for blob in blobs:
        at = data.find(blob)
        assert at >= 0 and data.find(blob, at + 1) < 0          # found once: the value bytes of that row
        data[at + 3] ^= 0x40                                     # the first value's sign/exponent byte
    path.write_bytes(bytes(data))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"   # SQLite sees nothing wrong
    return len(blobs)


def test_damaged_stored_values_are_never_used(tmp_path):
    """Bytes flipped inside stored values: a lookup refuses them naming the file; a rerun's cache pass recomputes
    exactly those entries and trains with the live reference's losses (step 0 of DPO: ln 2)."""
    shared = f"reference_cache_dir={tmp_path / 'refcache'}"
    first = make_trainer(tmp_path / "first", "loss=dpo", *RUN, "cache_reference_logprobs=true", shared)
    flipped = flip_stored_values(first.reference_cache.path, 5)
    reader = ref_cache.ReferenceCache(tmp_path / "refcache", ref_cache.weights_fingerprint(first.policy),
                                      ref_cache.tokenizer_fingerprint(first.tokenizer), create=False)
    assert reader.path == first.reference_cache.path                 # a process reading the file from disk
    with pytest.raises(CheckpointError, match=rf"reference cache {reader.path}: \d+ stored entries .* fail their "
                                              "checksum"):
        for batch in first.train_loader:
            reader.lookup(batch.sequences())

    with pytest.warns(UserWarning, match=f"{flipped} stored entries fail their checksum"):
        rerun = make_trainer(tmp_path / "rerun", "loss=dpo", *RUN, "cache_reference_logprobs=true", shared)
    assert rerun.reference_cache.stats["misses"] == flipped
    live = make_trainer(tmp_path / "live", "loss=dpo", *RUN)
    cached_steps, live_steps = steps(rerun), steps(live)
    assert cached_steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for x, y in zip(cached_steps, live_steps):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    again = make_trainer(tmp_path / "again", "loss=dpo", *RUN, "cache_reference_logprobs=true", shared)
    assert again.reference_cache.stats["misses"] == 0                      # the repaired rows are whole


def test_a_cache_file_from_before_checksums_is_recomputed(tmp_path):
    shared = f"reference_cache_dir={tmp_path / 'refcache'}"
    first = make_trainer(tmp_path / "first", "loss=dpo", *RUN, "cache_reference_logprobs=true", shared)
    entries = first.reference_cache.count()
    first.reference_cache.close()
    with sqlite3.connect(first.reference_cache.path) as db:
        db.execute("ALTER TABLE logps DROP COLUMN checksum")             # the old schema, rows kept
    with pytest.warns(UserWarning, match=f"{entries} stored entries fail their checksum"):
        rerun = make_trainer(tmp_path / "rerun", "loss=dpo", *RUN, "cache_reference_logprobs=true", shared)
    assert rerun.reference_cache.stats == {"hits": 0, "misses": entries}
    assert rerun.reference_cache.count() == entries


def test_one_weight_changed_by_one_ulp_misses_the_whole_cache(tmp_path):
    """The reference's identity covers every weight: starting from the same weights (model.load_from) hits every
    entry; the same weights with ONE element moved by one float32 ulp hit none."""
    from feedbackalign import checkpoints

    shared = f"reference_cache_dir={tmp_path / 'refcache'}"
    first = make_trainer(tmp_path / "first", "loss=dpo", *RUN, "cache_reference_logprobs=true", shared)
    computed = first.reference_cache.stats["misses"]
    state = {k: v.clone() for k, v in first.policy.state_dict().items()}
    torch.save({"state": state}, tmp_path / "same.pt")
    weight = state["model.layers.0.mlp.down_proj.weight"]
    weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))
    torch.save({"state": state}, tmp_path / "one_ulp.pt")
    assert checkpoints.load_policy_weights(tmp_path / "one_ulp.pt")["model.layers.0.mlp.down_proj.weight"][3, 5] \
        != first.policy.state_dict()["model.layers.0.mlp.down_proj.weight"][3, 5]

    def cache_pass(name, load_from):
        trainer = make_trainer(tmp_path / name, "loss=dpo", *RUN, "cache_reference_logprobs=true", shared,
                               f"model.load_from={load_from}")
        return trainer.reference_cache.stats

    assert cache_pass("same", tmp_path / "same.pt") == {"hits": computed, "misses": 0}
    assert cache_pass("one_ulp", tmp_path / "one_ulp.pt") == {"hits": 0, "misses": computed}


def test_cache_pass_runs_token_budgeted_rounds_with_progress(tmp_path, capfd, monkeypatch):
    """Each round is one packed forward of whole prompt groups within model.max_tokens_per_forward (so a K-group
    computes its prompt once), every missing sequence in exactly one round; the pass shows a bar with the
    sequences written, rate and ETA (forced on: stderr is not a terminal here)."""
    from feedbackalign import ref_cache
    from feedbackalign.logprobs import packed_tokens

    monkeypatch.setenv("TQDM_DISABLE", "0")
    trainer = make_trainer(tmp_path, "loss=nca", *RUN, "cache_reference_logprobs=true",
                           "model.max_tokens_per_forward=200")
    misses = trainer.reference_cache.stats["misses"]
    bar = capfd.readouterr().err
    assert "reference cache" in bar and f"{misses}/{misses}" in bar and "seq/s" in bar
    sequences = ref_cache.all_sequences([trainer.train_loader], trainer.reference_parts)
    todo = [(trainer.reference_cache.key(s), s) for s in sequences]
    rounds = ref_cache.rounds(todo, 200)
    assert sorted(k for r in rounds for k, _ in r) == sorted(k for k, _ in todo) and len(todo) == misses
    assert all(packed_tokens([s for _, s in r]) <= 200 for r in rounds)
    assert len(rounds) < len({s.prompt_ids for s in sequences}) < len(sequences)  # groups share rounds and prompts
