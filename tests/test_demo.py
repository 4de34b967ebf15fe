"""The demo (showcase/demo.py) end to end, reduced, through the real entry points; the report's statistics in
closed form."""

import json
import math
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from feedbackalign import stats, task
from feedbackalign.fileio import make_temporary_folder, write_json_atomic
from showcase import report
from showcase.demo import ONLINE_RUNS
from helpers import run_script

QUICK_MODELS = ["sft", "dpo", "nca", "kto", "cut"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- statistics


def test_mean_ci_is_the_normal_interval():
    mean, low, high = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    half = stats.Z95 * math.sqrt(5 / 3) / 2   # sample variance of 1..4 is 5/3, n = 4
    assert mean == 2.5
    assert low == pytest.approx(2.5 - half) and high == pytest.approx(2.5 + half)
    assert stats.mean_ci([7.0]) == (7.0, 7.0, 7.0)


def test_wilson_interval_known_value():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10) = 0.7167, half-width 0.2266 -> [0.4902, 0.9433].
    low, high = stats.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = stats.wilson_interval(0, 20)
    assert low == 0.0 and 0 < high < 0.2


def test_win_tie_loss_counts_ties_apart_and_matches_prompts():
    base = {"a": 5.0, "b": 10.0, "c": 7.0, "d": 0.0}
    cand = {"a": 6.0, "b": 10.0, "c": 3.0, "d": 0.0}
    assert report.win_tie_loss(cand, base) == (1, 2, 1)
    with pytest.raises(report.DataError, match="share 3 of 4"):
        report.win_tie_loss({"a": 1.0, "b": 1.0, "c": 1.0, "x": 1.0}, base)


def test_ema_is_bias_corrected():
    """Bias-corrected EMA = the weighted mean sum_i w^(t-i) v_i / sum_i w^(t-i) of the values so far (a constant
    stays itself; a ramp lags behind it)."""
    values, w = [1.0, 4.0, 2.0, 8.0, -3.0], 0.9
    expected = [sum(w ** (t - i) * values[i] for i in range(t + 1)) / sum(w ** (t - i) for i in range(t + 1))
                for t in range(len(values))]
    assert report.ema(values, weight=w) == pytest.approx(expected, rel=1e-12)
    assert report.ema([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])
    assert report.ema([1.0, 2.0], weight=0.5) == pytest.approx([1.0, (0.5 * 1 + 2) / 1.5])


def test_report_cli_names_the_missing_manifest(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json does not exist" in err and "demo.py" in err
    assert not (tmp_path / "report").exists()


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        folder = make_temporary_folder(tmp_path, ".report.")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert folder.stat().st_mode & 0o777 == 0o750


ROWS = [{"run": "sft", "n": 4, "reward": 8.0, "reward_ci95": [7.0, 9.0], "verdict": "no clear change"},
        {"run": "dpo", "n": 4, "reward": 9.0, "reward_ci95": [8.5, 9.5], "verdict": "higher"},
        {"run": "cut", "n": 4, "reward": 6.0, "reward_ci95": [5.0, 7.0], "verdict": "lower"}]


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_plots_have_legends_labelled_baselines_and_full_axes(tmp_path):
    fig = report.plot_true_reward(ROWS, tmp_path / "r.png")
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 10.0)
    assert legend_texts(ax) == ["sft (baseline); dotted line: its level", "gain over sft: higher",
                                "gain over sft: no clear change", "gain over sft: lower"]
    assert "4 held-out prompts" in ax.get_title()
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "eval/loss": 0.7}]
    curves = report.plot_training_curves({"dpo": records}, tmp_path / "c.png")
    assert legend_texts(curves.axes[0]) == ["train (each step)", "train (EMA 0.9)", "held-out"]
    logp = [{"step": 0, "eval/logps/chosen": -1.3, "eval/logps/rejected": -5.0}]
    panels = report.plot_chosen_logp({"dpo": logp, "nca": logp}, -1.3, 16, tmp_path / "l.png").axes
    assert legend_texts(panels[0]) == ["dpo", "nca", "SFT model (table)"]
    assert "16 test prompts" in panels[0].get_title()
    assert [line.get_ydata()[0] for line in panels[0].get_lines()][-1] == -1.3


