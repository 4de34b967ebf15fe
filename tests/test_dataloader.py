"""DataLoaders: tokenisation invariants, the six layouts, sharding/resume, bad inputs, data_summary."""

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dataloader as dl
from feedbackalign import data_summary
from feedbackalign.data_summary import summarize
from feedbackalign.feedback import Dataset, Example
from feedbackalign.errors import CheckpointError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
EOS, PAD = 0, 1


def user(text):
    return [{"role": "user", "content": text}]


def pair_ex(k, name="pairs"):
    return Example(prompt=user(f"question {k}?"), generations=[f"chosen answer {k}", f"rejected answer {k}"],
                   pairs=[(0, 1)], dataset_name=name, source=f"{name}.jsonl:{k}")


def scored_ex(k, scores, name="scored"):
    return Example(prompt=user(f"prompt {k}"), generations=[f"reply {k}.{i}" for i in range(len(scores))],
                   scores=list(scores), dataset_name=name, source=f"{name}.jsonl:{k}")


def make(cls, examples, name="toy", **kw):
    kw.setdefault("batch_size", 2)
    given_datasets = bool(examples) and isinstance(examples[0], Dataset)
    datasets = examples if given_datasets else [Dataset(name, examples)]
    return cls(datasets, kw.pop("tokenizer"), **kw)


def resp_ids(tok, text):
    return tuple(tok(text, add_special_tokens=False)["input_ids"]) + (EOS,)


def prompt_ids(tok, text):
    return tuple(tok(text)["input_ids"])


def plain_prompt(question):
    return f"<|user|>\n{question}\n<|assistant|>\n"


def run(loader):
    return list(iter(loader))


# ---------------------------------------------------------------- formatting and tokenisation invariants


def test_prompt_format_uses_halos_prefixes(tiny_tokenizer):
    turns = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye?"}]
    expected = "<|system|>\nBe brief\n<|user|>\nHi\n<|assistant|>\nHello!\n<|user|>\nBye?\n<|assistant|>\n"
    assert dl.format_prompt(turns, tiny_tokenizer) == expected
    fmt = dl.PromptFormat("\n\nHuman: ", "", "\n\nAssistant: ", "", "")
    assert dl.format_prompt(turns[1:3], tiny_tokenizer, fmt) == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nAssistant: "
    loader = make(dl.SFTDataLoader, [pair_ex(0), pair_ex(1)], tokenizer=tiny_tokenizer, shuffle=False,
                  prompt_format=dl.PromptFormat(human_prefix="Q: ", human_suffix=" ", assistant_prefix="A:"))
    assert run(loader)[0].prompts == ["Q: question 0? A:", "Q: question 1? A:"]


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    loader = make(dl.SFTDataLoader, [pair_ex(0), pair_ex(1)], tokenizer=tok, shuffle=False)
    batch = run(loader)[0]
    assert batch.prompts[0] == "<|user|>question 0?<|assistant|>"
    assert batch.sequences()[0].prompt_ids == tuple(tok("<|user|>question 0?<|assistant|>",
                                                         add_special_tokens=False)["input_ids"])
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
    system = [Example(prompt=[{"role": "system", "content": "s"}, *user("q")], generations=["a"], sft_index=0,
                      source="sys.jsonl:4")]
    with pytest.raises(DataError, match="sys.jsonl:4: the tokenizer's chat template rejects .*no system turns"):
        make(dl.SFTDataLoader, system, tokenizer=tok, batch_size=1)


def test_labels_cover_exactly_the_response_and_responses_end_with_eos(tiny_tokenizer):
    examples = [pair_ex(0), Example(prompt=user("a much longer question with many words in it"),
                                    generations=["short", "x"], pairs=[(0, 1)], source="long:0")]
    batch = run(make(dl.PairedPreferenceDataLoader, examples, tokenizer=tiny_tokenizer, shuffle=False))[0]
    assert batch.kind == "pairs" and [len(batch.parts[p]) for p in ("chosen", "rejected")] == [2, 2]
    for seq in batch.sequences():
        assert seq.response_ids[-1] == EOS
    assert batch.sequences()[0].response_ids == resp_ids(tiny_tokenizer, "chosen answer 0")
    assert batch.sequences()[0].prompt_ids == prompt_ids(tiny_tokenizer, plain_prompt("question 0?"))


