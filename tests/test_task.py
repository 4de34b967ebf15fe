"""The built-in wordsort task: the true reward's formula by hand, the judge's critiques, the generated data."""

import json

import pytest

from feedbackalign import task
from feedbackalign.feedback import desirable_of, pairs_of
from feedbackalign.errors import DataError
from feedbackalign.task import get_wordsort, judge, parse_prompt, response_words, score_samples, true_reward

P = "Sort these words alphabetically: pen fig air sun"  # sorted: air fig pen sun, n = 4, 6 pairs


@pytest.fixture(scope="module")
def train():
    return get_wordsort("train")


@pytest.fixture(scope="module")
def test_split():
    return get_wordsort("test")


# ---------------------------------------------------------------- the reward, by hand: max(0, 5C + 5O - X)


@pytest.mark.parametrize("response, expected", [
    ("air fig pen sun", 10.0),                       # C = 1, O = 6/6, X = 0
    ("air pen fig sun", 5 + 5 * 5 / 6),              # one adjacent swap: 5 of 6 pairs in order
    ("air fig sun", 5 * 3 / 4 + 5 * 3 / 6),          # 'pen' missing: 3 found, their 3 pairs in order
    ("air fig", 5 * 2 / 4 + 5 * 1 / 6),              # two missing
    ("air fig lamp pen sun", 10 - 1),                # one word not in the list
    ("air fig fig pen sun", 10 - 1),                 # a repeated word
    ("sun pen fig air", 5 + 0),                      # reversed: no pair in order
    ("fig sun air pen", 5 + 5 * 3 / 6),              # in order: fig<sun, fig<pen, air<pen
    ("Sure! Here they are: air fig pen sun", 10 - 4),  # chatter: 4 extra words
    ("", 0.0),
    ("  ...  ", 0.0),
    ("no " * 20, 0.0),                               # 5*0 + 5*0 - 20, floored at 0
    ("Air, Fig, Pen, Sun.", 10.0),                   # case and punctuation are ignored
    ("AIR\nFIG\nPEN\nSUN", 10.0),
])
def test_true_reward_hand_worked(response, expected):
    assert true_reward(P, response) == pytest.approx(expected)


def test_true_reward_prompt_case_punctuation_and_duplicates():
    assert parse_prompt("Sort these words alphabetically: Pen, fig, AIR, sun.") == ["pen", "fig", "air", "sun"]
    assert true_reward("Sort these words alphabetically: Pen, fig, AIR, sun.", "air fig pen sun") == 10.0
    # a repeated prompt word counts once: P = {air, fig}, n = 2, one pair
    assert true_reward("Sort: fig fig air", "air fig") == 10.0
    assert true_reward("Sort: fig fig air", "fig air") == pytest.approx(5 + 0)
    # n = 1: O = C
    assert true_reward("Sort: fig", "fig") == 10.0
    assert true_reward("Sort: fig", "fig tree") == 9.0


def test_ten_only_for_the_perfect_answer(train):
    for ex in train.examples[:500]:
        target = sorted(parse_prompt(ex.prompt_text()))
        for g, s in zip(ex.generations, ex.scores):
            assert 0.0 <= s <= 10.0
            assert (s == 10.0) == (response_words(g) == target), (ex.source, g, s)


# ---------------------------------------------------------------- parsing the prompt back from chat formatting


@pytest.mark.parametrize("prompt", [
    "<|user|>\nSort these words alphabetically: pen fig air sun\n<|assistant|>\n",
    "<|user|>Sort these words alphabetically: pen fig air sun<|assistant|>",
    "\n\nHuman: Sort these words alphabetically: pen fig air sun\n\nAssistant:",
    "Human: Sort these words alphabetically: pen fig air sun Assistant:",
    "<|system|>\nYou sort things.\n<|user|>\nSort: pen fig air sun\n<|assistant|>\n",
    "sort the following: pen fig air sun",
])
def test_prompt_parsed_from_chat_formatting(prompt):
    assert parse_prompt(prompt) == ["pen", "fig", "air", "sun"]
    assert true_reward(prompt, "air fig pen sun") == 10.0
    assert true_reward(prompt, "air fig sun") == pytest.approx(5 * 3 / 4 + 5 * 3 / 6)