def test_benchmark_refuses_too_few_measured_steps(capsys):
    from showcase import benchmark

    with pytest.raises(SystemExit) as stopped:
        benchmark.main(["--steps", "5", "--skip-trl", "--datasets", "wordsort"])
    assert "fewer than 10 measured steps" in str(stopped.value) and "--few-steps" in str(stopped.value)


# ---------------------------------------------------------------- the demo, as a user runs it

SHOWN = re.compile(r"\[Conversation\]\n(.*?)\n\[End of conversation\].*?\[Response A\]\n(.*?)\n\[End of response A\]"
                   r".*?\[Response B\]\n(.*?)\n\[End of response B\]", re.DOTALL)


class OracleJudge:
    """An OpenAI-compatible /v1/chat/completions server that judges by the true reward: a judge whose
    verdicts we know, so compare.py's win rates must equal the report's true-reward win rates."""

    def __init__(self):
        def answer(content: str) -> str:
            conversation, a, b = SHOWN.search(content).groups()
            ra, rb = task.true_reward(conversation, a), task.true_reward(conversation, b)
            return "Winner: " + ("A" if ra > rb else "B" if rb > ra else "tie")

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                       "role": "assistant", "content": answer(body["messages"][-1]["content"])}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()



def test_unknown_run_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "demo"
    result = run_script("-m", "showcase.demo", "--quick", "--runs", "dpo,nosuch", "--out", str(out), timeout=120)
    assert result.returncode == 2
    assert "unknown run nosuch" in result.stderr and "choose from" in result.stderr
    assert not out.exists()


def test_failing_stage_stops_the_demo_with_its_message(tmp_path):
    out = tmp_path / "demo"
    result = run_script("-m", "showcase.demo", "--quick", "--runs", "dpo", "--set", "sft:no_such_key=1", "--out", str(out),
                        timeout=300)
    assert result.returncode == 2
    assert "stage 'train sft' failed" in result.stderr and "no_such_key" in result.stderr
    assert not (out / "stages" / "train_sft.json").exists()
    assert not (out / "report").exists() and not (out / "runs" / "dpo").exists()