def test_truncate_rule_closed_form():
    prompt, response = tuple(range(100, 110)), tuple(range(20))
    p, (r,) = dl.truncate(prompt, [response], max_length=16, max_prompt_length=4)
    assert p == (106, 107, 108, 109) and r == tuple(range(12))            # prompt end, response start
    p, (r,) = dl.truncate(prompt, [response[:5]], max_length=16, max_prompt_length=4)
    assert p == prompt and r == response[:5]                               # fits: untouched
    p, (r,) = dl.truncate(prompt[:3], [response], max_length=16, max_prompt_length=4)
    assert p == prompt[:3] and r == tuple(range(13))                       # short prompt: only the response is cut
    p, (a, b) = dl.truncate(prompt, [response[:2], response], max_length=16, max_prompt_length=4)
    assert p == prompt[-4:] and a == response[:2] and b == tuple(range(12))  # the longest response decides


def test_truncate_never_exceeds_max_length():
    rng = random.Random(0)
    for _ in range(300):
        max_length = rng.randint(2, 40)
        max_prompt = rng.randint(1, max_length - 1)
        prompt = tuple(rng.randrange(50) for _ in range(rng.randint(0, 60)))
        responses = [tuple(rng.randrange(50) for _ in range(rng.randint(1, 60))) for _ in range(rng.randint(1, 3))]
        p, rs = dl.truncate(prompt, responses, max_length, max_prompt)
        assert p == prompt[len(prompt) - len(p):]
        for r, full in zip(rs, responses):
            assert len(p) + len(r) <= max_length and 1 <= len(r) and r == full[:len(r)]


def test_truncation_in_a_loader_keeps_shared_prompt_ids(tiny_tokenizer):
    question = " ".join(f"word{k}" for k in range(60))
    long_answer = " ".join(f"token{k}" for k in range(80))
    ex = Example(prompt=user(question), generations=[long_answer, "no"], pairs=[(0, 1)], source="long:0")
    batch = run(make(dl.PairedPreferenceDataLoader, [ex, pair_ex(1)], tokenizer=tiny_tokenizer, shuffle=False,
                     max_length=48, max_prompt_length=16))[0]
    chosen, rejected = batch.sequences()[0], batch.sequences()[2]
    full_prompt = prompt_ids(tiny_tokenizer, plain_prompt(question))
    assert chosen.prompt_ids == rejected.prompt_ids == full_prompt[-16:]
    assert chosen.response_ids == resp_ids(tiny_tokenizer, long_answer)[:48 - 16]
    assert rejected.response_ids == resp_ids(tiny_tokenizer, "no")
    assert all(len(s.prompt_ids) + len(s.response_ids) <= 48 for s in batch.sequences())


# ---------------------------------------------------------------- layouts


def test_sft_targets_and_skips(tiny_tokenizer):
    examples = [
        Example(prompt=user("a"), generations=["x", "y", "sft"], sft_index=2, source="s:0"),
        Example(prompt=user("b"), generations=["low", "best", "mid"], scores=[0.0, 2.0, 1.0], source="s:1"),
        Example(prompt=user("c"), generations=["lost", "won"], pairs=[(1, 0)], source="s:2"),
        Example(prompt=user("d"), generations=["bad", "good"], desirable=[False, True], source="s:3"),
        Example(prompt=user("e"), generations=["judged", "fine"], judgments=["wrong", None], source="s:4"),
        Example(prompt=user("f"), generations=["only bad"], judgments=["wrong"], source="s:5"),
    ]
    with pytest.warns(UserWarning, match="skipped 1"):
        loader = make(dl.SFTDataLoader, examples, tokenizer=tiny_tokenizer, batch_size=5, shuffle=False)
    batch = run(loader)[0]
    assert len(batch.sequences()) == 5 and batch.sources == ["s:0", "s:1", "s:2", "s:3", "s:4"]
    expected = ["sft", "best", "won", "good", "fine"]
    assert [s.response_ids for s in batch.sequences()] == [resp_ids(tiny_tokenizer, t) for t in expected]
    with pytest.raises(DataError, match="SFTDataLoader needs an SFT target.*dataset 'judged_only'"):
        make(dl.SFTDataLoader, examples[-1:], name="judged_only", tokenizer=tiny_tokenizer, batch_size=1)


