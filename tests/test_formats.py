"""TRL's dataset shapes through the generic reader (`jsonl:<file>`) and `hf:<repo>[:<config>]`, offline: each shape
loads as the record of this project's own schema that says the same thing, the hub path reads a repository's
configs and splits through `datasets.load_dataset`, and every malformed record fails in one line naming its field."""

from __future__ import annotations

import json

import pytest

from feedbackalign import builders, getters
from feedbackalign.errors import DataError
from helpers import REPO, make_config

TRL = REPO / "tests" / "fixtures" / "trl"
SKY, SUN = "What color is the sky?", "What is the sun?"
BRIEF = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": SUN}]

# TRL's shape (fixture file = hub config) -> the same data in this project's generic schema
OWN_SCHEMA = {
    "standard_preference": [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                            {"prompt": "The sun is", "chosen": " a star.", "rejected": " a planet."}],
    "conversational_preference": [{"prompt": SKY, "chosen": "It is blue.", "rejected": "It is green."},
                                  {"prompt": BRIEF, "chosen": "A star.", "rejected": "A planet."}],
    "implicit_prompt_preference": [{"prompt": SKY, "chosen": "It is blue.", "rejected": "It is green."},
                                   {"prompt": BRIEF, "chosen": "A star.", "rejected": "A planet."}],
    "standard_unpaired": [{"prompt": "The sky is", "responses": [" blue.", " green."], "desirable": [True, False],
                           "sft_index": 0},
                          {"prompt": "The sun is", "response": " a planet.", "label": False}],
    "conversational_unpaired": [{"prompt": SKY, "responses": ["It is blue.", "It is green."],
                                 "desirable": [True, False], "sft_index": 0}],
    "standard_prompt_completion": [{"prompt": "The sky is", "response": " blue."},
                                   {"prompt": "The sun is", "response": " a star."}],
    "conversational_prompt_completion": [{"prompt": SKY, "response": "It is blue."},
                                         {"prompt": BRIEF, "response": "A star."}],
    "conversational_language_modeling": [
        {"prompt": SKY, "response": "It is blue."},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": SUN}], "response": "A star."}],
}


def content(dataset) -> list[tuple]:
    """What an Example says, without where it came from."""
    return [(ex.prompt, ex.generations, ex.pairs, ex.scores, ex.desirable, ex.judgments, ex.sft_index)
            for ex in dataset.examples]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("shape", sorted(OWN_SCHEMA))
def test_each_trl_shape_reads_as_its_own_schema_equivalent_from_a_file_and_from_the_hub(shape, tmp_path):
    own = getters.get_dataset(f"jsonl:{write_jsonl(tmp_path / 'own.jsonl', OWN_SCHEMA[shape])}", "train",
                              test_fraction=0)
    from_file = getters.get_dataset(f"jsonl:{TRL / shape}.jsonl", "train", test_fraction=0)
    from_hub = getters.get_dataset(f"hf:{TRL}:{shape}", "train", test_fraction=0)
    assert content(from_file) == content(own) == content(from_hub)
    assert from_hub.name == f"hf:{TRL}:{shape}"
    assert {ex.source.rsplit(":", 1)[0] for ex in from_hub.examples} == {f"{TRL}[train]"}


def test_hub_splits_configs_and_data_dir(tmp_path):
    """A repository's own test split is `test`; without one, `test` is the hash slice of train; no config is
    the repository's default one; data_dir=<dir> reads <dir>/<repo> as the hub would serve it."""
    test = getters.get_dataset(f"hf:{TRL}:conversational_preference", "test")
    assert content(test) == [([{"role": "user", "content": "What color is grass?"}], ["Green.", "Blue."], [(0, 1)],
                              None, None, None, 0)]
    train, held_out = (getters.get_dataset(f"hf:{TRL}:standard_unpaired", s, test_fraction=0.5)
                       for s in ("train", "test"))
    assert sorted(map(str, content(train) + content(held_out))) == sorted(
        map(str, content(getters.get_dataset(f"hf:{TRL}:standard_unpaired", "train", test_fraction=0))))
    default = getters.get_dataset(f"hf:{TRL}", "train", test_fraction=0)
    assert content(default) == content(getters.get_dataset(f"hf:{TRL}:standard_preference", "train", test_fraction=0))
    local = getters.get_dataset("hf:trl:standard_preference", "train", data_dir=TRL.parent, test_fraction=0)
    assert content(local) == content(default)
    with pytest.raises(DataError, match=f"could not load {TRL} \\(config nope\\) from the Hugging Face hub: .*nope"):
        getters.get_dataset(f"hf:{TRL}:nope", "train")
    with pytest.raises(DataError, match="unknown option\\(s\\) shuffle: valid options are test_fraction"):
        getters.get_dataset(f"hf:{TRL}", "train", shuffle=True)


def test_a_trl_dataset_feeds_every_kind_of_loader(tmp_path):
    """`datasets=[hf:<repo>:<config>]` on the command line: pairs for DPO, unpaired labels for KTO."""
    for loss, config, part in [("dpo", "conversational_preference", "chosen"), ("kto", "standard_unpaired", "targets")]:
        cfg = make_config(tmp_path, f"loss={loss}", f"datasets=[hf:{TRL}:{config}]", "model.batch_size=2")
        loader = builders.build_loader(cfg, builders.build_tokenizer(cfg), split="train", train=True)
        batch = next(iter(loader))
        assert batch.kind == loader.batch_kind and len(batch.parts[part]) >= 1


BAD = [
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "field 'chosen[1].role' is 'user': the last message"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "field 'rejected' starts with other turns than 'chosen'"),
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "field 'prompt' is missing"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "field 'completion' holds 2 messages"),
    ({"text": "The sky is blue."}, "field 'responses' is missing: give exactly one of"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "field 'messages' holds only the response"),
    ({"prompt": "p", "completion": " a", "label": "yes"}, "field 'label' should be true, false or null"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"},
                                                              {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}]},
     "field 'prompt' differs from the turns before the responses"),
]


@pytest.mark.parametrize("record, message", BAD, ids=[m.split("'")[1] for _, m in BAD])
def test_malformed_trl_records_fail_in_one_line_naming_the_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as err:
        getters.get_dataset(f"jsonl:{path}", "train", test_fraction=0)
    assert str(err.value).startswith(f"{path}, line 2: {message}") and "\n" not in str(err.value)