def table_rows(markdown: str, table: int = 0) -> dict[str, list[str]]:
    """The rows of the report's `table`-th markdown table (0: results, 1: settings; the online
    section's table comes after them), by run name."""
    tables = re.findall(r"((?:^\|.*\n)+)", markdown, re.MULTILINE)
    lines = [line for line in tables[table].splitlines() if line.startswith("| ") and not line.startswith("| run")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def nca_group_size(run_dir) -> int:
    """K of the NCA run's first training microbatch, rebuilt from the run's saved config."""
    from omegaconf import OmegaConf

    from feedbackalign import builders

    cfg = OmegaConf.load(run_dir / "config.yaml")
    loader = builders.build_loader(cfg, builders.build_tokenizer(cfg), split="train", train=True)
    return next(iter(loader)).values["rewards"].shape[1]


def test_quick_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    judge = OracleJudge()
    try:
        result = run_script("-m", "showcase.demo", "--quick", "--out", str(out), "--judge-url", judge.url, timeout=600,
                            env={"OPENAI_API_KEY": "local"})
    finally:
        judge.close()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    folder = out / "report"
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    rows = table_rows(markdown)
    assert list(rows) == QUICK_MODELS
    # a smoke test says so, in the report's title and at the console's start and end
    assert markdown.startswith("# SMOKE TEST (--quick):") and "these numbers are not results" in markdown
    lines = result.stdout.splitlines()
    assert "SMOKE TEST" in lines[0] and "SMOKE TEST" in lines[-1]
    # the settings each run trained with: the tiny model's tuning files, one seed
    settings = table_rows(markdown, 1)
    assert settings["dpo"][1:4] == ["dpo", "5e-05", "5"] and "beta 0.5" in settings["dpo"][7]
    assert settings["kto"][2] == "0.0001" and "desirable_weight 3.0" in settings["kto"][7]
    assert settings["sft"][2] == "0.001" and "One run per model, seed 0" in markdown
    # files readable as the umask allows (the test process's umask)
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in (folder / "report.md", out / "samples" / "dpo.json", out / "manifest.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for name in QUICK_MODELS:   # every model was trained, sampled and scored
        assert (out / "runs" / name / "LATEST" / "policy.pt").is_file()
        samples = json.loads((out / "samples" / f"{name}.json").read_text(encoding="utf-8"))["samples"]
        assert len(samples) == 16
    results = {r["run"]: r for r in json.loads((folder / "results.json").read_text(encoding="utf-8"))}
    for name, r in results.items():
        assert 0 <= r["reward_ci95"][0] <= r["reward"] <= r["reward_ci95"][1] <= 10
        assert r["win"] + r["tie"] + r["lose"] == pytest.approx(1.0)
        low, high = r["gain_ci95"]   # paired over the same prompts: the gain is the difference of the means
        assert low <= r["gain"] <= high
        assert r["gain"] == pytest.approx(r["reward"] - results["sft"]["reward"])
        assert math.isfinite(r["chosen_logp"])
        if name != "sft":   # compare.py asked the oracle judge both orders: its counts are the true-reward ones
            counts = [r["judge"][o]["count"] for o in ("win", "tie", "loss")]
            assert counts == [round(r[o] * r["n"]) for o in ("win", "tie", "lose")]
    assert results["sft"]["tie"] == 1.0 and results["sft"]["chosen_logp_change"] == 0.0
    for png in ("training_curves.png", "chosen_logp.png", "true_reward.png"):
        data = (folder / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png
    online_rows = {r["run"]: r for r in json.loads((folder / "online.json").read_text(encoding="utf-8"))}
    assert list(online_rows) == list(ONLINE_RUNS)
    for name, r in online_rows.items():   # round 0 answers the SFT model's prompts with its settings: its samples
        assert [rec["round"] for rec in r["rounds"]] == [0, 1, 2]
        assert r["rounds"][0]["true_reward"] == pytest.approx(results["sft"]["reward"])
        assert all(rec["items"] == 8 for rec in r["rounds"][1:])
    assert all(rec["trained"] for rec in online_rows["online-cut"]["rounds"][1:])
    assert "## Online" in (folder / "report.md").read_text(encoding="utf-8")
    assert (folder / "online_rounds.png").read_bytes().startswith(PNG_MAGIC)
    dpo = report.read_metrics(out / "runs" / "dpo")
    assert any("eval/logps/chosen" in r for r in dpo) and dpo[0]["step"] == 0
    # honest axes: the training evaluations score the report's held-out prompts, so chosen_logp.png starts at the
    # table's SFT value (step 0 evaluates the SFT weights)
    assert dpo[0]["eval/logps/chosen"] == pytest.approx(results["sft"]["chosen_logp"], rel=1e-4)
    assert nca_group_size(out / "runs" / "nca") >= 4

    again = run_script("-m", "showcase.demo", "--quick", "--out", str(out), timeout=300, env={"OPENAI_BASE_URL": ""})
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skip ") == 2 * len(QUICK_MODELS) + len(ONLINE_RUNS) and "] start " not in again.stdout
    assert "no LLM judge configured" in again.stdout
    without_judge = {name: cells[:-2] + cells[-1:] for name, cells in rows.items()}
    assert table_rows((folder / "report.md").read_text(encoding="utf-8")) == without_judge
