"""compare.py against a real OpenAI-compatible HTTP server on 127.0.0.1, through the real openai client.

The fake judge reads the prompt compare.py sends and decides from the two responses' text: a response holding
GOOD beats one without it (two GOODs or none: tie); BIAS in either makes it answer A whatever the order (a
position-biased judge); GARBLE in response A makes it answer without a verdict line. A `[fail:k1,k2]` tag in a
response makes the server fail the first attempts of each order with those kinds (429, 500, 503, slow beyond
the client timeout, an HTML body, broken JSON, a body without choices, a dropped connection).
"""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import compare
from feedbackalign import stats
from feedbackalign.errors import DataError

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-SECRET-4f9a"
SLOW_S, TIMEOUT_S = 1.0, 0.4
_RESPONSE = re.compile(r"\[Response (A|B)\]\n(.*?)\n\[End of response \1\]", re.DOTALL)
_PLAN = re.compile(r"\[fail:([a-z0-9,]+)\]")


def decide(a: str, b: str) -> str:
    """The fake judge's answer for response a shown as A and b shown as B."""
    if "GARBLE" in a:
        return "Both responses have merit and I cannot choose."
    if "BIAS" in a or "BIAS" in b:
        return "The first response reads better.\nWinner: A"
    good_a, good_b = "GOOD" in a, "GOOD" in b
    if good_a == good_b:
        return "Neither is clearly better.\nWinner: tie."
    return f"One response answers the question.\n**Winner: {'A' if good_a else 'B'}**"