def test_conditional_sft_control_tokens(tiny_tokenizer):
    good, bad = tiny_tokenizer.convert_tokens_to_ids([dl.GOOD_TOKEN, dl.BAD_TOKEN])
    assert dl.GOOD_TOKEN == "<|good|>" and tiny_tokenizer(dl.GOOD_TOKEN, add_special_tokens=False)["input_ids"] == [good]
    loader = make(dl.ConditionalSFTDataLoader, [pair_ex(k) for k in range(3)], tokenizer=tiny_tokenizer,
                  batch_size=6)
    assert loader.good_token == dl.GOOD_TOKEN
    seqs = [s for b in run(loader) for s in b.sequences()]
    assert len(seqs) == 6                                                  # every labelled generation once
    for k in range(3):
        plain = prompt_ids(tiny_tokenizer, plain_prompt(f"question {k}?"))
        assert dl.Sequence(plain + (good,), resp_ids(tiny_tokenizer, f"chosen answer {k}")) in seqs
        assert dl.Sequence(plain + (bad,), resp_ids(tiny_tokenizer, f"rejected answer {k}")) in seqs
    with pytest.raises(ConfigError, match="'<\\|nice\\|>' is not a token"):
        make(dl.ConditionalSFTDataLoader, [pair_ex(0)], tokenizer=tiny_tokenizer, chosen_control_token="<|nice|>")


def test_paired_layout_scores_and_pair_modes(tiny_tokenizer):
    loader = make(dl.PairedPreferenceDataLoader, [pair_ex(k) for k in range(6)], tokenizer=tiny_tokenizer,
                  batch_size=6, gradient_accumulation_steps=2)
    for batch in run(loader):
        b = len(batch.sources)
        assert b == 3 and len(batch.sequences()) == 6 and "chosen_scores" not in batch.values
        for i, source in enumerate(batch.sources):
            k = source.split(":")[1]
            assert batch.sequences()[i].response_ids == resp_ids(tiny_tokenizer, f"chosen answer {k}")
            assert batch.sequences()[b + i].response_ids == resp_ids(tiny_tokenizer, f"rejected answer {k}")
    ex = scored_ex(0, [3.0, 2.0, 0.0])
    all_pairs = make(dl.PairedPreferenceDataLoader, [ex], tokenizer=tiny_tokenizer, batch_size=1, pair_mode="all")
    assert len(all_pairs.items) == 3                                       # 3 > 2 > 0: three ordered pairs
    margin = make(dl.PairedPreferenceDataLoader, [ex], tokenizer=tiny_tokenizer, batch_size=1, pair_mode="all",
                  pair_margin=1.5)
    assert sorted(it.gens for it in margin.items) == [(0, 2), (1, 2)]
    best_worst = run(make(dl.PairedPreferenceDataLoader, [ex], tokenizer=tiny_tokenizer, batch_size=1))
    scores = best_worst[0].values
    assert scores["chosen_scores"].tolist() == [3.0] and scores["rejected_scores"].tolist() == [0.0]


def test_unpaired_kl_partners_labels_and_scores(tiny_tokenizer):
    loader = make(dl.UnpairedPreferenceDataLoader, [pair_ex(k) for k in range(4)], tokenizer=tiny_tokenizer,
                  batch_size=4)
    batches = run(loader)
    assert len(loader.items) == 8 and len(batches) == 2
    n_desirable = 0
    for batch in batches:
        seqs, b = batch.sequences(), 4
        assert len(seqs) == 8 and batch.values["desirable"].dtype == torch.bool and batch.values["scores"].shape == (4,)
        for i in range(b):
            assert seqs[b + i].prompt_ids == seqs[i].prompt_ids
            assert seqs[b + i].response_ids == seqs[(i + 1) % b].response_ids     # mismatched KL partner
            is_chosen = seqs[i].response_ids in {resp_ids(tiny_tokenizer, f"chosen answer {k}") for k in range(4)}
            assert bool(batch.values["desirable"][i]) == is_chosen
            assert batch.values["scores"][i].item() == (1.0 if is_chosen else -1.0)
        n_desirable += int(batch.values["desirable"].sum())
    assert n_desirable == 4                                                # pairs split: chosen +, rejected -
    scored = run(make(dl.UnpairedPreferenceDataLoader, [scored_ex(0, [5.0, -2.0]), scored_ex(1, [0.5, 0.25])],
                      tokenizer=tiny_tokenizer, batch_size=4, shuffle=False))[0]
    assert scored.values["scores"].tolist() == [5.0, -2.0, 0.5, 0.25]
    assert scored.values["desirable"].tolist() == [True, False, True, False]