@pytest.mark.parametrize("prompt", ["Please order these: pen fig", "Sort these words alphabetically:", "",
                                    "<|user|>\nSort: <|assistant|>\n"])
def test_bad_prompt_is_one_clear_error(prompt):
    with pytest.raises(DataError, match="Sort"):
        true_reward(prompt, "fig pen")


# ---------------------------------------------------------------- the judge


@pytest.mark.parametrize("response, expected", [
    ("air fig pen sun", None),
    ("Air, fig, pen, sun.", None),
    ("air fig sun", "The word 'pen' is missing."),
    ("air sun", "The words 'fig' and 'pen' are missing."),
    ("air fig lamp pen sun", "The word 'lamp' was not in the list."),
    ("Here you go: air fig pen sun", "The words 'here', 'you' and 'go' were not in the list."),
    ("air fig fig pen sun", "The word 'fig' is repeated."),
    ("air pen fig sun", "'fig' should come before 'pen'."),
    ("sun pen fig air", "The words are in reverse alphabetical order."),
    ("air sun fig", "The word 'pen' is missing. 'fig' should come before 'sun'."),
    ("fig air sun pen", "'air' should come before 'fig'. 'pen' should come before 'sun'."),
    ("", "The response is empty; it should list the words in alphabetical order."),
])
def test_judge_names_the_specific_fault(response, expected):
    assert judge(P, response) == expected


def test_judgment_is_none_exactly_for_reward_ten(test_split):
    for ex in test_split:
        for g, s, j in zip(ex.generations, ex.scores, ex.judgments):
            assert (j is None) == (s == 10.0)
            assert j == judge(ex.prompt_text(), g)


# ---------------------------------------------------------------- the generated dataset


def test_examples_shape_and_feedback(test_split):
    assert test_split.name == "wordsort" and len(test_split) == 200
    for i, ex in enumerate(test_split):
        assert ex.prompt == [{"role": "user", "content": ex.prompt_text()}]
        assert ex.prompt_text().startswith(task.INSTRUCTION)
        assert ex.dataset_name == "wordsort" and ex.source == f"wordsort:test:{i}"
        assert ex.scores == [true_reward(ex.prompt_text(), g) for g in ex.generations]
        assert ex.pairs == [] and ex.desirable is None
        n = len(parse_prompt(ex.prompt_text()))
        assert task.MIN_WORDS <= n <= task.MAX_WORDS
        assert parse_prompt(ex.prompt_text()) != sorted(parse_prompt(ex.prompt_text())), "prompt already sorted"
        # the converters derive the other kinds: only the perfect answer is desirable; best vs worst
        perfect = ex.scores.index(10.0)
        assert desirable_of(ex) == [s == 10.0 for s in ex.scores]
        assert pairs_of(ex) == [(perfect, ex.scores.index(min(ex.scores)))]


@pytest.mark.parametrize("k", [4, 6])
def test_k_generations_with_graded_distinct_scores(k):
    data = get_wordsort("test", n_prompts=150, k=k)
    for ex in data:
        assert len(ex.generations) == k and len(set(ex.generations)) == k
        assert len(set(ex.scores)) == k, ex.scores
        assert max(ex.scores) == 10.0 and min(ex.scores) < 9.0


def test_determinism():
    a = get_wordsort("train", n_prompts=60, seed=3)
    assert a.examples == get_wordsort("train", n_prompts=60, seed=3).examples
    other = get_wordsort("train", n_prompts=60, seed=4)
    assert [e.prompt for e in a] != [e.prompt for e in other]
    # a smaller size is a prefix of a larger one
    assert get_wordsort("train", n_prompts=20, seed=3).examples == a.examples[:20]


def test_train_and_test_word_sets_disjoint(train, test_split):
    def word_sets(data):
        return {frozenset(parse_prompt(e.prompt_text())) for e in data}

    train_sets, test_sets = word_sets(train), word_sets(test_split)
    assert len(train_sets) == len(train) == 4000 and len(test_sets) == 200  # distinct within a split
    assert not train_sets & test_sets
    assert not word_sets(get_wordsort("test", n_prompts=200, seed=7)) & train_sets  # whatever the seed