class FakeJudge:
    """A ThreadingHTTPServer speaking /v1/chat/completions; counts attempts and answers per (A, B) text pair."""

    def __init__(self, delay: float = 0.0, key: str = KEY, lifetime: float = 120.0):
        self.delay, self.key = delay, key
        self.lock = threading.Lock()
        self.requests = 0
        self.attempts, self.answered, self.models = Counter(), Counter(), Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.timer = threading.Timer(lifetime, self.server.shutdown)  # stops itself if a test hangs
        self.timer.daemon = True
        self.timer.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    judge.respond(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        return Handler

    def respond(self, handler, body) -> None:
        if handler.path != "/v1/chat/completions":
            return self.send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        if handler.headers.get("Authorization") != f"Bearer {self.key}":
            got = handler.headers.get("Authorization", "")[len("Bearer "):]
            return self.send(handler, 401, {"error": {"message": f"Incorrect API key provided: {got}"}})
        shown = dict(_RESPONSE.findall(body["messages"][-1]["content"]))
        pair = (shown["A"], shown["B"])
        plan = (_PLAN.findall(pair[0] + pair[1]) or [""])[0].split(",")
        with self.lock:
            self.requests += 1
            attempt = self.attempts[pair]
            self.attempts[pair] += 1
            self.models[body["model"]] += 1
        if attempt < len(plan) and plan[attempt]:
            return self.fail(handler, plan[attempt])
        time.sleep(self.delay)
        with self.lock:
            self.answered[pair] += 1
        self.send(handler, 200, {
            "id": f"chatcmpl-{attempt}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": decide(*pair)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        })

    def fail(self, handler, kind: str) -> None:
        if kind == "slow":
            time.sleep(SLOW_S)
            return self.send(handler, 200, {"choices": []})
        if kind == "reset":
            handler.close_connection = True
            return None
        bodies = {"garbage": (200, b"<html>proxy error</html>", "text/html"),
                  "badjson": (200, b'{"choices": [', "application/json"),
                  "nochoices": (200, b'{"id": "x", "object": "chat.completion"}', "application/json")}
        if kind in bodies:
            return self.send_raw(handler, *bodies[kind])
        extra = {"Retry-After": "0"} if kind == "429" else {}
        self.send(handler, int(kind), {"error": {"message": f"simulated {kind}"}}, extra)

    def send(self, handler, status, obj, headers=None) -> None:
        self.send_raw(handler, status, json.dumps(obj).encode(), "application/json", headers)

    @staticmethod
    def send_raw(handler, status, data, content_type, headers=None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)


@pytest.fixture
def judge_server():
    server = FakeJudge()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def api_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def write_samples(path: Path, rows, exp_name="dpo_tiny", policy_key="policy") -> Path:
    """An eval.py-format samples file from (prompt, policy, chosen) rows."""
    samples = []
    for prompt, policy, chosen in rows:
        sample_id = hashlib.sha256(f"wordsort\x1f{prompt}".encode()).hexdigest()
        samples.append({"id": sample_id, "prompt": prompt, "prompt_turns": [{"role": "user", "content": prompt}],
                        policy_key: policy, "chosen": chosen, "dataset": "wordsort"})
    path.write_text(json.dumps({"sampled_at": "2026-11-22T10:00:00Z", "exp_name": exp_name, "config": {},
                                "samples": samples}))
    return path


NORMAL_ROWS = [  # (prompt, candidate, baseline) and the expected outcome for the candidate
    ("sort: pear apple", "GOOD apple pear", "pear apple", "win"),
    ("sort: b a", "no idea", "GOOD a b", "loss"),
    ("sort: z y", "GOOD y z", "GOOD y z indeed", "tie"),
    ("sort: k j", "BIAS j k", "j k", "tie"),  # position bias: the two orders disagree
    ("sort: n m", "GARBLE m n", "m n", "parse_failure"),  # unparseable when the candidate is shown as A
    ("sort: d c", "GOOD c d as asked, in order", "c", "win"),
]


def cli(samples, results, url, *extra):
    return ["-f", str(samples), "-ck", "policy", "-bk", "chosen", "-r", str(results), "--judge", "judge-1",
            "--base_url", url, "--timeout", str(TIMEOUT_S), "--backoff", "0.01", "--backoff_max", "0.05", *extra]


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary_of(results: Path) -> dict:
    return json.loads(results.with_name(results.name + ".summary.json").read_text())


# ------------------------------------------------------------------------------------------- closed-form pieces


def test_verdict_parsing_is_strict_about_the_last_line():
    assert compare.parse_verdict("Reasons.\nWinner: A") == "A"
    assert compare.parse_verdict("Reasons.\n\n**Winner: b**\n") == "B"
    assert compare.parse_verdict("Winner: Tie.") == "tie"
    for bad in (None, "", "Winner: C", "Winner: A\nOn reflection, B.", "A is better", "Winner: A or B"):
        assert compare.parse_verdict(bad) is None, bad


def test_outcome_needs_both_orders_to_agree():
    # (verdict with the candidate shown as A, verdict with the candidate shown as B) -> outcome
    expected = {("A", "B"): "win", ("B", "A"): "loss", ("A", "A"): "tie", ("B", "B"): "tie",
                ("tie", "tie"): "tie", ("A", "tie"): "tie", ("tie", "B"): "tie",
                (None, "B"): "parse_failure", ("A", None): "parse_failure", (None, None): "parse_failure"}
    for verdicts, outcome in expected.items():
        assert compare.combine(*verdicts) == outcome, verdicts


def test_backoff_doubles_with_jitter_under_a_cap():
    backoff = compare.Backoff(max_retries=6, base=0.1, cap=1.0, seed=3)
    for attempt in range(6):  # base * 2^k * U(0.5, 1), capped
        ceiling = min(1.0, 0.1 * 2 ** attempt)
        assert 0.5 * ceiling <= backoff.delay(attempt) <= ceiling
    assert len({backoff.delay(2) for _ in range(10)}) > 1  # jittered
    assert backoff.delay(0, retry_after=0.7) == 0.7 and backoff.delay(0, retry_after=30) == 1.0


def test_wilson_interval_matches_hand_computed_values():
    # 8/10 by hand: z^2 = 3.841459, p = .8; centre = (.8 + .192073)/1.384146 = .716740,
    # half = (1.959964/1.384146) * sqrt(.016 + .009604) = 1.416010 * .160011 = .226578 -> [.490162, .943318]
    # (textbook: 8 of 10 at 95% gives 0.490 to 0.943)
    low, high = stats.wilson_interval(8, 10)
    assert low == pytest.approx(0.490162, abs=3e-6) and high == pytest.approx(0.943318, abs=3e-6)
    z2 = 1.959964 ** 2  # k = 0 and k = n have closed forms: [0, z^2/(n+z^2)] and [n/(n+z^2), 1]
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-6)
    assert stats.wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-6)
    assert stats.wilson_interval(0, 0) == (None, None)