def test_reward_groups_bucketed_by_k(tiny_tokenizer):
    k3 = [scored_ex(k, [1.0, 3.0, 2.0], name="k3") for k in range(5)]
    k4 = [scored_ex(10 + k, [4.0, 1.0, 3.0, 2.0], name="k4") for k in range(6)]
    loader = make(dl.RewardDataLoader, [Dataset("k3", k3), Dataset("k4", k4)], tokenizer=tiny_tokenizer,
                  batch_size=2)
    batches = run(loader)
    assert len(loader) == loader.steps_per_epoch == 2 + 3                  # 5 K=3 groups: one left over
    ks = []
    for batch in batches:
        k = batch.values["rewards"].shape[1]
        ks.append(k)
        assert batch.values["rewards"].shape == (2, k) and len(batch.sequences()) == 2 * k
        for g, source in enumerate(batch.sources):
            n = source.split(":")[1]
            expected = [resp_ids(tiny_tokenizer, f"reply {n}.{i}") for i in range(k)]
            assert [s.response_ids for s in batch.sequences()[g * k:(g + 1) * k]] == expected     # row-major
            assert batch.values["rewards"][g].tolist() == ([1.0, 3.0, 2.0] if k == 3 else [4.0, 1.0, 3.0, 2.0])
    assert sorted(ks) == [3, 3, 4, 4, 4]
    top3 = make(dl.RewardDataLoader, k4, tokenizer=tiny_tokenizer, batch_size=2, n_responses=3)
    assert {it.gens for it in top3.items} == {(0, 1, 2)}                   # two best (4, 3) and the worst (1)
    pairs = run(make(dl.RewardDataLoader, [pair_ex(0), pair_ex(1)], tokenizer=tiny_tokenizer, batch_size=2))[0]
    assert pairs.values["rewards"].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert pairs.sequences()[0].response_ids in {resp_ids(tiny_tokenizer, f"chosen answer {k}") for k in (0, 1)}


def judged_examples():
    return [
        Example(prompt=user("q0"), generations=["wrong answer"], judgments=["It is wrong."], source="cut:0"),
        Example(prompt=user("q1"), generations=["right answer"], judgments=[None], source="cut:1"),
        Example(prompt=user("q2"), generations=["bad answer"], judgments=["Too vague."], source="cut:2"),
        Example(prompt=user("q3"), generations=["good answer"], judgments=[None], source="cut:3"),
    ]


def test_judgment_rows_weights_and_chat_format(tiny_tokenizer):
    unlabelled_negative = Example(prompt=user("q4"), generations=["meh"], desirable=[False], source="cut:4")
    with pytest.warns(UserWarning, match="skipped 1"):
        loader = make(dl.JudgmentDataLoader, judged_examples() + [unlabelled_negative], tokenizer=tiny_tokenizer,
                      batch_size=4, shuffle=False, weight_unlike=0.5)
    batch = run(loader)[0]
    seqs = batch.sequences()
    assert len(seqs) == 8 and batch.values["weight_unlike"].tolist() == [0.5, -1.0, 0.5, -1.0]
    judged_prompt = "<|user|>\nq0\n\nJudgment of the response to write: It is wrong.\n<|assistant|>\n"
    assert seqs[0].prompt_ids == prompt_ids(tiny_tokenizer, judged_prompt)
    assert seqs[4].prompt_ids == prompt_ids(tiny_tokenizer, plain_prompt("q0"))
    assert seqs[0].response_ids == seqs[4].response_ids == resp_ids(tiny_tokenizer, "wrong answer")
    assert seqs[1] == seqs[5] and seqs[1].prompt_ids == prompt_ids(tiny_tokenizer, plain_prompt("q1"))
    assert batch.prompts[0] == plain_prompt("q0")


