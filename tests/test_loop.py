"""loop.py: rounds of sample -> label -> train -> evaluate with the real entry points' code, killed with SIGKILL
between and inside rounds and resumed without redoing finished work; the judge labeler and win rate against an
OpenAI-compatible server on 127.0.0.1; one-line errors; each round's configuration."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import loop
from feedbackalign import online
from helpers import REPO
from test_compare import KEY
from test_label import TaskJudge

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["datasets=[wordsort]", "++dataset_options.wordsort.n_prompts=64", "prompts_per_round=12", "n_responses=2",
         "eval_prompts=8", "max_new_tokens=12", "model.batch_size=8", "model.eval_batch_size=16", "lr=1e-3",
         "export_hf=false", "warmup_steps=0", "keep_checkpoints=1"]


def start(args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, str(REPO / "loop.py"), *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (the test fails if it ends first)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the loop ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def stamp(paths) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in paths}


def test_loop_resumes_after_kill_between_and_inside_rounds(tmp_path):
    """`python loop.py loss=cut labeler=task rounds=2 datasets=[wordsort]` (small): killed right after round 1 is
    recorded, killed again inside round 2's training (after its first checkpoint), then rerun to the end: every
    round recorded once, round 1's files untouched by the reruns, round 2's samples and labels not redone and its
    training resumed from its checkpoint."""
    args = ["loss=cut", "labeler=task", "rounds=2", f"cache_dir={tmp_path}", "exp_name=online",
            "intermediate_checkpoints=8", *SMALL]
    layout = online.Layout(tmp_path / "online")

    def recorded(i):
        return layout.rounds_log.is_file() and f'"round": {i},' in layout.rounds_log.read_text()

    kill_when(start(args, tmp_path / "first.log"), lambda: recorded(1), "round 1's record")
    round1 = [layout.samples(1), layout.feedback(1), layout.eval_samples(1), layout.run(1) / "metrics.jsonl",
              (layout.run(1) / "LATEST").resolve() / "policy.pt"]
    before = stamp(round1)

    kill_when(start(args, tmp_path / "second.log"), lambda: (layout.run(2) / "LATEST").exists(),
              "round 2's first checkpoint")
    assert (tmp_path / "second.log").read_text().count("round 1: finished before") == 1
    round2 = stamp([layout.samples(2), layout.feedback(2)])
    labelled = layout.feedback(2).read_bytes()

    done = start(args, tmp_path / "third.log")
    assert done.wait(timeout=600) == 0, (tmp_path / "third.log").read_text()[-3000:]
    log = (tmp_path / "third.log").read_text()
    assert "round 1: finished before" in log and "round 2: resuming loss=cut" in log
    assert "round 2: sampling" not in log and "round 2: labelling" not in log
    assert stamp(round1) == before and stamp([layout.samples(2), layout.feedback(2)]) == round2
    assert layout.feedback(2).read_bytes() == labelled

    lines = [json.loads(line) for line in layout.rounds_log.read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2]
    for r in lines:
        assert 0 <= r["true_reward_ci95"][0] <= r["true_reward"] <= r["true_reward_ci95"][1] <= 10
    for r in lines[1:]:
        samples = json.loads(Path(r["paths"]["samples"]).read_text())["samples"]
        assert r["items"] == len(samples) == 12 and 0 < r["responses"] <= 24
        assert Path(r["paths"]["feedback"]).is_file() and (Path(r["paths"]["run"]) / "LATEST" / "policy.pt").is_file()
    metrics = [json.loads(line) for line in (layout.run(2) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))   # resumed: no step twice
    config = OmegaConf.load(layout.run(2) / "config.yaml")
    assert config.model.load_from == str(layout.run(1) / "LATEST" / "policy.pt")
    assert config.datasets == [f"jsonl:{layout.feedback(2)}"] and config.loss.name == "cut"
    train_prompts = {s["prompt"] for i in (1, 2) for s in json.loads(layout.samples(i).read_text())["samples"]}
    test_prompts = {s["prompt"] for s in json.loads(layout.eval_samples(2).read_text())["samples"]}
    assert len(train_prompts) > 12 and not train_prompts & test_prompts   # fresh draws; held-out evaluation
    assert layout.plot.read_bytes().startswith(PNG_MAGIC)


def test_a_round_whose_labels_give_no_batch_is_not_trained(tmp_path):
    """loss=dpo from the random init: every answer scores 0, so no pair exists; the round is recorded as not
    trained (with a warning) and round 2 starts from the same policy instead of the loop stopping."""
    cfg = loop.load_config([f"cache_dir={tmp_path}", "loss=dpo", "rounds=2", "prompts_per_round=4", "eval_prompts=4",
                            *SMALL[:1], *SMALL[1:2], *SMALL[5:7]])
    records = loop.Loop(cfg).run()
    layout = online.Layout(tmp_path / cfg.exp_name)
    assert [records[i].get("trained") for i in (1, 2)] == [False, False]
    assert layout.policy(2, None) is None and not layout.run(1).exists()
    why = json.loads(layout.done(1, "train").read_text())["why"]
    assert "preference pairs" in why or "global batch" in why
    assert records[2]["true_reward"] == records[0]["true_reward"] == 0.0


def test_round_configurations(tmp_path):
    """Round i trains on its feedback file from round i-1's policy; reference=round keeps the policy's start,
    reference=start pins the loop's starting weights (`base` without model.load_from)."""
    cfg = loop.load_config([f"cache_dir={tmp_path}", "loss=dpo", "model.load_from=/sft/policy.pt"])
    layout = online.Layout(tmp_path / cfg.exp_name)
    first = online.round_train_config(cfg, layout, 1, "/sft/policy.pt", resume=False)
    second = online.round_train_config(cfg, layout, 2, "/sft/policy.pt", resume=True)
    assert first.model.load_from == "/sft/policy.pt" and first.model.reference_load_from is None
    assert second.model.load_from == str(layout.run(1) / "LATEST" / "policy.pt") and second.resume is True
    assert first.datasets == [f"jsonl:{layout.feedback(1).resolve()}"] and first.n_eval_examples == 0
    assert first.cache_dir == str(layout.round(1).resolve()) and first.exp_name == "run"
    assert not set(online.loop_keys()) & set(first)   # train.py's keys only
    pinned = loop.load_config([f"cache_dir={tmp_path}", "loss=dpo", "reference=start"])
    assert online.round_train_config(pinned, layout, 2, None, False).model.reference_load_from == "base"
    sampling = online.sampling_config(cfg, loop.eval_script.DEFAULTS, policy="/p.pt", split="train", n_prompts=5,
                                      n_responses=4, seed=3)
    assert (sampling.checkpoint, sampling.model.load_from, sampling.n_responses, sampling.seed) == ("base", "/p.pt",
                                                                                                     4, 3)
    export = tmp_path / "run" / "LATEST" / "hf"   # a round with export_hf=true: its export (what vLLM loads)
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    sampling = online.sampling_config(cfg, loop.eval_script.DEFAULTS, policy=str(export.parent / "policy.pt"),
                                      split="test", n_prompts=5, n_responses=1, seed=0)
    assert sampling.checkpoint == str(export)