# -------------------------------------------------------------------------------------------- judging, in process


def test_judging_asks_both_orders_and_counts_outcomes(tmp_path, judge_server, capsys):
    rows = [r[:3] for r in NORMAL_ROWS] + [("sort: q p", "p q", None)]  # no reference: skipped
    samples = write_samples(tmp_path / "a.json", rows)
    results = tmp_path / "out" / "results.jsonl"
    assert compare.main(cli(samples, results, judge_server.url, "--concurrency", "3")) == 0

    for _, cand, base, _ in NORMAL_ROWS:  # each order asked exactly once, nothing else
        assert judge_server.answered[(cand, base)] == 1 and judge_server.answered[(base, cand)] == 1
    assert judge_server.requests == 2 * len(NORMAL_ROWS) and judge_server.models == {"judge-1": 12}

    records = {r["sample_id"]: r for r in lines_of(results)}
    by_prompt = {s["id"]: s["prompt"] for s in json.loads(samples.read_text())["samples"]}
    expected = {prompt: outcome for prompt, _, _, outcome in NORMAL_ROWS}
    assert {by_prompt[sid]: r["outcome"] for sid, r in records.items()} == expected
    biased = next(r for r in records.values() if by_prompt[r["sample_id"]] == "sort: k j")
    assert (biased["verdict_candidate_as_A"], biased["verdict_candidate_as_B"]) == ("A", "A")
    assert biased["answer_candidate_as_A"].endswith("Winner: A")

    summary = summary_of(results)
    assert (summary["win"]["count"], summary["tie"]["count"], summary["loss"]["count"]) == (2, 2, 1)
    assert summary["parse_failures"] == 1 and summary["decided"] == 5 and summary["skipped_null"] == 1
    assert summary["win"]["rate"] == pytest.approx(2 / 5)
    assert summary["win"]["ci95"] == pytest.approx(list(stats.wilson_interval(2, 5)))
    assert summary["mean_words"]["candidate"] == pytest.approx(sum(len(r[1].split()) for r in NORMAL_ROWS) / 6)
    assert summary["mean_chars"]["baseline"] == pytest.approx(sum(len(r[2]) for r in NORMAL_ROWS) / 6)
    assert (summary["judge"], summary["prompt_version"]) == ("judge-1", compare.PROMPT_VERSION)
    assert summary["candidate"] == "dpo_tiny:policy" and summary["baseline"] == "dpo_tiny:chosen"
    assert "40.0%" in capsys.readouterr().out
    assert sorted(p.name for p in results.parent.iterdir()) == ["results.jsonl", "results.jsonl.summary.json"]

    before = results.read_bytes()  # a rerun finds everything judged: no request, same file, same summary
    assert compare.main(cli(samples, results, judge_server.url)) == 0
    assert judge_server.requests == 12 and results.read_bytes() == before and summary_of(results) == summary