def test_sft_target_perfect_fraction(train):
    perfect = 0
    for ex in train:
        target = ex.scores[ex.sft_index]
        perfect += target == 10.0
        assert target == 10.0 or target >= 8.0, "an imperfect SFT target must be a near miss"
    assert perfect / len(train) == pytest.approx(task.SFT_PERFECT_FRACTION, abs=0.03)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="validation"), "no split 'validation'"),
    (dict(split="train", n_prompts=0), "n_prompts"),
    (dict(split="train", n_prompts=5, k=1), "k=1"),
    (dict(split="train", n_prompts=5, k=7), "k=7"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(DataError, match=match):
        get_wordsort(**kwargs)


def test_fits_the_tiny_model(tiny_tokenizer, test_split):
    """Every vocabulary word is one token after a space; a whole formatted example stays within 40 tokens."""
    for w in task.VOCAB:
        assert len(tiny_tokenizer.encode(" " + w, add_special_tokens=False)) == 1, w
    for ex in test_split:
        for g in ex.generations:
            text = f"<|user|>\n{ex.prompt_text()}\n<|assistant|>\n{g}<|endoftext|>"
            assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) <= 40


# ---------------------------------------------------------------- eval sample files


def test_score_samples_from_a_json_file(tmp_path):
    samples = [
        {"prompt": "<|user|>\n" + P + "\n<|assistant|>\n", "policy": "air fig pen sun", "reference": "x"},
        {"prompt": [{"role": "user", "content": P}], "policy": "sun pen fig air"},
        {"prompt": P, "policy": ""},
    ]
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(samples))
    assert score_samples(json.loads(path.read_text())) == [10.0, 5.0, 0.0]
    renamed = [{"q": s["prompt"], "out": s["policy"]} for s in samples]
    assert score_samples(renamed, prompt_key="q", output_key="out") == [10.0, 5.0, 0.0]


def test_score_samples_errors_name_the_sample_and_key():
    with pytest.raises(DataError, match="sample 1 has no key 'policy'"):
        score_samples([{"prompt": P, "policy": "air"}, {"prompt": P, "output": "air"}])
    with pytest.raises(DataError, match="sample 0: .*no 'Sort"):
        score_samples([{"prompt": "hello", "policy": "air"}])


def test_score_command_gives_the_true_reward_of_a_samples_file(tmp_path, capsys):
    """`python -m feedbackalign.task score FILE`: the mean true reward of eval.py's samples, its 95% interval
    (stats.mean_ci) and the perfect share; a missing file is one line and exit 2."""
    prompt = "<|user|>\nSort these words alphabetically: pen fig air\n<|assistant|>\n"
    answers = ["air fig pen", "air pen fig", "pen fig air", "air fig pen"]
    samples = [{"id": str(i), "prompt": prompt, "policy": a} for i, a in enumerate(answers)]
    (tmp_path / "mine.json").write_text(json.dumps({"samples": samples}))
    (tmp_path / "list.json").write_text(json.dumps(samples[:1]))
    assert task.main(["score", str(tmp_path / "mine.json"), str(tmp_path / "list.json")]) == 0
    rewards = [true_reward(prompt, a) for a in answers]
    mean = sum(rewards) / 4
    half = 1.959963984540054 * (sum((r - mean) ** 2 for r in rewards) / 3) ** 0.5 / 2
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{tmp_path / 'mine.json'}: 4 samples, true reward {mean:.2f} (95% CI {mean - half:.2f}-"
                   f"{mean + half:.2f}), perfect 50%",
                   f"{tmp_path / 'list.json'}: 1 sample, true reward 10.00 (95% CI 10.00-10.00), perfect 100%"]
    with pytest.raises(SystemExit) as stopped:
        task.main(["score", str(tmp_path / "nope.json")])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and err.splitlines() == [err] and "nope.json does not exist" in err