def test_judgment_alpaca_templates_and_identical_truncated_responses(tiny_tokenizer):
    # The two templates of CUT's templates/alpaca.json, written out here as the reference.
    plain = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
             "request.\n\n### Instruction:\nq0\n\n### Response:\n")
    judge = ("Below is an instruction that describes a task. Write a response to the instruction and the response "
             "should match the corresponding judgment.\n\n### Instruction:\nq0\n\n### Judgment:\nIt is wrong."
             "\n\n### Response:\n")
    long = " ".join(f"w{k}" for k in range(200))
    examples = judged_examples()
    examples[0].generations[0] = long
    batch = run(make(dl.JudgmentDataLoader, examples, tokenizer=tiny_tokenizer, batch_size=4, shuffle=False,
                     prompt_template="alpaca", max_length=96, max_prompt_length=64))[0]
    first, second = batch.sequences()[0], batch.sequences()[4]
    assert first.prompt_ids == prompt_ids(tiny_tokenizer, judge)[-64:]
    assert second.prompt_ids == prompt_ids(tiny_tokenizer, plain)
    assert first.response_ids == second.response_ids == resp_ids(tiny_tokenizer, long)[:96 - 64]
    assert all(len(s.prompt_ids) + len(s.response_ids) <= 96 for s in batch.sequences())
    multi = [Example(prompt=user("a") + [{"role": "assistant", "content": "b"}, *user("c")], generations=["d"],
                     judgments=["no"], source="multi:7")]
    with pytest.raises(DataError, match="multi:7: prompt_template=alpaca needs a single user turn"):
        make(dl.JudgmentDataLoader, multi, tokenizer=tiny_tokenizer, batch_size=1, prompt_template="alpaca")


def test_judgment_downsample_keeps_positives_in_proportion_to_negatives(tiny_tokenizer):
    """CUT's rule: int(downsample x #negatives) positives are kept, never more than exist."""
    examples = [Example(prompt=user(f"p{k}"), generations=[f"a{k}"], judgments=[None], source=f"pos:{k}")
                for k in range(8)]
    examples += [Example(prompt=user(f"n{k}"), generations=[f"b{k}"], judgments=["bad"], source=f"neg:{k}")
                 for k in range(4)]

    def kept(seed, downsample):
        loader = make(dl.JudgmentDataLoader, examples, tokenizer=tiny_tokenizer, batch_size=2, seed=seed,
                      downsample=downsample)
        return sorted(it.example.source for it in loader.items)

    assert len([s for s in kept(0, 0.5) if s.startswith("pos")]) == 2      # int(4 x 0.5)
    assert len([s for s in kept(0, 0.5) if s.startswith("neg")]) == 4      # negatives are all kept
    assert len([s for s in kept(0, 5.0) if s.startswith("pos")]) == 8      # capped at the 8 positives
    assert kept(0, 0.5) == kept(0, 0.5)
    assert any(kept(seed, 0.5) != kept(0, 0.5) for seed in range(1, 6))
    with pytest.raises(DataError, match="JudgmentDataLoader needs natural-language judgments"):
        make(dl.JudgmentDataLoader, examples[:8], tokenizer=tiny_tokenizer, batch_size=2)


# ---------------------------------------------------------------- sharding, order, bounds, resume


def comparable(batch):
    """Everything a batch carries but its place in the accumulation (step, micro)."""
    return (batch.kind, batch.parts, {k: v.tolist() for k, v in batch.values.items()}, batch.prompts, batch.sources,
            batch.epoch)


def test_two_ranks_equal_two_accumulation_steps(tiny_tokenizer):
    data = [pair_ex(k) for k in range(8)]                                  # 16 KTO items
    common = dict(tokenizer=tiny_tokenizer, batch_size=8, seed=3, n_epochs=2)
    accum = run(make(dl.UnpairedPreferenceDataLoader, data, gradient_accumulation_steps=2, **common))
    ranks = [run(make(dl.UnpairedPreferenceDataLoader, data, world_size=2, rank=r, **common)) for r in (0, 1)]
    assert len(accum) == 8 and len(ranks[0]) == len(ranks[1]) == 4
    for step in range(4):
        for micro in (0, 1):
            a, r = accum[2 * step + micro], ranks[micro][step]
            assert (a.step, a.micro, r.step, r.micro) == (step, micro, step, 0)
            assert comparable(a) == comparable(r)                          # same items, same KL partners
    # 2 ranks x 2 accumulation: chunk c of a global batch is rank c % 2's (c // 2)-th microbatch.
    common["batch_size"] = 16
    single = run(make(dl.UnpairedPreferenceDataLoader, data, gradient_accumulation_steps=4, **common))
    for r in (0, 1):
        mine = run(make(dl.UnpairedPreferenceDataLoader, data, world_size=2, rank=r, gradient_accumulation_steps=2,
                        **common))
        assert [comparable(b) for b in mine] == [comparable(single[4 * s + 2 * m + r])
                                                 for s in range(2) for m in range(2)]