def test_head_to_head_matches_samples_by_id(tmp_path, judge_server):
    rows_a = [("p1", "GOOD one", None), ("p2", "two", None), ("p3", "three", None)]
    rows_b = [("p3", "GOOD three", None), ("p1", "one", None), ("p2", "two too", None)]  # other order
    a = write_samples(tmp_path / "a.json", rows_a, exp_name="model_a")
    b = write_samples(tmp_path / "b.json", rows_b, exp_name="model_b")
    results = tmp_path / "h2h.jsonl"
    args = ["-f", str(a), "-f2", str(b), "-ck", "policy", "-bk", "policy", "-r", str(results),
            "--judge", "judge-1", "--base_url", judge_server.url]
    assert compare.main(args) == 0
    outcomes = sorted(r["outcome"] for r in lines_of(results))
    assert outcomes == ["loss", "tie", "win"]
    assert judge_server.answered[("GOOD one", "one")] == 1 and judge_server.answered[("three", "GOOD three")] == 1
    assert summary_of(results)["baseline"] == "model_b:policy"


def test_flaky_server_every_comparison_judged_exactly_once(tmp_path, judge_server):
    plans = {0: "[fail:429,500]", 3: "[fail:slow,garbage]", 5: "[fail:badjson,nochoices,reset,503]"}
    rows = []
    for i in range(10):
        good = i % 2 == 0
        rows.append((f"prompt {i}", f"{'GOOD ' if good else ''}answer {i} {plans.get(i, '')}".strip(), f"ref {i}"))
    samples = write_samples(tmp_path / "a.json", rows)
    results = tmp_path / "results.jsonl"
    started = time.monotonic()
    code = compare.main(cli(samples, results, judge_server.url, "--concurrency", "4", "--max_retries", "5"))
    assert code == 0 and time.monotonic() - started < 20

    failures = sum(len(p.split(",")) for p in plans.values())
    assert judge_server.requests == 2 * (len(rows) + failures)  # one success per order, no request wasted
    assert all(count == 1 for count in judge_server.answered.values()) and len(judge_server.answered) == 20
    records = lines_of(results)
    assert len(records) == len(rows) and len({r["id"] for r in records}) == len(rows)
    assert Counter(r["outcome"] for r in records) == {"win": 5, "tie": 5}


# ------------------------------------------------------------------------------------------ real processes


