"""label.py and its labelers: the task's true reward; a reward model trained here (its export loads with
AutoModelForSequenceClassification and scores the task above chance); an OpenAI-compatible judge on 127.0.0.1
through the real openai client (every mode, faults, kill -9 and resume: every prompt labelled once); labelled
files load through `jsonl:` into every loss's loader."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import label
from feedbackalign import builders, getters, labelers, task
from helpers import REPO, make_config, make_trainer
from test_compare import KEY, FakeJudge

WORDS = [["pen", "fig", "air"], ["sun", "cat", "box", "egg"], ["tea", "dog", "arm"], ["oil", "key", "bed", "ice"]]


def prompt_of(words):
    return f"{task.INSTRUCTION} {' '.join(words)}"


def responses_of(words, extra=""):
    """Perfect, one swap, one word missing, reversed, and an empty answer (left out by the labeler)."""
    s = sorted(words)
    return [" ".join(s) + extra, " ".join([s[1], s[0]] + s[2:]), " ".join(s[1:]), " ".join(reversed(s)), " "]


def write_samples(path: Path, rows) -> Path:
    """An eval.py samples file (K responses per prompt) from (prompt, responses) rows."""
    samples = [{"id": f"s{n}", "prompt": f"<|user|>\n{p}\n<|assistant|>\n", "prompt_turns": [{"role": "user",
                "content": p}], "policy": rs[0], "responses": rs, "chosen": None, "dataset": "wordsort"}
               for n, (p, rs) in enumerate(rows)]
    path.write_text(json.dumps({"sampled_at": "2026-01-01T00:00:00+00:00", "exp_name": "x", "config": {},
                                "samples": samples}))
    return path


def task_rows(extra=""):
    return [(prompt_of(w), responses_of(w, extra)) for w in WORDS]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the task labeler, and loading labelled files


def test_task_labels_are_the_true_reward_and_critique(tmp_path, capsys):
    samples = write_samples(tmp_path / "samples.json", task_rows())
    out = tmp_path / "feedback.jsonl"
    assert label.main(["-f", str(samples), "-o", str(out), "--labeler", "task"]) == 0
    records = read(out)
    assert [r["sample_id"] for r in records] == ["s0", "s1", "s2", "s3"]
    for record, (prompt, responses) in zip(records, task_rows()):
        kept = responses[:4]                                   # the empty fifth answer is left out
        assert record["prompt"] == [{"role": "user", "content": prompt}] and record["responses"] == kept
        assert record["scores"] == [task.true_reward(prompt, r) for r in kept]
        assert record["judgments"] == [task.judge(prompt, r) for r in kept]
        assert record["scores"][0] == 10.0 and record["judgments"][0] is None and record["labeler"] == "task"
    assert "4 empty response(s) left out" in capsys.readouterr().out
    before = out.read_bytes()                                  # a rerun finds everything labelled
    assert label.main(["-f", str(samples), "-o", str(out), "--labeler", "task"]) == 0
    assert out.read_bytes() == before and "(4 were already there)" in capsys.readouterr().out


@pytest.mark.parametrize("loss", ["sft", "dpo", "kto", "nca", "grpo", "cut", "rm"])
def test_labelled_files_load_through_jsonl_into_every_loss(tmp_path, tiny_tokenizer, loss):
    """The converters turn the task's scores and critiques into what each loss reads: the perfect answer is the
    SFT target, DPO's chosen and KTO's only desirable answer; NCA/GRPO groups carry the true rewards; CUT's
    negatives are conditioned on their critique."""
    samples = write_samples(tmp_path / "samples.json", task_rows())
    out = tmp_path / "feedback.jsonl"
    assert label.main(["-f", str(samples), "-o", str(out), "--labeler", "task"]) == 0
    data = getters.get_dataset(f"jsonl:{out}", "train", test_fraction=0.0)
    assert len(data) == len(WORDS)
    cfg = make_config(tmp_path, f"loss={loss}", "model.batch_size=2", f"datasets=[jsonl:{out}]")
    loader = builders.build_loader(cfg, tiny_tokenizer, split="train", train=True, datasets=[data])
    batch = next(iter(loader))
    decode = tiny_tokenizer.decode
    perfect = {" ".join(sorted(w)) for w in WORDS}
    text = [decode(s.response_ids[:-1]) for s in batch.sequences()]
    if loss == "sft":
        assert set(text) <= perfect
    elif loss in ("dpo", "rm"):
        assert all(decode(s.response_ids[:-1]) in perfect for s in batch.parts["chosen"])
        assert not any(decode(s.response_ids[:-1]) in perfect for s in batch.parts["rejected"])
    elif loss == "kto":
        flags = batch.values["desirable"].tolist()
        assert [t in perfect for t in text[:len(flags)]] == flags
    elif loss in ("nca", "grpo"):
        rewards = batch.values["rewards"]
        assert rewards.shape == (2, 4) and (rewards.max(-1).values == 10.0).all()
        prompts = [decode(s.prompt_ids) for s in batch.parts["responses"]]
        for n, s in enumerate(batch.parts["responses"]):
            words = task.parse_prompt(prompts[n])
            expected = task.true_reward(prompt_of(words), decode(s.response_ids[:-1]))
            assert rewards.view(-1)[n].item() == pytest.approx(expected)
    else:
        judged = [decode(s.prompt_ids) for s in batch.parts["judged"]]
        weights = batch.values["weight_unlike"].tolist()
        assert any(w != -1 for w in weights)
        for prompt, w, s in zip(judged, weights, batch.parts["judged"]):
            if w != -1:   # a negative: its critique sits in the prompt
                critique = task.judge(prompt_of(task.parse_prompt(prompt)), decode(s.response_ids[:-1]))
                assert critique in prompt


def test_task_labeler_refuses_other_prompts(tmp_path, capsys):
    samples = write_samples(tmp_path / "samples.json", [("Write a haiku about rain.", ["Rain falls."])])
    out = tmp_path / "feedback.jsonl"
    assert label.main(["-f", str(samples), "-o", str(out), "--labeler", "task"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labeler=task scores the built-in wordsort task only" in err[0] and "s0" in err[0]
    assert not out.exists() or out.read_text() == ""


# ---------------------------------------------------------------- an LLM judge


SECTION = {name: re.compile(rf"\[{name}\]\n(.*?)\n\[End of {name[0].lower() + name[1:]}\]", re.DOTALL)
           for name in ("Conversation", "Response", "Response A", "Response B")}
PLAN = re.compile(r"\[fail:([a-z0-9,]+)\]")


class TaskJudge(FakeJudge):
    """Answers label.py's rating and judgment prompts and compare.py's pairwise one from the task's true reward
    and critique: rating 1 + round(0.9 x reward); the critique, or "No error."; the higher reward wins. A response
    holding GARBLE gets an answer without its final line; `[fail:k1,k2]` fails its first attempts (FakeJudge)."""

    def respond(self, handler, body) -> None:
        if handler.headers.get("Authorization") != f"Bearer {self.key}":
            return self.send(handler, 401, {"error": {"message": "Incorrect API key provided"}})
        content = body["messages"][-1]["content"]
        conversation = SECTION["Conversation"].search(content).group(1)
        if "[Response A]" in content:
            a, b = (SECTION[f"Response {x}"].search(content).group(1) for x in "AB")
            key, shown = ("pair", a, b), a + b
            ra, rb = task.true_reward(conversation, a), task.true_reward(conversation, b)
            answer = "Winner: " + ("A" if ra > rb else "B" if rb > ra else "tie")
        else:
            response = SECTION["Response"].search(content).group(1)
            key, shown = (content[:20], response), response
            if content.startswith("Below is a conversation") and "Rate the response" in content:
                answer = f"Reasons.\n**Rating: {1 + round(0.9 * task.true_reward(conversation, response))}**"
            else:
                answer = f"Reasons.\nJudgment: {task.judge(conversation, response) or 'No error.'}"
            if "GARBLE" in response:
                answer = "I would rather not say."
        plan = (PLAN.findall(shown) or [""])[0].split(",")
        with self.lock:
            self.requests += 1
            attempt = self.attempts[key]
            self.attempts[key] += 1
        if attempt < len(plan) and plan[attempt]:
            return self.fail(handler, plan[attempt])
        time.sleep(self.delay)
        with self.lock:
            self.answered[key] += 1
        self.send(handler, 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer}}]})


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    server = TaskJudge()
    yield server
    server.close()


def judge_args(samples, out, url, mode, *extra):
    return ["-f", str(samples), "-o", str(out), "--labeler", "judge", "--mode", mode, "--judge", "judge-1",
            "--base_url", url, "--timeout", "0.4", "--backoff", "0.01", "--backoff_max", "0.05", *extra]


FLAKY = {0: " [fail:429,500]", 1: " [fail:garbage,reset]", 2: " [fail:badjson,503,nochoices]"}


def flaky_rows():
    rows = task_rows()
    return [(p, [rs[0] + FLAKY.get(n, ""), *rs[1:4], "GARBLE " + rs[1]]) for n, (p, rs) in enumerate(rows)]


@pytest.mark.parametrize("mode", ["scores", "judgments", "pairs"])
def test_judge_modes_through_a_flaky_server_label_every_prompt_once(tmp_path, judge_server, mode):
    rows = flaky_rows()
    samples = write_samples(tmp_path / "samples.json", rows)
    out = tmp_path / "feedback.jsonl"
    assert label.main(judge_args(samples, out, judge_server.url, mode, "--concurrency", "3")) == 0
    records = {r["sample_id"]: r for r in read(out)}
    assert sorted(records) == ["s0", "s1", "s2", "s3"] and len(read(out)) == 4
    for n, (prompt, responses) in enumerate(rows):
        r = records[f"s{n}"]
        conversation = f"User: {prompt}"
        assert r["labeler"] == "judge" and r["judge"]["model"] == "judge-1" and r["judge"]["mode"] == mode
        if mode == "scores":   # GARBLE's rating cannot be parsed: that response is left out of the record
            assert r["responses"] == responses[:4]
            assert r["scores"] == [1 + round(0.9 * task.true_reward(conversation, x)) for x in responses[:4]]
        elif mode == "judgments":
            assert r["responses"] == responses[:4]
            assert r["judgments"] == [task.judge(conversation, x) for x in responses[:4]]
        else:   # both orders agree with the true reward: i preferred over j exactly when its reward is higher
            assert r["responses"] == responses
            reward = [task.true_reward(conversation, x) for x in responses]
            expected = sorted([i, j] if reward[i] > reward[j] else [j, i] for i in range(5) for j in range(i + 1, 5)
                              if reward[i] != reward[j])
            assert sorted(r["pairs"]) == expected
    asked = judge_server.requests
    per_prompt = 10 * 2 if mode == "pairs" else 5
    failures = sum(len(tags.split(",")) for tags in ("429,500", "garbage,reset", "badjson,503,nochoices"))
    failures *= 4 * 2 if mode == "pairs" else 1   # a pairs prompt asks the tagged response in 4 pairs x 2 orders
    assert asked == 4 * per_prompt + failures     # one success per request, retries only for injected faults
    assert all(count == 1 for count in judge_server.answered.values())
    data = getters.get_dataset(f"jsonl:{out}", "train", test_fraction=0.0)   # a training set as written
    assert len(data) == 4


def test_killed_labelling_resumes_without_duplicates_or_losses(tmp_path, judge_server):
    """label.py as a real process, killed with SIGKILL midway (plus a torn last line, as a crash mid-write leaves);
    the rerun asks only for the prompts missing from the output, and every prompt ends up there once."""
    judge_server.delay = 0.05
    rows = [(prompt_of(task.VOCAB[k:k + 3]), responses_of(task.VOCAB[k:k + 3])[:2]) for k in range(0, 45, 3)]
    samples = write_samples(tmp_path / "samples.json", rows)
    out = tmp_path / "feedback.jsonl"
    args = [sys.executable, str(REPO / "label.py"), *judge_args(samples, out, judge_server.url, "scores",
                                                                 "--concurrency", "2")]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OPENAI_API_KEY": KEY})
    deadline = time.monotonic() + 60
    while (not out.exists() or out.read_bytes().count(b"\n") < 3) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    kept = out.read_bytes().count(b"\n")
    assert 3 <= kept < len(rows), "the run must stop midway"
    with open(out, "ab") as handle:
        handle.write(b'{"id": "0f3c", "sample_id": "s1", "prom')
    before = judge_server.requests
    assert label.main(judge_args(samples, out, judge_server.url, "scores")) == 0
    assert judge_server.requests - before == 2 * (len(rows) - kept)     # K = 2 requests per missing prompt
    records = read(out)
    assert sorted(r["sample_id"] for r in records) == sorted(f"s{n}" for n in range(len(rows)))


def test_judge_errors_end_in_one_line_and_keep_labels(tmp_path, judge_server, capsys, monkeypatch):
    samples = write_samples(tmp_path / "samples.json", task_rows())
    out = tmp_path / "feedback.jsonl"
    assert label.main(["-f", str(samples), "-o", str(out), "--labeler", "task"]) == 0
    kept = out.read_bytes()
    cases = [  # (args, env key, exit code, phrases)
        (judge_args(samples, tmp_path / "j.jsonl", judge_server.url, "scores"), "sk-wrong-SECRET", 2,
         ["HTTP 401", "OPENAI_API_KEY"]),
        (judge_args(samples, tmp_path / "j.jsonl", judge_server.url, "scores"), None, 2, ["OPENAI_API_KEY", "not set"]),
        (judge_args(samples, out, judge_server.url, "scores"), KEY, 2, ["other samples or another labeler"]),
        (["-f", str(samples), "-o", str(tmp_path / "r.jsonl"), "--labeler", "rm"], KEY, 2, ["--reward_model"]),
        (["-f", str(tmp_path / "none.json"), "-o", str(out), "--labeler", "task"], KEY, 2, ["none.json not found"]),
    ]
    for args, key, code, phrases in cases:
        if key is None:
            monkeypatch.delenv("OPENAI_API_KEY")
        else:
            monkeypatch.setenv("OPENAI_API_KEY", key)
        assert label.main(args) == code, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("label.py: error: "), err
        assert all(p in err[0] for p in phrases), (phrases, err[0])
        assert "SECRET" not in err[0] and KEY not in err[0]
    assert out.read_bytes() == kept


# ---------------------------------------------------------------- a reward model trained here


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """loss=rm trained in process on the task's best-vs-worst pairs (random init, 20 steps)."""
    root = tmp_path_factory.mktemp("rm")
    trainer = make_trainer(root, "loss=rm", "exp_name=rm", "export_hf=true", "n_examples=160", "lr=1e-3",
                           "n_eval_examples=0", "++dataset_options.wordsort.n_prompts=160")
    trainer.train()
    return trainer