@pytest.mark.parametrize("args, phrase", [
    (["no_such_key=1"], "no_such_key"),
    (["+n_respones=4"], "there is no key 'n_respones' (did you mean n_responses?)"),   # + / ++ checked too
    (["loss=dpo", "++loss.betta=0.5"], "did you mean loss.beta?"),
    (["labeler=rm"], "reward_model=None is not valid"),
    (["reference=both"], "reference=both"),
    (["n_responses=4", "temperature=0"], "temperature=0"),
    (["--rounds", "2"], "unknown option --rounds"),
    (["loss=cut", "labeler=judge", "judge.mode=scores"], "use labeler=task or labeler=judge judge.mode=judgments"),
    (["loss=dpo", "labeler=judge", "judge.mode=judgments"], "loss=dpo trains on pairs or scores"),
])
def test_bad_settings_end_in_one_line_before_any_work(tmp_path, capsys, args, phrase):
    assert loop.main([f"cache_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loop.py: error: ") and phrase in err[0], err
    assert not any(tmp_path.iterdir())


def test_a_rerun_must_keep_the_settings_and_a_loop_needs_its_own_directory(tmp_path, capsys, monkeypatch):
    cfg = loop.load_config([f"cache_dir={tmp_path}", "loss=cut", "n_responses=4"])
    layout = online.Layout(tmp_path / cfg.exp_name)
    online.claim(layout, cfg)
    assert loop.main([f"cache_dir={tmp_path}", "loss=cut", "n_responses=2"]) == 2
    err = capsys.readouterr().err
    assert "n_responses differ" in err and "overwrite=true" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    assert loop.main([f"cache_dir={tmp_path}", "exp_name=other"]) == 2
    assert "is not a loop directory" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert loop.main([f"cache_dir={tmp_path}"]) == 2
    assert "not torchrun" in capsys.readouterr().err


def test_judge_labels_and_win_rate_in_the_loop(tmp_path, monkeypatch):
    """labeler=judge (CUT-style judgments from an OpenAI-compatible server on 127.0.0.1, through compare.py's
    client) for loss=cut, and the judge's win rate of round 1 against round 0 on the held-out answers (both
    orders, resumable results next to the round); with export_hf=true the round's policy is sampled from its
    save_pretrained export (what vLLM loads on a GPU)."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = TaskJudge()
    try:
        cfg = loop.load_config([f"cache_dir={tmp_path}", "loss=cut", "labeler=judge", "judge.mode=judgments",
                                f"judge.base_url={server.url}", "judge.model=judge-1", "rounds=1",
                                "prompts_per_round=6", "n_responses=2", "eval_prompts=6", "datasets=[wordsort]",
                                "++dataset_options.wordsort.n_prompts=64", "max_new_tokens=12", "model.batch_size=4",
                                "export_hf=true"])
        records = loop.Loop(cfg).run()
    finally:
        server.close()
    layout = online.Layout(tmp_path / cfg.exp_name)
    labelled = [json.loads(line) for line in layout.feedback(1).read_text().splitlines()]
    assert len(labelled) == 6 and all(r["labeler"] == "judge" and "judgments" in r for r in labelled)
    assert 0 <= records[1]["judge_win_rate"] <= 1 and "judge_win_rate" not in records[0]
    summary = json.loads(layout.judge_results(1).with_name("judge.jsonl.summary.json").read_text())
    assert summary["n"] == 6 and summary["win"]["rate"] == records[1]["judge_win_rate"]
    sampled_from = json.loads(layout.eval_samples(1).read_text())["checkpoint"]   # the round's HF export
    assert sampled_from == str(layout.run(1) / "LATEST" / "hf")
