"""Progress bars of the long phases (evaluation, the weights fingerprint, judging): shown with a count and an ETA
on a terminal, quiet where stderr is not one (CI, pipes, log files) unless TQDM_DISABLE=0, and never on rank > 0."""

from __future__ import annotations

import io
import re
import sys

import compare
from feedbackalign import ref_cache
from feedbackalign.progress import progress
from helpers import make_trainer
from test_compare import KEY, NORMAL_ROWS, FakeJudge, write_samples


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def bar_lines(text: str, desc: str) -> list[str]:
    """The last state of each redraw of the `desc` bar."""
    return [part.strip() for part in re.split(r"[\r\n]", text) if part.strip().startswith(f"{desc}:")]


def on_terminal(monkeypatch) -> Terminal:
    """stderr as a terminal (patched inside the test: pytest restores its own capture after fixtures run)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_bars_show_on_a_terminal_only_unless_forced(monkeypatch):
    terminal = on_terminal(monkeypatch)
    for _ in progress(range(3), desc="phase"):
        pass
    assert re.search(r"phase: 100%\|.*\| 3/3 \[\d\d:\d\d<\d\d:\d\d", terminal.getvalue())  # count, elapsed<ETA
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    list(progress(range(3), desc="phase"))
    assert piped.getvalue() == ""
    monkeypatch.setenv("TQDM_DISABLE", "0")
    list(progress(range(3), desc="phase"))
    assert "phase: 100%" in piped.getvalue()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    before = terminal.getvalue()
    list(progress(range(3), desc="phase"))
    list(progress(range(3), desc="phase", rank=1))
    assert terminal.getvalue() == before


def test_evaluation_and_the_fingerprint_show_progress(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "loss=dpo", "n_eval_examples=16")
    terminal = on_terminal(monkeypatch)
    trainer.evaluate()
    assert bar_lines(terminal.getvalue(), "eval")[-1].startswith("eval: 100%") and \
        f"{len(trainer.eval_loader)}/{len(trainer.eval_loader)} [" in terminal.getvalue()
    ref_cache.weights_fingerprint(trainer.reference)
    mb = sum(t.numel() * t.element_size() for t in trainer.reference.state_dict().values()) / 1e6
    # a bar over the bytes hashed (leave=False: cleared once done; the tiny model hashes before a redraw)
    assert re.search(rf"fingerprint: +0%\|.*\| 0.00/{mb:.1f}M \[", terminal.getvalue())


def test_judging_shows_progress(tmp_path, monkeypatch):
    terminal = on_terminal(monkeypatch)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    samples = write_samples(tmp_path / "s.json", [row[:3] for row in NORMAL_ROWS])
    judge = FakeJudge()
    try:
        code = compare.main(["-f", str(samples), "-r", str(tmp_path / "r.jsonl"), "--base_url", judge.url,
                             "--concurrency", "2"])
    finally:
        judge.close()
    assert code == 0
    assert re.search(rf"judge: 100%\|.*\| {len(NORMAL_ROWS)}/{len(NORMAL_ROWS)} \[", terminal.getvalue())