def test_reward_model_export_is_a_sequence_classifier_scoring_as_trained(reward_model):
    from transformers import AutoModelForSequenceClassification

    export = reward_model.run_dir / "LATEST" / "hf"
    classifier = AutoModelForSequenceClassification.from_pretrained(export)
    assert classifier.config.num_labels == 1 and classifier.config.feedbackalign_reward_input["max_length"] == 128
    batch = next(iter(reward_model.train_loader))
    reward_model.policy.eval()
    with torch.no_grad():
        policy, _ = reward_model.forward(batch)
        trained = torch.cat([reward_model.sequence_scores(policy[p]) for p in ("chosen", "rejected")])
        exported = [classifier(input_ids=torch.tensor([list(s.prompt_ids) + list(s.response_ids[:-1])])).logits[0, 0]
                    for s in batch.sequences()]
    torch.testing.assert_close(trained, torch.stack(exported), rtol=1e-4, atol=1e-4)


def test_reward_model_labels_held_out_prompts_above_chance(reward_model, tmp_path):
    """labeler=rm on the run directory scores the held-out test prompts' graded answers; its order agrees with
    the true reward on most pairs of answers with different rewards (chance: 50%)."""
    examples = task.get_wordsort("test", n_prompts=40).examples
    rows = [(ex.prompt[0]["content"], ex.generations) for ex in examples]
    samples = write_samples(tmp_path / "samples.json", rows)
    out = tmp_path / "feedback.jsonl"
    assert label.main(["-f", str(samples), "-o", str(out), "--labeler", "rm", "--reward_model",
                       str(reward_model.run_dir), "--batch_size", "24"]) == 0
    agree = total = 0
    for record, ex in zip(read(out), examples):
        assert record["responses"] == ex.generations and record["labeler"] == "rm"
        for i in range(len(ex.scores)):
            for j in range(len(ex.scores)):
                if ex.scores[i] > ex.scores[j]:
                    total += 1
                    agree += record["scores"][i] > record["scores"][j]
    assert total >= 200 and agree / total > 0.65, agree / total
    scorer = labelers.RewardModelLabeler(str(reward_model.run_dir))   # batched scores = one at a time
    ids = [scorer.input_ids(ex.prompt, g) for ex in examples[:3] for g in ex.generations]
    one_by_one = [scorer.scores([x])[0] for x in ids]
    assert scorer.scores(ids) == pytest.approx(one_by_one, rel=1e-4, abs=1e-4)
    assert one_by_one == pytest.approx([s for r in read(out)[:3] for s in r["scores"]], rel=1e-4, abs=1e-4)
