"""HALOs' habits on real runs: train.py with HALOs' top-level keys (mode=train, human_prefix=) and W&B (offline:
a resume continues the same W&B run), eval.py's ++saved_policy and ++mode=alpacaeval / datasets=[alpacaeval]
(the file `alpaca_eval evaluate` reads), compare.py's HALOs flags, and one line for each key with no equivalent."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

import compare
import eval as eval_script
from feedbackalign.configuration import halos_overrides
from feedbackalign.errors import ConfigError
from helpers import REPO, run_script
from test_compare import KEY, FakeJudge

ALPACA = json.loads((REPO / "tests" / "fixtures" / "alpaca_eval" / "alpaca_eval.json").read_text())
TRAIN = ["model.batch_size=8", "n_examples=16", "n_eval_examples=8", "model.eval_batch_size=8",
         "++dataset_options.wordsort.n_prompts=48", "do_first_eval=false", "warmup_steps=0", "wandb.enabled=true"]
HALOS = ["mode=train", "human_prefix='Q: '", "assistant_prefix=' A: '"]  # HALOs' top-level keys
WANDB = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`python train.py` as a HALOs user types it (mode=train, a top-level human_prefix), W&B offline."""
    root = tmp_path_factory.mktemp("halos")
    result = run_script(str(REPO / "train.py"), *HALOS, f"cache_dir={root}", "exp_name=sft", *TRAIN, cwd=root,
                        env=WANDB)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sft"


def wandb_run_ids(run_dir) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*"))


def test_halos_keys_train_and_a_resume_continues_the_same_wandb_run(run):
    saved = OmegaConf.load(run / "config.yaml")
    assert saved["model"]["human_prefix"] == "Q: " and saved["model"]["assistant_prefix"] == " A: "
    run_id = json.loads((run / "wandb.json").read_text())["id"]
    assert wandb_run_ids(run) == [run_id]
    result = run_script(str(REPO / "train.py"), *HALOS, "resume=true", f"cache_dir={run.parent}", "exp_name=sft",
                        *TRAIN, cwd=run.parent, env=WANDB)
    assert result.returncode == 0, result.stderr[-3000:]
    assert wandb_run_ids(run) == [run_id, run_id]  # two attempts, one W&B run (wandb sync merges them)
    assert json.loads((run / "wandb.json").read_text())["id"] == run_id


def test_eval_takes_saved_policy_and_alpacaeval(run, tmp_path, capsys):
    policy = (run / "LATEST" / "policy.pt").resolve()
    assert eval_script.main([f"--config-path={run}", f"++saved_policy={policy}", "++n_samples=4",
                             "++max_new_tokens=4", f"++samples_dir={tmp_path / 'a'}"]) == 0
    assert json.loads((tmp_path / "a" / "sft.json").read_text())["checkpoint"] == str(policy)

    fixtures = REPO / "tests" / "fixtures"
    for how in (["++mode=alpacaeval"], ["++datasets=[alpacaeval]", "++alpaca_eval=true", "++n_samples=null"]):
        out = tmp_path / how[0].strip("+").replace("=", "_").replace("[", "").replace("]", "")
        assert eval_script.main([f"--config-path={run}", *how, f"++data_dir={fixtures}", "++max_new_tokens=4",
                                 f"++samples_dir={out}"]) == 0
        outputs = json.loads((out / "sft.alpaca_eval.json").read_text())
        # what alpaca_eval evaluate reads: every AlpacaEval instruction, verbatim, once, with an output and a name
        assert sorted(o["instruction"] for o in outputs) == sorted(a["instruction"] for a in ALPACA)
        assert all(isinstance(o["output"], str) and o["generator"] == "sft" for o in outputs)
        samples = json.loads((out / "sft.json").read_text())["samples"]
        reference = {a["instruction"]: a["output"] for a in ALPACA}
        assert all(s["chosen"] == reference[s["prompt_turns"][0]["content"]] for s in samples)
        assert samples[0]["prompt"].startswith("Q: ")  # the run's own (HALOs-named) markers
    assert eval_script.main([f"--config-path={run}", "++datasets=[alpacaeval]", "++alpaca_eval=true",
                             "++n_samples=2", f"++data_dir={fixtures}", "++max_new_tokens=2",
                             f"++samples_dir={tmp_path / 'partial'}"]) == 0
    assert "samples 2 of the 6 prompts" in capsys.readouterr().err


@pytest.mark.parametrize("program, args, message", [
    ("train.py", ["mode=sample"], "mode=sample: train.py takes mode=train; use eval.py --config-path=<run_dir>"),
    ("train.py", ["debug=true"], "debug= is a HALOs key with no equivalent in train.py: there is no debug mode"),
    ("eval.py", ["++mode=train"], "mode=train: eval.py takes mode=sample or eval or alpacaeval; use train.py"),
    ("eval.py", ["++saved_policy=null"], "saved_policy=null (HALOs: sample the model before training) has no"),
])
def test_halos_keys_without_an_equivalent_stop_in_one_line(program, args, message):
    with pytest.raises(ConfigError) as err:
        halos_overrides(args, program)
    assert str(err.value).startswith(message)


def test_train_py_refuses_a_halos_key_in_one_line(tmp_path):
    result = run_script(str(REPO / "train.py"), "mode=eval", f"cache_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and not any(tmp_path.iterdir())
    assert result.stderr.strip() == ("train.py: error: mode=eval: train.py takes mode=train; use eval.py "
                                     "--config-path=<run_dir> ++mode=sample|eval")


def test_compare_takes_halos_flags(run, tmp_path, monkeypatch, capsys):
    """HALOs' own command line (--file, -mc, -r/--results_file, -j, default -ck policy -bk chosen) against a
    local OpenAI-compatible judge; its flags with no equivalent stop with one line."""
    assert eval_script.main([f"--config-path={run}", "++n_samples=6", "++max_new_tokens=4",
                             f"++samples_dir={tmp_path}"]) == 0
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    judge = FakeJudge()
    try:
        code = compare.main(["--file", str(tmp_path / "sft.json"), "-mc", "3", "--results_file",
                             str(tmp_path / "r.jsonl"), "-j", "judge-1", "--base_url", judge.url])
    finally:
        judge.close()
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "r.jsonl.summary.json").read_text())
    assert summary["n"] == 3 and summary["judge"] == "judge-1"
    assert summary["candidate"] == "sft:policy" and summary["baseline"] == "sft:chosen"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["-f", str(tmp_path / "sft.json"), "-r", str(tmp_path / "r.jsonl"), "-st", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "compare.py: error: -st (HALOs' compare.py) has no equivalent here: rate limits are retried with backoff "
        "(--backoff, --backoff_max); --concurrency 1 sends one request at a time"]