def test_ranks_partition_an_epoch_and_seed_fixes_the_order(tiny_tokenizer):
    data = [pair_ex(k) for k in range(21)]

    def sources(seed, rank=0, world=1, **kw):
        loader = make(dl.PairedPreferenceDataLoader, data, tokenizer=tiny_tokenizer, batch_size=8, seed=seed,
                      rank=rank, world_size=world, gradient_accumulation_steps=2 if world == 2 else 4, **kw)
        return [s for b in run(loader) for s in b.sources]

    per_rank = [sources(0, rank=r, world=2) for r in (0, 1)]
    union = per_rank[0] + per_rank[1]
    assert len(union) == 16 and len(set(union)) == 16                      # 2 steps of 8; remainder 5 dropped
    assert set(union) <= {e.source for e in data}
    assert sorted(sources(0)) == sorted(union)
    assert sources(0) == sources(0) and sources(0) != sources(1)
    assert sources(0, shuffle=False) == [f"pairs.jsonl:{k}" for k in range(16)]
    two = sources(0, n_epochs=2)
    assert len(two) == 32 and two[:16] == sources(0) and two[16:] != two[:16]


def test_n_examples_bounds_the_run_and_wins_over_n_epochs(tiny_tokenizer):
    loader = make(dl.SFTDataLoader, [pair_ex(k) for k in range(8)], tokenizer=tiny_tokenizer, batch_size=4,
                  gradient_accumulation_steps=2, n_examples=10, n_epochs=5)
    batches = run(loader)
    assert len(loader) == 3 and len(batches) == 6                          # ceil(10 / 4) steps, 2 micro each
    assert [b.epoch for b in batches] == [0, 0, 0, 0, 1, 1]


def test_state_dict_round_trip_resumes_exactly(tiny_tokenizer):
    data = [pair_ex(k) for k in range(10)]
    common = dict(tokenizer=tiny_tokenizer, batch_size=4, gradient_accumulation_steps=2, n_epochs=3, seed=7)
    full = run(make(dl.UnpairedPreferenceDataLoader, data, **common))
    first = make(dl.UnpairedPreferenceDataLoader, data, **common)
    it = iter(first)
    for _ in range(6):                                                     # 3 optimizer steps x 2 micro
        next(it)
    state = json.loads(json.dumps(first.state_dict()))                     # no pickle: plain JSON
    assert state["next_step"] == 3
    resumed = make(dl.UnpairedPreferenceDataLoader, data, **common)
    resumed.load_state_dict(state)
    rest = run(resumed)
    assert [comparable(b) for b in rest] == [comparable(b) for b in full[6:]]
    assert [b.step for b in rest] == [b.step for b in full[6:]]
    assert len(run(make(dl.UnpairedPreferenceDataLoader, data, **common))) == len(full)   # fresh: from 0
    other = make(dl.UnpairedPreferenceDataLoader, data, **{**common, "seed": 8})
    with pytest.raises(CheckpointError, match="seed=7 but this run has 8"):
        other.load_state_dict(state)


# ---------------------------------------------------------------- bad inputs


def test_bad_settings_raise_clear_errors(tiny_tokenizer):
    data = [pair_ex(k) for k in range(4)]
    with pytest.raises(ConfigError, match="batch_size 6 must be a positive multiple of .* 2 x 2 = 4"):
        make(dl.SFTDataLoader, data, tokenizer=tiny_tokenizer, batch_size=6, world_size=2,
             gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="unknown option\\(s\\) 'beta'; valid options: pair_margin, pair_mode"):
        make(dl.PairedPreferenceDataLoader, data, tokenizer=tiny_tokenizer, beta=0.1)
    with pytest.raises(ConfigError, match="max_prompt_length < max_length"):
        make(dl.SFTDataLoader, data, tokenizer=tiny_tokenizer, max_length=64, max_prompt_length=64)
    with pytest.raises(DataError, match="4 items is fewer than one global batch"):
        make(dl.SFTDataLoader, data, tokenizer=tiny_tokenizer, batch_size=8)
    with pytest.warns(UserWarning, match="microbatches of 1 item pair each prompt with its own response"):
        make(dl.UnpairedPreferenceDataLoader, data, tokenizer=tiny_tokenizer, batch_size=2, world_size=2)
    with pytest.raises(ConfigError, match="pair_mode 'random' is unknown"):
        make(dl.PairedPreferenceDataLoader, data, tokenizer=tiny_tokenizer, pair_mode="random")