def run_cli(args, env_update=None, drop=(), timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update or {})
    return subprocess.run([sys.executable, str(REPO / "compare.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def interrupt_midway(args, results: Path, sig: int, more_lines: int) -> subprocess.CompletedProcess:
    """Run compare.py as a real process, send `sig` once `more_lines` new results lines exist."""
    start = complete_lines(results)
    proc = subprocess.Popen([sys.executable, str(REPO / "compare.py"), *args], cwd=REPO, text=True,
                            env={**os.environ, "OPENAI_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while complete_lines(results) < start + more_lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_interrupted_and_killed_runs_resume_without_duplicates_or_losses(tmp_path):
    server = FakeJudge(delay=0.08)
    try:
        rows = [(f"prompt {i}", f"{'GOOD ' if i % 3 else ''}answer {i}", f"ref {i}") for i in range(24)]
        samples = write_samples(tmp_path / "a.json", rows)
        results = tmp_path / "results.jsonl"
        args = cli(samples, results, server.url, "--concurrency", "2")

        ctrl_c = interrupt_midway(args, results, signal.SIGINT, 3)
        assert ctrl_c.returncode == 130 and ctrl_c.stderr.count("\n") == 1, ctrl_c.stderr
        assert "interrupted" in ctrl_c.stderr and "rerun" in ctrl_c.stderr
        interrupt_midway(args, results, signal.SIGKILL, 3)
        kept = complete_lines(results)
        assert 6 <= kept < len(rows), "both runs must stop midway"
        with open(results, "ab") as handle:  # what a crash in the middle of a write leaves behind
            handle.write(b'{"id": "3f2a", "sample_id": "x", "outc')

        requests_before = server.requests
        done = run_cli(args, {"OPENAI_API_KEY": KEY})
        assert done.returncode == 0, done.stderr
        assert server.requests - requests_before == 2 * (len(rows) - kept)  # only the missing ones
        records = lines_of(results)  # every line parses: the torn tail was cut off
        assert len(records) == len(rows) and len({r["id"] for r in records}) == len(rows)

        server.delay = 0.0
        fresh = tmp_path / "fresh.jsonl"
        assert compare.main(cli(samples, fresh, server.url)) == 0
        assert summary_of(results) == summary_of(fresh)
        assert summary_of(fresh)["win"]["count"] == sum(1 for i in range(len(rows)) if i % 3)
    finally:
        server.close()


@pytest.fixture(scope="module")
def judged_dir(tmp_path_factory):
    """A samples file, a mismatched second one, and a results file already holding 2 judged comparisons."""
    root = tmp_path_factory.mktemp("errors")
    rows = [(f"prompt {i}", f"GOOD answer {i}", f"ref {i}") for i in range(6)]
    samples = write_samples(root / "a.json", rows)
    write_samples(root / "b.json", rows[:4], exp_name="other")
    server = FakeJudge()
    try:
        env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": ""}
        done = run_cli(cli(samples, root / "results.jsonl", server.url, "--n", "2"), env)
        assert done.returncode == 0, done.stderr
    finally:
        server.close()
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ERROR_CASES = {  # name -> (extra args or replacements, env changes, expected exit code, phrases in the line)
    "missing key": ([], {"drop": True}, 2, ["OPENAI_API_KEY", "not set"]),
    "missing sample key": (["-ck", "reply"], {}, 2, ["a.json", "'reply'", "sample "]),
    "different prompts": (["-f2", "{root}/b.json", "-bk", "policy"], {}, 2, ["a.json", "b.json", "2 sample ids"]),
    "unreachable url": (["--base_url", "http://127.0.0.1:{port}/v1", "--max_retries", "2"], {}, 3,
                        ["connection error", "4 of 6", "rerun"]),
    "wrong key": ([], {"key": "sk-wrong-SECRET-77"}, 2, ["HTTP 401", "OPENAI_API_KEY"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_end_in_one_line_and_keep_results(judged_dir, case):
    extra, env_case, code, phrases = ERROR_CASES[case]
    results = judged_dir / "results.jsonl"
    before = results.read_bytes()
    assert before.count(b"\n") == 2
    server = FakeJudge()
    try:
        fill = {"root": judged_dir, "port": free_port()}
        args = cli(judged_dir / "a.json", results, server.url, *[a.format(**fill) for a in extra])
        env = {"OPENAI_API_KEY": env_case.get("key", KEY)}
        done = run_cli(args, {} if env_case.get("drop") else env, drop=("OPENAI_API_KEY",), timeout=30)
    finally:
        server.close()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1, done.stderr
    assert lines[0].startswith("compare.py: error: ")
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert KEY not in done.stderr + done.stdout and "SECRET" not in done.stderr + done.stdout
    assert results.read_bytes() == before


# ------------------------------------------------------------------------------------------- the results file


def test_results_file_guards(tmp_path):
    samples = write_samples(tmp_path / "a.json", [("p", "GOOD x", "y")])
    before = samples.read_bytes()
    with pytest.raises(DataError, match="a.json does not end in a compare.py record"):
        compare.ResultsLog(samples)  # -r pointing at the wrong file: refused, untouched
    assert samples.read_bytes() == before

    results = tmp_path / "r.jsonl"
    record = {"id": "abc", "outcome": "win"}
    results.write_bytes(json.dumps(record).encode())  # complete record whose newline was lost: kept
    log = compare.ResultsLog(results)
    try:
        assert log.done_ids == {"abc"} and results.read_bytes().endswith(b"}\n")
        with pytest.raises(DataError, match="another compare.py run is writing"):
            compare.ResultsLog(results)
    finally:
        log.close()
    results.write_bytes(b'{"id": "abc", "outcome": "win"}\nnot json\n{"id": "d", "outcome": "tie"}\n')
    with pytest.raises(DataError, match="line 2 is not a compare.py record"):
        compare.ResultsLog(results)
