"""Getters: upstream formats -> Examples. Hand-checked fixtures (tests/fixtures/<folder>/, upstream layouts),
every bad-data error, split determinism, and counts on the real samples in shared data."""

import gzip
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest

from feedbackalign import getters
from feedbackalign.feedback import Dataset, in_test_split
from feedbackalign.records import SkippedRecordsWarning
from feedbackalign.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def by_prompt(dataset):
    """Examples keyed by their last prompt turn (unique within each fixture)."""
    out = {ex.prompt[-1]["content"]: ex for ex in dataset}
    assert len(out) == len(dataset.examples)
    return out


def load(name, split="train", data_dir=FIXTURES, **options):
    """get_dataset plus the skip warnings it raised, as {message: count}."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = getters.get_dataset(name, split, str(data_dir) if data_dir else None, **options)
    skipped = {}
    for w in caught:
        if issubclass(w.category, SkippedRecordsWarning):
            skipped[str(w.message)] = int(re.search(r"skipped (\d+) ", str(w.message)).group(1))
    return ds, skipped


def both_splits(name, data_dir=FIXTURES, **options):
    train, _ = load(name, "train", data_dir, **options)
    test, _ = load(name, "test", data_dir, **options)
    return train, test


def write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fixture_rows(relative):
    path = FIXTURES / relative
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- HH


def test_hh_multi_turn_history_and_merged_pairs():
    ds, _ = load("hh")
    egg = by_prompt(ds)["For how long?"]
    assert egg.prompt == [user("How do I boil an egg?"), assistant("Put it in boiling water."), user("For how long?")]
    assert egg.generations == ["About nine minutes for a firm yolk.", "Forever.", "One second."]
    assert egg.pairs == [(0, 1), (0, 2)] and egg.sft_index == 0
    assert egg.dataset_name == "hh" and egg.source.endswith("helpful-base/train.jsonl.gz:1")


def test_hh_joins_consecutive_human_turns():
    ex = by_prompt(load("hh")[0])["Hi.\n\nAre you there?"]
    assert ex.prompt == [user("Hi.\n\nAre you there?")]
    assert ex.generations == ["Yes, I am here.", "No."]


def test_hh_oddities_skipped_with_one_counted_warning_per_rule():
    ds, skipped = load("hh")
    assert len(ds) == 3  # egg (2 records), hi, lock
    lines = sorted(re.search(r"(\w+-base)/train.jsonl.gz, line (\d+)", m).groups() for m in skipped)
    assert lines == [("harmless-base", "2"), ("helpful-base", "3"), ("helpful-base", "4"), ("helpful-base", "5")]
    assert sorted(skipped.values()) == [1, 1, 1, 1]
    assert any("identical" in m for m in skipped) and any("empty final" in m for m in skipped)
    assert any("does not parse" in m for m in skipped) and any("differ before the final turn" in m for m in skipped)


def test_hh_subsets_and_splits():
    helpful = by_prompt(load("hh_helpful")[0])
    assert set(helpful) == {"For how long?", "Hi.\n\nAre you there?"}
    assert all(ex.dataset_name == "hh_helpful" for ex in helpful.values())
    assert [ex.prompt for ex in load("hh", subsets="harmless-base")[0]] == [[user("How do I pick a lock?")]]
    harmless = load("hh_harmless")[0]
    assert [ex.generations for ex in harmless] == [["I can't help with breaking into places.", "Use a bobby pin."]]
    test = load("hh", "test")[0]  # only helpful-base ships a test file in the fixture
    assert [(ex.prompt, ex.generations) for ex in test] == [([user("What is 2+2?")], ["4.", "5."])]
    with pytest.raises(DataError, match=r"harmless-base/test\.jsonl\.gz.*not found"):
        getters.get_hh_harmless("test", str(FIXTURES))


@pytest.mark.parametrize("text, expected", [
    ("\n\nHuman: a\n\nAssistant: b", ([user("a")], "b")),
    ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:  d ", ([user("a"), assistant("b"), user("c")], "d")),
    ("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", None),  # history would end with the assistant
    ("\n\nAssistant: b", None),  # no human turn
    ("intro\n\nHuman: a\n\nAssistant: b", None),
    ("\n\nHuman: a", None),
])
def test_parse_hh_dialogue(text, expected):
    assert getters.parse_hh_dialogue(text) == expected


# ---------------------------------------------------------------- SHP


def test_shp_pairs_follow_labels_and_score_ratio_filter():
    steak = by_prompt(load("shp")[0])["How long should I rest a steak after cooking it?"]
    # record 1: A preferred (label 1); record 2: B preferred (label 0); record 3: ratio 7/5 < 2, dropped
    assert steak.generations == ["Five minutes.", "Don't bother resting it.", "Ten minutes under foil."]
    assert steak.pairs == [(0, 1), (0, 2)] and steak.sft_index == 0 and steak.scores is None
    unfiltered = by_prompt(load("shp", score_ratio_min=None)[0])["How long should I rest a steak after cooking it?"]
    assert unfiltered.generations[3] == "Cut it right away." and unfiltered.pairs[-1] == (0, 3)


def test_shp_pair_cap_is_reproducible_and_keeps_only_used_generations():
    def capped():
        return by_prompt(load("shp", max_pairs_per_prompt=1)[0])["How long should I rest a steak after cooking it?"]

    first, again = capped(), capped()
    assert len(first.pairs) == 1 and len(first.generations) == 2
    i, j = first.pairs[0]
    assert (first.generations[i], first.generations[j]) in {("Five minutes.", "Don't bother resting it."),
                                                            ("Five minutes.", "Ten minutes under foil.")}
    assert first.sft_index == i
    assert (again.generations, again.pairs) == (first.generations, first.pairs)


def test_shp_splits_and_domains():
    assert [ex.prompt for ex in load("shp", "test")[0]] == [[user("Can I freeze fresh basil?")]]
    assert [ex.prompt for ex in load("shp", domains=["askhr"])[0]] == [[user("How do I ask for a raise?")]]
    assert [ex.prompt for ex in load("shp", domains="askhr")[0]] == [[user("How do I ask for a raise?")]]
    with pytest.raises(DataError, match=r"shp.*validation\.json"):
        load("shp", "validation")


# ---------------------------------------------------------------- OASST


def test_oasst_flat_table_ranked_replies():
    ds = by_prompt(load("oasst")[0])
    assert set(ds) == {"What is a good name for a cat?", "Why is it popular?"}  # de filtered; 1 ranked reply left out
    cat = ds["What is a good name for a cat?"]
    assert cat.prompt == [user("What is a good name for a cat?")]
    assert cat.generations == ["Luna is a popular choice.", "Whiskers.", "Cat."]  # by rank; unranked/deleted out
    assert cat.scores == [0.0, -1.0, -2.0]
    assert cat.pairs == [(0, 1), (0, 2), (1, 2)] and cat.sft_index == 0
    deeper = ds["Why is it popular?"]
    assert deeper.prompt == [user("What is a good name for a cat?"), assistant("Luna is a popular choice."),
                             user("Why is it popular?")]
    assert deeper.generations == ["It means moon and sounds soft.", "No reason."] and deeper.pairs == [(0, 1)]


def test_oasst_language_option_and_validation_split():
    assert len(load("oasst", lang=None)[0]) == 3
    german = load("oasst", lang="de")[0]
    assert [ex.generations for ex in german] == [["Paris.", "Lyon."]]
    assert [ex.prompt for ex in load("oasst", "test")[0]] == [[user("Name a prime number.")]]
    assert [ex.prompt for ex in load("oasst", "validation")[0]] == [[user("Name a prime number.")]]


def _as_trees(rows):
    """The flat rows nested into the tree export format (replies inside their parent)."""
    nodes = {r["message_id"]: {k: v for k, v in r.items() if k not in ("message_tree_id", "tree_state")} | {"replies": []}
             for r in rows}
    trees = []
    for r in rows:
        if r["parent_id"] is None:
            del nodes[r["message_id"]]["parent_id"]
            trees.append({"message_tree_id": r["message_id"], "tree_state": "ready_for_export",
                          "prompt": nodes[r["message_id"]]})
        else:
            nodes[r["parent_id"]]["replies"].append(nodes[r["message_id"]])
    return trees


def test_oasst_tree_export_gives_the_same_examples_as_the_flat_table(tmp_path):
    rows = fixture_rows("oasst/train-00000-of-00001.jsonl") + fixture_rows("oasst/validation-00000-of-00001.jsonl")
    write_jsonl(tmp_path / "oasst" / "export.trees.jsonl", _as_trees(rows))
    flat = [ex for split in ("train", "test") for ex in load("oasst", split)[0]]
    tree = [ex for split in ("train", "test") for ex in load("oasst", split, tmp_path)[0]]
    view = lambda exs: sorted((json.dumps(e.prompt), e.generations, e.pairs, e.scores) for e in exs)  # noqa: E731
    assert view(tree) == view(flat) and len(flat) == 3


def test_oasst_tied_ranks_give_no_pair_between_them(tmp_path):
    replies = [{"message_id": f"r{n}", "text": text, "role": "assistant", "rank": rank, "lang": "en"}
               for n, (text, rank) in enumerate([("tie a", 1), ("best", 0), ("tie b", 1)])]
    tree = {"message_tree_id": "t", "prompt": {"message_id": "q", "text": "Question?", "role": "prompter",
                                               "lang": "en", "replies": replies}}
    write_jsonl(tmp_path / "oasst" / "trees.jsonl", [tree])
    [ex] = load("oasst", data_dir=tmp_path, test_fraction=0.0)[0].examples
    assert ex.generations == ["best", "tie a", "tie b"] and ex.scores == [0.0, -1.0, -1.0]
    assert ex.pairs == [(0, 1), (0, 2)]


def test_oasst_rows_loaded_by_datasets_parse_like_local_files(tmp_path):
    """hub_records runs datasets.load_dataset; its packaged 'json' builder works offline on the fixture."""
    data = str(FIXTURES / "oasst" / "train-00000-of-00001.jsonl")
    rows = getters.hub_records("json", "train", data_files=data, cache_dir=str(tmp_path))
    via_datasets = list(getters.oasst_examples(getters.oasst_messages(rows), "en", getters.Skips("oasst")))
    local = load("oasst")[0].examples
    assert [(e.prompt, e.generations, e.pairs, e.scores) for e in via_datasets] == \
        [(e.prompt, e.generations, e.pairs, e.scores) for e in local]


# ---------------------------------------------------------------- UltraFeedback


def test_ultrafeedback_overall_scores():
    train, test = both_splits("ultrafeedback")
    examples = by_prompt(Dataset("u", train.examples + test.examples))
    haiku = examples["Write a haiku about autumn."]
    assert haiku.generations[1] == "Autumn is a season." and len(haiku.generations) == 4
    assert haiku.scores == [7.5, 4.0, 9.0, 2.0] and haiku.sft_index == 2 and haiku.pairs == []
    assert examples["Translate 'cat' to French."].generations == ["Chat."]  # the empty response is skipped
    assert examples["Name a color."].scores == [6.0, 1.0]


def test_ultrafeedback_fine_grained_mean_and_skips():
    ds, skipped = load("ultrafeedback", score="fine_grained", test_fraction=0.0)
    ex = by_prompt(ds)
    haiku = ex["Write a haiku about autumn."]
    assert haiku.scores == pytest.approx([5.0, 2.5, 14 / 3, 1.0]) and haiku.sft_index == 0
    assert ex["Name a color."].generations == ["Seven."] and ex["Name a color."].scores == [1.0]  # all N/A: out
    assert sorted(skipped.values()) == [1, 1]
    assert any("empty response" in m and "line 2" in m for m in skipped)
    assert any("no numeric fine-grained rating" in m and "line 3" in m for m in skipped)
    with pytest.raises(DataError, match="unknown score 'mean'"):
        load("ultrafeedback", score="mean")


def test_ultrafeedback_rows_loaded_by_datasets_parse_like_local_files(tmp_path):
    data = str(FIXTURES / "ultrafeedback" / "sample.jsonl")
    rows = getters.hub_records("json", "train", data_files=data, cache_dir=str(tmp_path))
    skips = getters.Skips("ultrafeedback")
    via_datasets = [getters.ultrafeedback_example(rec, "fine_grained", skips) for rec in rows]
    local = load("ultrafeedback", score="fine_grained", test_fraction=0.0)[0].examples
    assert [(e.prompt, e.generations, e.scores) for e in via_datasets] == \
        [(e.prompt, e.generations, e.scores) for e in local]


# ---------------------------------------------------------------- ultrafeedback_binarized


def test_ultrabin_pairs_scores_and_merge():
    ds, skipped = load("ultrabin")
    [water] = ds.examples
    assert water.prompt == [user("What is the boiling point of water?")]
    assert water.generations == ["100 °C at sea level.", "50 °C.", "It depends on nothing."]
    assert water.pairs == [(0, 1), (0, 2)] and water.scores == [9.0, 3.0, 2.0] and water.sft_index == 0
    assert list(skipped.values()) == [1] and "identical" in next(iter(skipped))


def test_ultrabin_test_split_keeps_multi_turn_prompt():
    [fact] = load("ultrabin", "test")[0].examples
    assert fact.prompt == [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a fact.")]
    assert fact.generations == ["Honey never spoils.", "I don't know any."] and fact.scores == [8.5, 4.0]
    assert load("ultrabin", "test_prefs")[0].examples[0].generations == fact.generations
    with pytest.raises(DataError, match="unknown split 'validation'.*train_prefs"):
        load("ultrabin", "validation")


def test_ultrabin_parquet_matches_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = fixture_rows("ultrafeedback_binarized/data/train_prefs-00000-of-00001.jsonl")
    target = tmp_path / "ultrafeedback_binarized" / "data" / "train_prefs-00000-of-00001.parquet"
    target.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), target)
    from_parquet, from_jsonl = load("ultrabin", data_dir=tmp_path)[0], load("ultrabin")[0]
    assert [(e.prompt, e.generations, e.pairs, e.scores) for e in from_parquet] == \
        [(e.prompt, e.generations, e.pairs, e.scores) for e in from_jsonl]
    assert from_parquet.examples[0].source.endswith(".parquet:1")


# ---------------------------------------------------------------- CUT and Shepherd


def test_cut_judgments_and_desirable():
    ex = by_prompt(load("cut", test_fraction=0.0)[0])
    wrong = ex["Calculate 2 + 2."]
    assert wrong.generations == ["2 + 2 = 5."] and wrong.judgments == ["The sum is wrong: 2 + 2 = 4."]
    assert wrong.desirable == [False] and wrong.sft_index is None
    fine = ex["Summarize the text.\nThe sky is blue."]  # instruction + "\n" + input
    assert fine.judgments == [None] and fine.desirable == [True] and fine.sft_index == 0
    assert ex["Name a fruit."].judgments == [None] and ex["Name a fruit."].desirable == [True]  # score 8 >= 7
    assert ex["Name a planet."].judgments == ["The Sun is a star, not a planet."]  # score 2 keeps the judgment
    assert wrong.source.endswith("sample.json:1")


def test_shepherd_critiques_and_repeat_skipped():
    ds, skipped = load("shepherd", test_fraction=0.0)
    assert len(ds) == 2
    apples = by_prompt(ds)["Tom has 3 bags with 4 apples each. How many apples does he have?"]
    assert apples.generations == ["3 + 4 = 7. The answer is 7.\n\n"]
    assert apples.judgments == ["The bags must be multiplied, not added: 3 * 4 = 12 apples."]  # the first is kept
    assert apples.desirable == [False] and apples.sft_index is None
    assert list(skipped.values()) == [1] and "sample.jsonl:3" in next(iter(skipped))


# ---------------------------------------------------------------- generic schema


def test_generic_schema_expresses_every_kind():
    ds = by_prompt(load("jsonl:" + str(FIXTURES / "generic" / "all_kinds.jsonl"), test_fraction=0.0)[0])
    color = ds["Name a primary color."]
    assert color.generations == ["Red.", "Purple.", "Banana."] and color.pairs == [(0, 1)]
    assert color.desirable == [None, None, False] and color.sft_index == 0
    greet = ds["Rate these greetings."]
    assert greet.prompt[0] == {"role": "system", "content": "Answer briefly."}
    assert greet.scores == [0.9, 0.5, 0.1] and greet.sft_index is None
    math_ = ds["What is 3 * 4?"]
    assert math_.judgments == ["3 * 4 is 12, not 7.", None] and math_.sft_index == 1
    best = ds["Pick the best."]
    assert best.pairs == [(2, 0), (2, 1)] and best.sft_index == 2
    assert best.dataset_name == "jsonl:" + str(FIXTURES / "generic" / "all_kinds.jsonl")


def test_generic_json_array_and_split_placeholder(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"prompt": "p1", "response": "r1"}]))
    (tmp_path / "test.json").write_text(json.dumps([{"prompt": "p2", "response": "r2"}]))
    spec = "json:" + str(tmp_path / "{split}.json")
    assert [ex.prompt_text() for ex in load(spec, "train")[0]] == ["p1"]
    assert [ex.prompt_text() for ex in load(spec, "test")[0]] == ["p2"]
    assert load(spec, "train")[0].examples[0].sft_index == 0
    # a bare path ending in .jsonl is a user file too; relative paths are looked up under data_dir
    write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert load("mine.jsonl", data_dir=tmp_path, test_fraction=0.0)[0].examples[0].pairs == [(0, 1)]


BAD_RECORDS = [
    # (lines of the file, line number and field the error must name, words it must contain)
    (['{"prompt": "p", "response": "r"}\n', '{"prompt": "p", "response": \n'], "line 2", "malformed JSON"),
    ([{"response": "r"}], "line 1", "'prompt'"),
    ([{"prompt": "p", "responses": "r"}], "line 1", "'responses' should be a list"),
    ([{"prompt": " ", "response": "r"}], "line 1", "'prompt' is empty"),
    ([{"prompt": [{"role": "user", "content": ""}], "response": "r"}], "line 1", "'prompt[0].content' is empty"),
    ([{"prompt": [{"role": "bot", "content": "x"}], "response": "r"}], "line 1", "'prompt[0].role'"),
    ([{"prompt": "p", "responses": ["a", ""]}], "line 1", "'responses[1]' is empty"),
    ([{"prompt": "p"}], "line 1", "'responses' is missing"),
    ([{"prompt": "p", "response": "a", "chosen": "b", "rejected": "c"}], "line 1", "'responses' clashes"),
    ([{"prompt": "p", "response": "r"}, {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]}], "line 2",
     "'scores' has 2 entries but there are 3 responses"),
    (['{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}\n'], "line 1", "'scores[1]' is nan"),
    (['{"prompt": "p", "response": "a", "score": Infinity}\n'], "line 1", "'score' is inf"),
    ([{"prompt": "p", "responses": ["a", "b"], "scores": [1, "2"]}], "line 1", "'scores[1]' should be a number"),
    ([{"prompt": "p", "responses": ["a", "b"], "pairs": [[0, 2]]}], "line 1", "'pairs[0]'"),
    ([{"prompt": "p", "responses": ["a", "b"], "desirable": ["yes", None]}], "line 1", "'desirable[0]'"),
    ([{"prompt": "p", "responses": ["a", "b"], "judgments": ["", None]}], "line 1", "'judgments[0]' is an empty"),
    ([{"prompt": "p", "responses": ["a", "b"], "judgments": ["x"]}], "line 1", "'judgments' has 1 entries"),
    ([{"prompt": "p", "responses": ["a", "b"], "sft_index": 2}], "line 1", "'sft_index' is 2"),
    ([{"prompt": "p", "responses": ["a", "b"], "score": 1}], "line 1", "'score' is for a single response"),
    (['["not", "an", "object"]\n'], "line 1", "expected a JSON object"),
]


@pytest.mark.parametrize("lines, place, words", BAD_RECORDS)
def test_generic_bad_data_names_file_line_and_field(tmp_path, lines, place, words):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        getters.get_dataset(f"jsonl:{path}", "train", test_fraction=0.0)
    message = str(err.value)
    assert str(path) in message and place in message and words in message


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: not valid UTF-8")):
        getters.get_dataset(f"jsonl:{path}", "train", test_fraction=0.0)


def test_json_array_errors_name_the_line_or_record(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "p", "response": "r"},\n  {"prompt": "p" "response": "r"}\n]')
    with pytest.raises(DataError, match=re.escape(f"{broken}, line 3: malformed JSON")):
        getters.get_dataset(f"json:{broken}", "train")
    cut = tmp_path / "cut_judgments" / "x.json"
    cut.parent.mkdir()
    cut.write_text(json.dumps([{"id": 1, "instruction": "i", "input": "", "output": "o", "judgment": None},
                               {"id": 2, "instruction": "i2", "input": "", "output": "o"}], indent=2))
    with pytest.raises(DataError, match=re.escape(f"{cut}, record 2: field 'judgment' is missing")):
        getters.get_cut("train", str(tmp_path))


# ---------------------------------------------------------------- upstream-format bad data


def test_upstream_bad_fields_name_file_record_and_field(tmp_path):
    write_jsonl(tmp_path / "hh_rlhf" / "helpful-base" / "train.jsonl.gz",
                [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": 3}], gz=True)
    with pytest.raises(DataError, match=r"train\.jsonl\.gz, line 1: field 'rejected' should be a string"):
        getters.get_hh("train", str(tmp_path))
    steak = fixture_rows("shp/askculinary/train.json")[0]
    write_jsonl(tmp_path / "shp" / "askhr" / "train.json", [steak, dict(steak, labels=2)])
    with pytest.raises(DataError, match=r"askhr/train\.json, line 2: field 'labels' is 2"):
        getters.get_shp("train", str(tmp_path))
    tree = {"message_tree_id": "t", "prompt": {"message_id": "a", "text": "q", "role": "prompter",
                                               "replies": [{"message_id": "b", "text": "x", "role": "assistant",
                                                            "rank": 0.5}]}}
    write_jsonl(tmp_path / "oasst" / "trees.jsonl", [tree])
    with pytest.raises(DataError, match=r"trees\.jsonl, line 1: field 'prompt\.replies\[0\]\.rank' is 0\.5"):
        getters.get_oasst("train", str(tmp_path))
    uf = fixture_rows("ultrafeedback/sample.jsonl")[0]
    uf["completions"][1]["overall_score"] = math.nan
    (tmp_path / "ultrafeedback").mkdir()
    (tmp_path / "ultrafeedback" / "uf.jsonl").write_text(json.dumps(uf) + "\n")
    with pytest.raises(DataError, match=r"uf\.jsonl, line 1: field 'completions\[1\]\.overall_score' is nan"):
        getters.get_ultrafeedback("train", str(tmp_path))
    ub = fixture_rows("ultrafeedback_binarized/data/test_prefs-00000-of-00001.jsonl")[0]
    del ub["score_rejected"]
    write_jsonl(tmp_path / "ultrafeedback_binarized" / "data" / "test_prefs-0.jsonl", [ub])
    with pytest.raises(DataError, match=r"test_prefs-0\.jsonl, line 1: field 'score_rejected' is missing"):
        getters.get_ultrabin("test", str(tmp_path))
    write_jsonl(tmp_path / "shepherd" / "s.jsonl", [{"id": 0, "question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"s\.jsonl, line 1: field 'feedback' is missing"):
        getters.get_shepherd("train", str(tmp_path))


def test_damaged_gzip_is_one_clear_error(tmp_path):
    path = tmp_path / "hh_rlhf" / "helpful-base" / "train.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(b'{"chosen": "x", "rejected": "y"}\n' * 50)[:40])
    with pytest.raises(DataError, match=re.escape(str(path))):
        getters.get_hh("train", str(tmp_path))


def test_missing_folder_file_name_and_option(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "shp")) + ".*check data_dir and the folder"):
        getters.get_dataset("shp", "train", str(tmp_path))
    with pytest.raises(DataError, match=r"nowhere\.jsonl: no such file"):
        getters.get_dataset("jsonl:nowhere.jsonl", "train")
    with pytest.raises(DataError, match=r"unknown dataset 'hhh': valid names are .*cut.*hh.*shp"):
        getters.get_dataset("hhh", "train")
    with pytest.raises(DataError, match=r"unknown option\(s\) ratio: valid options are score_ratio_min"):
        getters.get_dataset("shp", "train", str(FIXTURES), ratio=2)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        getters.get_dataset("hh", "dev", str(FIXTURES))
    with pytest.raises(DataError, match="cut has no Hugging Face hub copy: set data_dir"):
        getters.get_dataset("cut", "train")


def test_hub_path_offline_is_one_clear_error():
    with pytest.raises(DataError, match=r"could not load Anthropic/hh-rlhf .*pass data_dir"):
        getters.get_hh("test")


# ---------------------------------------------------------------- registry


def test_registry_covers_every_folder_and_the_built_in_task():
    assert set(getters.DATA_FOLDERS) <= set(getters.GETTERS)
    assert getters.get_dataset("wordsort", "train", n_prompts=4).name == "wordsort"
    with pytest.raises(DataError, match="unknown dataset 'nope'.*wordsort"):
        getters.get_dataset("nope", "train")


# ---------------------------------------------------------------- split determinism


@pytest.mark.parametrize("name", ["ultrafeedback", "cut", "jsonl:" + str(FIXTURES / "generic" / "all_kinds.jsonl")])
def test_hash_split_is_deterministic_and_disjoint(name):
    train, test = both_splits(name, test_fraction=0.5)
    again, _ = load(name, "train", test_fraction=0.5)
    keys = lambda ds: [ex.prompt_key() for ex in ds]  # noqa: E731
    assert keys(again) == keys(train)
    assert not set(keys(train)) & set(keys(test))
    everything, _ = load(name, "train", test_fraction=0.0)
    assert sorted(keys(train) + keys(test)) == sorted(keys(everything))
    assert all(in_test_split(ex, 0.5) for ex in test) and not any(in_test_split(ex, 0.5) for ex in train)


# ---------------------------------------------------------------- real samples (shared data)


def _raw_lines(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name, subset, records", [("hh_harmless", "harmless-base", 2312),
                                                   ("hh_helpful", "helpful-base", 2354)])
def test_hh_real_counts(shared_data, name, subset, records):
    raw = _raw_lines(shared_data / "hh_rlhf" / subset / "test.jsonl.gz")
    assert len(raw) == records  # the count the shared README states
    ds, skipped = load(name, "test", shared_data)
    pairs = sum(len(ex.pairs) for ex in ds)
    assert pairs + sum(skipped.values()) == records  # every record is a pair or a counted skip
    assert 0 < sum(skipped.values()) < records * 0.01
    identical = [m for m in skipped if "identical" in m]
    assert sum(skipped[m] for m in identical) == sum(r["chosen"] == r["rejected"] for r in raw)
    assert all(ex.prompt[0]["role"] == "user" and ex.prompt[-1]["role"] == "user" for ex in ds)


def test_hh_real_both_subsets(shared_data):
    ds, skipped = load("hh", "test", shared_data)
    assert sum(len(ex.pairs) for ex in ds) + sum(skipped.values()) == 2312 + 2354
    assert len(skipped) <= 4  # one warning per rule, not per record


def test_oasst_real_tree_counts(shared_data):
    trees = [json.loads(line) for line in open(shared_data / "oasst" / "en_100_tree.jsonl", encoding="utf-8")]
    groups = []

    def walk(msg):
        ranked = [r for r in msg.get("replies", []) if r["role"] == "assistant" and r.get("rank") is not None]
        if msg["role"] == "prompter" and len(ranked) >= 2:
            groups.append((msg["text"], sorted(ranked, key=lambda r: r["rank"])))
        for reply in msg.get("replies", []):
            walk(reply)

    for tree in trees:
        walk(tree["prompt"])
    train, test = both_splits("oasst", shared_data)
    examples = train.examples + test.examples
    assert sum(len(ex.generations) for ex in examples) == 641 == sum(len(g) for _, g in groups)
    assert len(examples) == len(groups)
    assert sum(len(ex.pairs) for ex in examples) == sum(len(g) * (len(g) - 1) // 2 for _, g in groups)
    assert 0 < len(test) < len(train)
    root_text, ranked = groups[0]  # the first tree's root prompt, checked against the raw file
    first = next(ex for ex in examples if ex.prompt == [user(root_text)])
    assert first.generations == [r["text"] for r in ranked]
    assert first.scores == [-float(r["rank"]) for r in ranked]
    assert all(ex.scores == sorted(ex.scores, reverse=True) and ex.sft_index == 0 for ex in examples)


def test_cut_real_counts_and_split(shared_data):
    train, test = both_splits("cut", shared_data)
    examples = train.examples + test.examples
    assert len(examples) == 2000
    judged = [ex for ex in examples if ex.judgments[0] is not None]
    assert len(judged) == 287 + 231
    assert all(ex.desirable == [False] and ex.sft_index is None for ex in judged)
    assert 0.02 * 2000 < len(test) < 0.10 * 2000
    again, _ = load("cut", "test", shared_data)
    assert [ex.prompt_key() for ex in again] == [ex.prompt_key() for ex in test]
    assert not {ex.prompt_key() for ex in train} & {ex.prompt_key() for ex in test}


def test_shepherd_real_counts(shared_data):
    (train, skipped), (test, _) = load("shepherd", "train", shared_data), load("shepherd", "test", shared_data)
    lines = (shared_data / "shepherd" / "human_data_for_model.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1317
    repeats = sum(n - 1 for n in Counter((json.loads(line)["question"], json.loads(line)["answer"])
                                         for line in lines).values())
    assert len(train) + len(test) == 1317 - repeats and sum(skipped.values()) == repeats
    assert all(ex.desirable == [False] and ex.judgments[0] for ex in train.examples + test.examples)