def test_data_lacking_the_needed_kind_raises(tiny_tokenizer):
    plain = [Example(prompt=user(f"q{k}"), generations=[f"a{k}"], source=f"plain:{k}") for k in range(4)]
    with pytest.raises(DataError, match="UnpairedPreferenceDataLoader needs desirable labels, scores, judgments "
                                        "or pairs; dataset 'plain' \\(split train\\) has none"):
        make(dl.UnpairedPreferenceDataLoader, plain, name="plain", tokenizer=tiny_tokenizer)
    labels_only = [Example(prompt=user(f"q{k}"), generations=[f"a{k}"], desirable=[True], source=f"kto:{k}")
                   for k in range(4)]
    with pytest.raises(DataError, match="PairedPreferenceDataLoader needs preference pairs or scores; "
                                        "dataset 'kto'"):
        make(dl.PairedPreferenceDataLoader, labels_only, name="kto", tokenizer=tiny_tokenizer)
    with pytest.raises(DataError, match="RewardDataLoader needs K responses"):
        make(dl.RewardDataLoader, labels_only, name="kto", tokenizer=tiny_tokenizer)
    with pytest.raises(DataError, match="dataset 'empty' \\(split train\\) is empty"):
        make(dl.SFTDataLoader, [], name="empty", tokenizer=tiny_tokenizer)
    broken = [Example(prompt=user("q"), generations=["a", "b"], pairs=[(0, 5)], source="hh.jsonl:12")]
    with pytest.raises(DataError, match="hh.jsonl:12: pair \\(0, 5\\)"):
        make(dl.PairedPreferenceDataLoader, broken, tokenizer=tiny_tokenizer, batch_size=1)
    no_role = [Example(prompt=[{"content": "hi"}], generations=["a"], sft_index=0, source="x.json:3")]
    with pytest.raises(DataError, match="x.json:3: prompt turn 0"):
        make(dl.SFTDataLoader, no_role, tokenizer=tiny_tokenizer, batch_size=1)


# ---------------------------------------------------------------- data_summary


def test_summarize_counts_closed_form(tiny_tokenizer):
    long = " ".join(f"w{k}" for k in range(100))
    ds = Dataset("mix", [
        Example(prompt=user("first"), generations=["one", "two", long], scores=[1.0, 2.0, 3.0], source="m:0"),
        Example(prompt=user("second"), generations=["yes", "no"], pairs=[(0, 1)], source="m:1"),
        Example(prompt=user("third"), generations=["ok", "bad"], judgments=[None, "wrong"], source="m:2"),
    ])
    s = summarize(ds, tiny_tokenizer, max_length=48, max_prompt_length=16)
    assert (s["prompts"], s["generations"], s["pairs"], s["judged"], s["sequences"]) == (3, 7, 2, 1, 7)
    assert (s["desirable"], s["undesirable"]) == (3, 4)       # scores around midpoint 2: [F, F, T]; [T, F]; [T, F]
    assert s["k_distribution"] == {2: 1, 3: 1}
    prompt_lengths = sorted(len(prompt_ids(tiny_tokenizer, plain_prompt(q))) for q in ("first", "second", "third"))
    assert s["prompt_tokens"]["p50"] == prompt_lengths[1] and s["prompt_tokens"]["max"] == prompt_lengths[2]
    responses = ["one", "two", long, "yes", "no", "ok", "bad"]
    assert s["response_tokens"]["max"] == max(len(resp_ids(tiny_tokenizer, r)) for r in responses)
    assert s["truncated"] == 1                                 # only the 100-word reply exceeds 48 tokens


def test_data_summary_cli_on_real_files(shared_data, capsys):
    args = ["--datasets", "oasst", "--data_dir", str(shared_data), "--split", "test", "--max_length", "256",
            "--max_prompt_length", "128", "--json"]
    done = subprocess.run([sys.executable, "-m", "feedbackalign.data_summary", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout.strip().splitlines()[-1])
    assert s["dataset"] == "oasst" and s["prompts"] > 0 and s["pairs"] > 0 and s["generations"] >= 2 * s["prompts"]
    assert sum(s["k_distribution"].values()) > 0 and s["response_tokens"]["max"] > 0
    assert 0 <= s["truncated"] <= s["sequences"] == s["generations"]
    assert data_summary.main(["--datasets", "no_such_dataset", "--data_dir", str(shared_data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no_such_dataset" in err[0]
