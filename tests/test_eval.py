"""eval.py on real tiny runs trained here with train.py: sampling (determinism, the same prompts for every run,
the samples-file schema compare.py reads, every checkpoint kind, left padding, EOS, token budgets), mode=eval
(the run's own loss, ln 2 at the initial weights), one-line errors, and compare.py over eval.py's files."""

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from transformers import LlamaConfig, LlamaForCausalLM

import compare
import eval as eval_script
from feedbackalign import models
from helpers import REPO, make_config, run_script
from feedbackalign.task import get_wordsort
from test_compare import KEY, FakeJudge

TINY = ["model.batch_size=8", "n_eval_examples=8", "model.eval_batch_size=8", "++dataset_options.wordsort.n_prompts=64",
        "do_first_eval=false"]
RUNS = {  # eval_every = n_examples: the run's last record holds the eval loss of its final weights
    "sft": ["loss=sft", "n_examples=64", "eval_every=64"],
    "dpo": ["loss=dpo", "n_examples=16", "eval_every=16", "export_hf=false"],
    "lora": ["loss=dpo", "n_examples=16", "eval_every=16", "model.lora.enabled=true", "lr=1e-2", "warmup_steps=0",
             "++model.lora.merge_on_export=false"],  # hf/ holds the peft adapter; policy.pt the merged weights
    "ppo": ["loss=ppo", "n_examples=16", "eval_every=16", "export_hf=false"],  # + a trained value head
}
SAMPLE_KEYS = {"id", "prompt", "prompt_turns", "policy", "chosen", "dataset"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The RUNS, trained with train.py as a user would, concurrently (they are small)."""
    root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    procs = {}
    for name, args in RUNS.items():
        log = open(root / f"{name}.log", "w")
        command = [sys.executable, str(REPO / "train.py"), f"cache_dir={root}", f"exp_name={name}", *TINY, *args]
        procs[name] = (subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    for name, (proc, log) in procs.items():
        rc = proc.wait(timeout=900)
        log.close()
        assert rc == 0, (root / f"{name}.log").read_text()[-3000:]
    return {name: root / name for name in RUNS}


SETTINGS = ("n_samples=8", "temperature=0.7", "max_new_tokens=8", "alpaca_eval=true")


class Sampled:
    """Samples files of the runs with SETTINGS (+ extra overrides), each made once per module."""

    def __init__(self, runs, tmp_path_factory):
        self.runs, self.factory, self.paths = runs, tmp_path_factory, {}

    def path(self, run, *extra) -> Path:
        if (run, extra) not in self.paths:
            out = self.factory.mktemp(f"samples_{run}")
            assert run_eval(self.runs[run], out, *SETTINGS, *extra) == 0
            self.paths[run, extra] = out / f"{run}.json"
        return self.paths[run, extra]

    def __call__(self, run, *extra) -> dict:
        return json.loads(self.path(run, *extra).read_text())


@pytest.fixture(scope="module")
def sampled(runs, tmp_path_factory) -> Sampled:
    return Sampled(runs, tmp_path_factory)


def run_eval(run_dir, out_dir, *overrides) -> int:
    """eval.py's entry point in this process (the same code path as the command line)."""
    return eval_script.main([f"--config-path={run_dir}", f"++samples_dir={out_dir}", *overrides])


def samples_of(run_dir, out_dir, *overrides) -> dict:
    assert run_eval(run_dir, out_dir, *overrides) == 0
    return json.loads((Path(out_dir) / f"{Path(run_dir).name}.json").read_text())


def eval_metrics(run_dir, out_dir, *overrides) -> dict:
    assert run_eval(run_dir, out_dir, "mode=eval", *overrides) == 0
    return json.loads((Path(out_dir) / f"{Path(run_dir).name}.eval.json").read_text())["metrics"]


def last_eval(run_dir) -> dict:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {k: v for k, v in [r for r in records if "eval/loss" in r][-1].items() if k.startswith("eval/")}


def config_of(run_dir, *overrides):
    return eval_script.load_config(Path(run_dir), "config", list(overrides))


# ---------------------------------------------------------------- the samples file


def test_halos_command_line_writes_the_documented_samples_file(runs, tmp_path):
    """The HALOs command as a real process: the schema, what compare.py reads, nothing else written."""
    result = run_script(str(REPO / "eval.py"), f"--config-path={runs['sft']}", "++mode=sample", "++n_samples=12",
                        "++model.eval_batch_size=4", "++samples_dir=samples/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]  # no Hydra outputs/ or log files
    path = tmp_path / "samples" / "sft.json"
    data = json.loads(path.read_text())
    assert {"sampled_at", "exp_name", "checkpoint", "config", "samples"} <= set(data)
    assert datetime.datetime.fromisoformat(data["sampled_at"]).tzinfo is not None
    assert data["exp_name"] == "sft" and data["checkpoint"].endswith("policy.pt")
    assert data["config"]["n_samples"] == 12 and data["config"]["model"]["eval_batch_size"] == 4
    assert data["config"]["loss"]["name"] == "sft"
    test_split = {ex.prompt[0]["content"]: ex for ex in get_wordsort("test", n_prompts=64)}
    assert len(data["samples"]) == 12
    for s in data["samples"]:
        assert set(s) == SAMPLE_KEYS and isinstance(s["policy"], str) and s["dataset"] == "wordsort"
        ex = test_split[s["prompt_turns"][0]["content"]]
        assert s["prompt_turns"] == ex.prompt
        assert s["prompt"] == f"<|user|>\n{ex.prompt[0]['content']}\n<|assistant|>\n"  # tiny.yaml's markers
        assert s["chosen"] == ex.generations[ex.sft_index]
    label, by_id = compare.load_samples(path)
    assert label == "sft" and len(by_id) == 12
    for s in by_id.values():
        assert compare.prompt_turns(path, s) == s["prompt_turns"]
        assert compare.side_text(path, s, "policy") == s["policy"]


def test_alpaca_eval_file(sampled):
    alpaca = json.loads(sampled.path("sft").with_name("sft.alpaca_eval.json").read_text())
    assert [(a["instruction"], a["output"], a["generator"]) for a in alpaca] == [
        (s["prompt_turns"][-1]["content"], s["policy"], "sft") for s in sampled("sft")["samples"]]


def test_sampling_is_deterministic_given_the_seed(runs, sampled, tmp_path):
    first = sampled("sft")["samples"]
    assert samples_of(runs["sft"], tmp_path / "again", *SETTINGS)["samples"] == first
    assert len({s["policy"] for s in first}) > 1
    other_seed = samples_of(runs["sft"], tmp_path / "seed1", *SETTINGS, "seed=1")["samples"]
    assert [s["policy"] for s in other_seed] != [s["policy"] for s in first]


def test_every_run_samples_the_same_prompts(runs, sampled, tmp_path):
    """Different runs (losses, LoRA) and batch sizes: the same prompts, in the same order, with the same ids."""
    def prompts(samples):
        return [(s["id"], s["prompt"], s["prompt_turns"], s["chosen"], s["dataset"]) for s in samples["samples"]]

    assert prompts(sampled("sft")) == prompts(sampled("dpo")) == prompts(sampled("lora"))
    assert prompts(sampled("sft")) == prompts(samples_of(runs["sft"], tmp_path, *SETTINGS, "model.eval_batch_size=3"))
    assert [s["policy"] for s in sampled("sft")["samples"]] != [s["policy"] for s in sampled("dpo")["samples"]]


def test_prompt_order_depends_only_on_the_seed_and_the_prompt(tmp_path):
    """A prompt's place is a hash of (seed, id): a smaller prompt set keeps the relative order of the larger."""
    def order(n_prompts, seed=0):
        cfg = make_config(tmp_path, f"++dataset_options.wordsort.n_prompts={n_prompts}", f"seed={seed}")
        return [i for i, _ in eval_script.eval_examples(cfg, "test", None)]

    small, large = order(20), order(40)
    assert len(small) == 20 and len(large) == 40 and len(set(large)) == 40
    assert [i for i in large if i in set(small)] == small
    assert sorted(order(40, seed=1)) == sorted(large) and order(40, seed=1) != large


def test_k_responses_per_training_prompt_and_checkpoint_base(runs, tmp_path):
    """n_responses=K on the train split: K responses per prompt in one batched pass ("policy" is the first),
    training prompts only; checkpoint=base with model.load_from=<the run's policy.pt> samples the same model as
    checkpoint=policy, so the same outputs."""
    train_prompts = {ex.prompt[0]["content"] for ex in get_wordsort("train", n_prompts=64)}
    settings = ("n_samples=5", "n_responses=3", "split=train", "temperature=1.0", "max_new_tokens=8",
                "model.eval_batch_size=4")   # 15 sequences in batches of 4: a prompt's K cross batches
    data = samples_of(runs["sft"], tmp_path / "policy", *settings)
    assert len(data["samples"]) == 5
    for s in data["samples"]:
        assert len(s["responses"]) == 3 and s["policy"] == s["responses"][0]
        assert s["prompt_turns"][0]["content"] in train_prompts
    assert any(len(set(s["responses"])) > 1 for s in data["samples"])
    policy_pt = (runs["sft"] / "LATEST").resolve() / "policy.pt"
    base = samples_of(runs["sft"], tmp_path / "base", *settings, "checkpoint=base", f"model.load_from={policy_pt}")
    assert base["checkpoint"] == f"base: tiny + {policy_pt}"
    assert [s["responses"] for s in base["samples"]] == [s["responses"] for s in data["samples"]]


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("run", ["sft", "lora"])
def test_policy_pt_and_hf_export_are_one_model(runs, run):
    """LATEST/policy.pt and LATEST/hf (sft: a model export; lora: the peft adapter on the run's base, while
    policy.pt holds the merged weights) load to the same function."""
    cfg = config_of(runs[run])
    tokenizer = models.load_tokenizer("tiny")
    x = torch.tensor([eval_script.encode(tokenizer, ["<|user|>\nSort these words alphabetically: sun air fig"], 64)[0]])
    logits = []
    for checkpoint in ("policy", "hf"):
        path = eval_script.checkpoint_path(checkpoint, runs[run])
        with torch.no_grad():
            logits.append(eval_script.load_policy(cfg, tokenizer, path, torch.device("cpu"), merge_lora=True)(x).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    base = models.build_model("tiny", torch.float32, seed=0)
    assert (logits[0] - base(x).logits).abs().max() > 1e-2  # the trained weights, not the initial ones


def test_policy_pt_and_hf_export_sample_the_same(sampled):
    from_policy, from_hf = sampled("sft"), sampled("sft", "checkpoint=hf")
    assert from_policy["checkpoint"].endswith("policy.pt") and from_hf["checkpoint"].endswith("hf")
    assert [s["policy"] for s in from_policy["samples"]] == [s["policy"] for s in from_hf["samples"]]


def test_checkpoint_path_to_a_policy_pt(runs, sampled, tmp_path):
    """checkpoint=<path>: a policy.pt (e.g. of an intermediate checkpoint), or the directory holding it."""
    policy_pt = (runs["dpo"] / "LATEST").resolve() / "policy.pt"
    assert eval_script.checkpoint_path(str(policy_pt.parent), runs["dpo"]) == policy_pt
    given = samples_of(runs["dpo"], tmp_path, *SETTINGS, f"checkpoint={policy_pt}")
    assert given["checkpoint"] == str(policy_pt) and given["samples"] == sampled("dpo")["samples"]


# ---------------------------------------------------------------- generation


def loaded(run_dir, *overrides):
    cfg = config_of(run_dir, *overrides)
    tokenizer = models.load_tokenizer(cfg.model.tokenizer_name_or_path)
    path = eval_script.checkpoint_path(cfg.checkpoint, Path(run_dir))
    policy = eval_script.load_policy(cfg, tokenizer, path, torch.device("cpu"), merge_lora=True)
    examples = eval_script.eval_examples(cfg, cfg.split, cfg.n_samples)
    ids = eval_script.encode(tokenizer, eval_script.prompt_texts(cfg, tokenizer, examples), cfg.model.max_prompt_length)
    return cfg, tokenizer, policy, ids


def test_left_padded_batches_give_each_prompt_its_own_greedy_output(runs):
    """Prompts of different lengths, greedy: batched with left padding == one at a time."""
    cfg, tokenizer, policy, ids = loaded(runs["dpo"], "n_samples=8", "temperature=0", "max_new_tokens=8")
    assert len({len(x) for x in ids}) > 1
    budgets = eval_script.token_budgets(cfg, ids)
    batched = eval_script.generate_hf(policy, tokenizer, ids, budgets, cfg)
    with open_dict(cfg):
        cfg.model.eval_batch_size = 1
    assert eval_script.generate_hf(policy, tokenizer, ids, budgets, cfg) == batched
    assert all(len(x) == 8 for x in batched)  # this barely trained model never says EOS


@pytest.mark.parametrize("temperature", [0, 0.7])
def test_eos_ends_rows_and_the_batch(runs, temperature):
    """Outputs hold no EOS; a row shorter than its budget ended with EOS (greedy: EOS is the argmax next); the
    batch ran exactly until its longest row ended (one forward per generated token, not to the budget)."""
    budget = 16
    cfg, tokenizer, policy, ids = loaded(runs["sft"], "n_samples=16", f"temperature={temperature}",
                                         f"max_new_tokens={budget}", "model.eval_batch_size=8")
    stops = eval_script.stop_ids(tokenizer, policy)
    calls = []
    hook = policy.register_forward_hook(lambda *_: calls.append(1))
    try:
        outputs = eval_script.generate_hf(policy, tokenizer, ids, [budget] * len(ids), cfg)
    finally:
        hook.remove()
    assert stops == [tokenizer.eos_token_id] and not any(t in stops for out in outputs for t in out)
    ended = [len(out) < budget for out in outputs]
    assert any(ended)
    steps = [max(min(len(out) + 1, budget) for out in outputs[k: k + 8]) for k in range(0, len(outputs), 8)]
    assert len(calls) == sum(steps)
    if temperature == 0:
        with torch.no_grad():
            for prompt, out in [(p, o) for p, o, done in zip(ids, outputs, ended) if done]:
                assert int(policy(torch.tensor([prompt + out])).logits[0, -1].argmax()) == tokenizer.eos_token_id


def test_token_budget_default_and_override(runs):
    """Default: model.max_length - prompt length (the training bound), capped, at least 1; else max_new_tokens."""
    cfg = config_of(runs["sft"])
    assert cfg.model.max_length == 128 and cfg.max_new_tokens is None
    assert eval_script.token_budgets(cfg, [[5] * 10, [5] * 100, [5] * 130]) == [118, 28, 1]
    with open_dict(cfg):
        cfg.model.max_length = 4096
    assert eval_script.token_budgets(cfg, [[5] * 10]) == [eval_script.MAX_NEW_TOKENS]
    assert eval_script.token_budgets(config_of(runs["sft"], "max_new_tokens=5"), [[5] * 10, [5] * 200]) == [5, 5]
    tokenizer = models.load_tokenizer("tiny")
    long_prompt = " ".join(["water"] * 200)
    full = list(eval_script.encode(tokenizer, [long_prompt], 10_000)[0])
    assert eval_script.encode(tokenizer, [long_prompt], 64)[0] == full[-64:]


def test_cut_stops_at_the_first_stop_token_and_the_budget():
    assert eval_script.cut([5, 6, 0, 7, 1, 1], 10, [0]) == [5, 6]
    assert eval_script.cut([5, 6, 7, 8], 3, [0]) == [5, 6, 7]
    assert eval_script.cut([9, 5, 0], 10, [0, 9]) == []


def test_csft_runs_sample_with_the_good_control_token(tmp_path):
    tokenizer = models.load_tokenizer("tiny")
    for loss, token in [("csft", "<|good|>"), ("sft", "")]:
        cfg = make_config(tmp_path, f"loss={loss}")
        with open_dict(cfg):
            cfg.update(eval_script.DEFAULTS)
        examples = eval_script.eval_examples(cfg, "test", 2)
        assert all(p.endswith("<|assistant|>\n" + token) for p in eval_script.prompt_texts(cfg, tokenizer, examples))


# ---------------------------------------------------------------- mode=eval


@pytest.mark.parametrize("run, checkpoint", [("sft", "policy"), ("dpo", "policy"), ("lora", "policy"),
                                             ("lora", "hf"), ("ppo", "policy")])
def test_mode_eval_reproduces_the_runs_own_eval_metrics(runs, tmp_path, run, checkpoint):
    """The run's Trainer subclass, loader and reference give the metrics train.py logged for the same weights.
    The reference is rebuilt: the frozen initial model for plain weights (LoRA's policy.pt holds them merged),
    the adapters switched off for LoRA's adapter export (what training used)."""
    metrics = eval_metrics(runs[run], tmp_path, f"checkpoint={checkpoint}")
    logged = last_eval(runs[run])
    assert set(metrics) == set(logged)
    for key, value in logged.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    if run in ("dpo", "lora"):
        assert "eval/rewards/accuracies" in metrics and abs(metrics["eval/loss"] - math.log(2)) > 1e-3
    if run == "ppo":  # the critic's loss is the trained value head's (a fresh head would give another)
        assert "eval/loss/critic" in metrics


def test_mode_eval_at_the_initial_weights_gives_ln2(runs, tmp_path):
    """Policy == reference: DPO's loss is -log sigma(0) = ln 2 and every implicit reward is 0."""
    initial = models.build_model("tiny", torch.float32, seed=0)
    torch.save({"step_idx": 0, "state": initial.state_dict(), "metrics": {}}, tmp_path / "initial.pt")
    metrics = eval_metrics(runs["dpo"], tmp_path, f"checkpoint={tmp_path / 'initial.pt'}")
    assert metrics["eval/loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- errors


def config_only_run(tmp_path, runs) -> Path:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((runs["sft"] / "config.yaml").read_text())
    return bare


ERRORS = {  # name: (how to make the case, needle in the message)
    "no run dir": (lambda t, r: [], "no run directory"),
    "missing run dir": (lambda t, r: [f"--config-path={t / 'nope'}"], "no such run directory"),
    "not a run dir": (lambda t, r: [f"--config-path={t}"], "config.yaml is missing"),
    "no LATEST": (lambda t, r: [f"--config-path={config_only_run(t, r)}"], "has no checkpoint"),
    "unknown mode": (lambda t, r: [f"--config-path={r['sft']}", "mode=train"], "mode=train"),
    "unknown key": (lambda t, r: [f"--config-path={r['sft']}", "n_smaples=3"], "n_smaples"),
    "typo with ++": (lambda t, r: [f"--config-path={r['sft']}", "++n_sample=10"], "did you mean n_samples?"),
    "unknown backend": (lambda t, r: [f"--config-path={r['sft']}", "backend=tgi"], "backend=tgi"),
    "bad temperature": (lambda t, r: [f"--config-path={r['sft']}", "temperature=-1"], "temperature=-1"),
    "missing checkpoint": (lambda t, r: [f"--config-path={r['sft']}", f"checkpoint={t / 'x.pt'}"], "checkpoint="),
    "no hf export": (lambda t, r: [f"--config-path={r['dpo']}", "checkpoint=hf"], "export_hf=false"),
    "another model's checkpoint": (lambda t, r: [f"--config-path={r['sft']}", f"checkpoint={other_model(t)}"],
                                   "does not fit"),
    "unreadable checkpoint": (lambda t, r: [f"--config-path={r['sft']}", f"checkpoint={garbage(t)}"], "unreadable"),
    "vllm without a GPU": (lambda t, r: [f"--config-path={r['sft']}", "backend=vllm"], "backend=vllm needs"),
    "vllm on an adapter": (lambda t, r: [f"--config-path={r['lora']}", "backend=vllm"], "use backend=hf"),
    "greedy K responses": (lambda t, r: [f"--config-path={r['sft']}", "n_responses=2", "temperature=0"],
                           "n_responses=2"),
}


def other_model(tmp_path) -> Path:
    """A policy.pt of a Llama with another width than model=tiny."""
    config = LlamaConfig(**{**models.architecture_config("tiny").to_dict(), "hidden_size": 128, "intermediate_size": 256})
    torch.save({"step_idx": 0, "state": LlamaForCausalLM(config).state_dict(), "metrics": {}}, tmp_path / "other.pt")
    return tmp_path / "other.pt"


def garbage(tmp_path) -> Path:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    return tmp_path / "bad.pt"


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_end_in_one_line_and_write_nothing(runs, tmp_path, capsys, case):
    if case == "vllm without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    make, needle = ERRORS[case]
    code = eval_script.main([*make(tmp_path, runs), f"++samples_dir={tmp_path / 'out'}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("eval.py: error:") and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_bad_run_dir_from_the_command_line(tmp_path):
    result = run_script(str(REPO / "eval.py"), f"--config-path={tmp_path / 'nope'}", "++mode=sample", cwd=tmp_path,
                        timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "no such run directory" in result.stderr
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- compare.py over eval.py's output


def test_compare_judges_eval_py_samples(sampled, tmp_path, monkeypatch, capsys):
    """eval.py's files through compare.py against a local OpenAI-compatible judge: against the dataset's
    reference, and head to head between two runs matched by sample id."""
    sft, dpo = sampled.path("sft"), sampled.path("dpo")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    judge = FakeJudge()
    try:
        for extra, results in [(["-bk", "chosen"], "vs_chosen.jsonl"),
                               (["-f2", str(dpo), "-bk", "policy"], "head_to_head.jsonl")]:
            code = compare.main(["-f", str(sft), "-ck", "policy", *extra, "-r", str(tmp_path / results),
                                 "--base_url", judge.url, "--concurrency", "2"])
            assert code == 0, capsys.readouterr().err
            summary = json.loads((tmp_path / f"{results}.summary.json").read_text())
            assert summary["n"] == len(sampled("sft")["samples"])
    finally:
        judge.close()
