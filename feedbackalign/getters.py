"""Getters: upstream feedback datasets -> `feedback.Dataset`, one `Example` per prompt.

`get_<name>(split, data_dir=None, **options)` reads the Hugging Face hub copy (`datasets.load_dataset`) or, with
`data_dir`, the same upstream files under `<data_dir>/<DATA_FOLDERS[name]>/`; both feed one record parser.
`get_dataset(name, split, ...)` dispatches by name; `jsonl:<path>` / `json:<path>` read the user's own file and
`hf:<repo>[:<config>]` a hub dataset, both in this project's generic schema or TRL's dataset shapes.
Known upstream oddities are skipped with one `SkippedRecordsWarning` per rule; malformed data raises one
`DataError` naming the file, the record and the field. Mappings and layouts: docs/data_formats.md.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
import re
from collections import defaultdict, namedtuple
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from feedbackalign.feedback import Dataset, Example, in_test_split, merge_by_prompt
from feedbackalign.errors import DataError
from feedbackalign.records import (Record, Skips, get_field, hub_dataset, hub_records, nonempty_text, number_field,
                                   read_file, row_records, short_repr, text_field, turns_field)
from feedbackalign.task import get_wordsort

DATA_FOLDERS = {  # name -> folder under data_dir
    "hh": "hh_rlhf", "hh_helpful": "hh_rlhf", "hh_harmless": "hh_rlhf", "shp": "shp", "oasst": "oasst",
    "ultrafeedback": "ultrafeedback", "ultrabin": "ultrafeedback_binarized", "cut": "cut_judgments",
    "shepherd": "shepherd", "alpacaeval": "alpaca_eval",
}
HUB_IDS = {
    "hh": "Anthropic/hh-rlhf", "shp": "stanfordnlp/SHP", "oasst": "OpenAssistant/oasst1",
    "ultrafeedback": "openbmb/UltraFeedback", "ultrabin": "HuggingFaceH4/ultrafeedback_binarized",
}
DATA_SUFFIXES = ("*.jsonl", "*.jsonl.gz", "*.json", "*.parquet")
TEST_FRACTION = 0.05  # held-out share for sources that ship no test split (feedback.in_test_split)


def _folder(name: str, data_dir) -> Path:
    folder = Path(data_dir) / DATA_FOLDERS[name]
    if not folder.is_dir():
        raise DataError(f"{folder} not found: for '{name}', data_dir={data_dir} must contain the folder "
                        f"'{DATA_FOLDERS[name]}/' (layout: docs/data_formats.md); check data_dir and the folder name, "
                        f"or leave data_dir unset for the hub")
    return folder


def _files(folder: Path, patterns: Iterable[str]) -> list[Path]:
    patterns = list(patterns)
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise DataError(f"{folder}: no data files matching {', '.join(patterns)}: see docs/data_formats.md")
    return files


def _records(files: Iterable[Path]) -> Iterator[Record]:
    return itertools.chain.from_iterable(map(read_file, files))


def _source(name: str, data_dir, hub_split: str, patterns: Iterable[str]) -> Iterator[Record]:
    """The hub rows of `name`, or the local files under data_dir matching `patterns`: one parser for both."""
    if data_dir is None:
        return hub_records(HUB_IDS[name], hub_split)
    return _records(_files(_folder(name, data_dir), patterns))


def _check_split(name: str, split: str, allowed: tuple) -> None:
    if split not in allowed:
        raise DataError(f"{name}: unknown split '{split}': use one of {', '.join(allowed)}")


def _hash_split(examples: Iterable[Example], split: str, test_fraction: float) -> list[Example]:
    """The deterministic held-out slice (feedback.in_test_split) is 'test', the rest 'train'."""
    return [ex for ex in examples if in_test_split(ex, test_fraction) == (split == "test")]


def _finish(name: str, examples: Iterable[Optional[Example]], skips: Skips) -> Dataset:
    """Merge records sharing a prompt (feedback.merge_by_prompt), then warn once per skip rule."""
    dataset = merge_by_prompt(name, [ex for ex in examples if ex is not None])
    skips.warn()
    return dataset


def _names(value) -> list[str]:
    """A list option that may arrive as one string (or a Hydra ListConfig)."""
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _drop_repeats(examples: Iterable[Optional[Example]], skips: Skips) -> Iterator[Example]:
    """Keep the first record of each (prompt, response): a repeat would overwrite the first one's feedback."""
    seen = set()
    for ex in examples:
        if ex is None:
            continue
        key = (ex.prompt_key(), ex.generations[0])
        if key in seen:
            skips("record(s) repeating the prompt and response of an earlier record", ex.source)
            continue
        seen.add(key)
        yield ex


# ---------------------------------------------------------------- Anthropic HH-RLHF

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_dialogue(text: str) -> Optional[tuple[list[dict], str]]:
    """Split a "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue into (history turns, final assistant response).

    Consecutive turns of one speaker are joined with a blank line; None when the text has words before the
    first turn, does not end with an Assistant turn, or the history does not start and end with a Human turn.
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3 or parts[-2] != "Assistant":
        return None
    history: list[dict] = []
    for speaker, content in zip(parts[1:-2:2], parts[2:-2:2]):
        role = "user" if speaker == "Human" else "assistant"
        if history and history[-1]["role"] == role:
            history[-1]["content"] = (history[-1]["content"] + "\n\n" + content.strip()).strip()
        else:
            history.append({"role": role, "content": content.strip()})
    if not history or history[0]["role"] != "user" or history[-1]["role"] != "user":
        return None
    return history, parts[-1].strip()


def hh_example(rec: Record, name: str, skips: Skips) -> Optional[Example]:
    """{chosen, rejected} whole dialogues -> shared history as the prompt, pairs [(0, 1)], sft_index 0."""
    chosen, rejected = text_field(rec, rec.data, "chosen"), text_field(rec, rec.data, "rejected")
    c, r = parse_hh_dialogue(chosen), parse_hh_dialogue(rejected)
    if chosen == rejected or (c and r and c[1] == r[1]):
        return skips("record(s) whose chosen and rejected responses are identical", rec.where)
    if c is None or r is None:
        return skips("record(s) whose dialogue does not parse into Human/Assistant turns", rec.where)
    if c[0] != r[0]:
        return skips("record(s) whose chosen and rejected dialogues differ before the final turn", rec.where)
    if not c[1] or not r[1]:
        return skips("record(s) with an empty final Assistant turn", rec.where)
    return Example(prompt=c[0], generations=[c[1], r[1]], pairs=[(0, 1)], sft_index=0, dataset_name=name,
                   source=rec.source)


def _hh(split: str, data_dir, subsets: Optional[list[str]], name: str) -> Dataset:
    """Anthropic/hh-rlhf (Bai et al. 2022): every subset with a `<split>` file, or the given `subsets`."""
    _check_split(name, split, ("train", "test"))
    if data_dir is None:
        loads = [{}] if subsets is None else [{"data_dir": s} for s in subsets]
        records = (rec for kw in loads for rec in hub_records(HUB_IDS["hh"], split, **kw))
    else:
        folder = _folder(name, data_dir)
        names = subsets if subsets is not None else sorted(p.name for p in folder.iterdir() if p.is_dir())
        files = [folder / s / f"{split}.jsonl.gz" for s in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing and subsets is not None or len(missing) == len(files):
            raise DataError(f"{name}: {', '.join(missing) or folder / '<subset>'} not found: the local layout is "
                            f"hh_rlhf/<subset>/<split>.jsonl.gz (docs/data_formats.md); check data_dir and split")
        files = [f for f in files if f.is_file()]
        records = _records(files)
    skips = Skips(name)
    return _finish(name, (hh_example(rec, name, skips) for rec in records), skips)


def get_hh(split: str, data_dir=None, subsets: Optional[list[str]] = None) -> Dataset:
    """All HH-RLHF preference subsets (or `subsets`, e.g. ["helpful-base"])."""
    return _hh(split, data_dir, None if subsets is None else _names(subsets), "hh")


def get_hh_helpful(split: str, data_dir=None) -> Dataset:
    """HH-RLHF helpful-base only (as HALOs' hh_helpful)."""
    return _hh(split, data_dir, ["helpful-base"], "hh_helpful")


def get_hh_harmless(split: str, data_dir=None) -> Dataset:
    """HH-RLHF harmless-base only (as HALOs' hh_harmless)."""
    return _hh(split, data_dir, ["harmless-base"], "hh_harmless")


# ---------------------------------------------------------------- Stanford SHP


def shp_example(rec: Record, skips: Skips, score_ratio_min: Optional[float]) -> Optional[Example]:
    """One SHP comparison: prompt = history, labels == 1 means human_ref_A is preferred."""
    d = rec.data
    history, a, b = text_field(rec, d, "history"), text_field(rec, d, "human_ref_A"), text_field(rec, d, "human_ref_B")
    label = get_field(rec, d, "labels", int, "1 (A preferred) or 0 (B preferred)")
    if label not in (0, 1):
        raise rec.fail("labels", f"is {label}: use 1 (A preferred) or 0 (B preferred)")
    score_a, score_b = number_field(rec, d, "score_A"), number_field(rec, d, "score_B")
    if not (history.strip() and a.strip() and b.strip()):
        return skips("record(s) with an empty history or comment", rec.where)
    if a == b:
        return skips("record(s) whose two comments are identical", rec.where)
    low, high = sorted((score_a, score_b))
    ratio = high / low if low > 0 else math.inf
    if score_ratio_min is not None and ratio < score_ratio_min:
        return None  # the usual SHP filter (Ethayarajh et al. 2022; DPO/HALOs use 2.0)
    pair = (0, 1) if label == 1 else (1, 0)
    return Example(prompt=_user(history), generations=[a, b], pairs=[pair], sft_index=pair[0], dataset_name="shp",
                   source=rec.source)


def cap_pairs(ex: Example, max_pairs: Optional[int], seed: int = 0) -> Example:
    """At most `max_pairs` pairs per prompt (HALOs' anti-overfitting cap), sampled reproducibly per prompt;
    generations no kept pair uses are dropped and sft_index is the chosen one of the first kept pair."""
    if max_pairs is None or len(ex.pairs) <= max_pairs:
        return ex
    picked = set(random.Random(f"{seed}:{ex.prompt_key()}").sample(range(len(ex.pairs)), max_pairs))
    kept = [p for n, p in enumerate(ex.pairs) if n in picked]
    used = sorted({i for pair in kept for i in pair})
    new = {old: n for n, old in enumerate(used)}
    pairs = [(new[i], new[j]) for i, j in kept]
    return Example(prompt=ex.prompt, generations=[ex.generations[i] for i in used], pairs=pairs,
                   sft_index=pairs[0][0], dataset_name=ex.dataset_name, source=ex.source)


def get_shp(split: str, data_dir=None, score_ratio_min: Optional[float] = 2.0,
            max_pairs_per_prompt: Optional[int] = 5, seed: int = 0, domains: Optional[list[str]] = None) -> Dataset:
    """stanfordnlp/SHP (Ethayarajh et al. 2022): pairs with score ratio >= `score_ratio_min`, at most
    `max_pairs_per_prompt` per post (both None to keep all); `domains` picks sub-forum folders."""
    _check_split("shp", split, ("train", "validation", "test"))
    tops = _names(domains) if domains else ["*"]
    patterns = [f"{top}/{split}.{ext}" for top in tops for ext in ("json", "jsonl", "jsonl.gz")]
    records, skips = _source("shp", data_dir, split, patterns), Skips("shp")
    dataset = _finish("shp", (shp_example(rec, skips, score_ratio_min) for rec in records), skips)
    dataset.examples = [cap_pairs(ex, max_pairs_per_prompt, seed) for ex in dataset.examples]
    return dataset


# ---------------------------------------------------------------- OpenAssistant oasst1


# One OASST message (tree export or flat row); `where` is its record's source for messages.
Message = namedtuple("Message", "id parent role text lang rank deleted where")


def _message(rec: Record, obj: dict, parent: Optional[str], path: str) -> Message:
    at = (lambda key: f"{path}.{key}") if path else (lambda key: key)
    role = text_field(rec, obj, "role", at("role"))
    if role not in ("prompter", "assistant"):
        raise rec.fail(at("role"), f"is '{role}': OASST roles are prompter and assistant")
    rank = get_field(rec, obj, "rank", (int, float), "an integer rank (0 = best) or null", at("rank"), optional=True)
    if isinstance(rank, float):
        if math.isnan(rank):
            rank = None
        elif not rank.is_integer():
            raise rec.fail(at("rank"), f"is {rank}: ranks are whole numbers (0 = best)")
    parent = text_field(rec, obj, "parent_id", at("parent_id"), optional=True) if parent is None else parent
    return Message(text_field(rec, obj, "message_id", at("message_id")), parent, role, text_field(rec, obj, "text", at("text")),
                   text_field(rec, obj, "lang", at("lang"), optional=True), None if rank is None else int(rank),
                   bool(get_field(rec, obj, "deleted", bool, "true or false", at("deleted"), optional=True)), rec.source)


def _walk_tree(rec: Record, obj, parent: Optional[str], path: str, out: dict) -> None:
    if not isinstance(obj, dict):
        raise rec.fail(path, f"should be a message object, got {type(obj).__name__}")
    msg = _message(rec, obj, parent, path)
    out[msg.id] = msg
    replies = get_field(rec, obj, "replies", list, "a list of reply messages", f"{path}.replies", optional=True) or []
    for i, reply in enumerate(replies):
        _walk_tree(rec, reply, msg.id, f"{path}.replies[{i}]", out)


def oasst_messages(records: Iterable[Record]) -> dict[str, Message]:
    """Messages by id from tree records ({message_tree_id, prompt: <message with replies>}) or flat rows."""
    messages: dict[str, Message] = {}
    for rec in records:
        if "prompt" in rec.data:
            _walk_tree(rec, rec.data["prompt"], None, "prompt", messages)
        elif "message_id" in rec.data:
            msg = _message(rec, rec.data, None, "")
            messages[msg.id] = msg
        else:
            raise rec.fail("message_id", "is missing: expected an OASST message row (message_id, parent_id, text, "
                                         "role, rank, ...) or a tree export line (message_tree_id, prompt)")
    return messages


def _path_to(msg: Message, messages: dict[str, Message]) -> Optional[list[Message]]:
    path = [msg]
    while path[-1].parent is not None:
        parent = messages.get(path[-1].parent)
        if parent is None or parent.deleted or len(path) > len(messages):
            return None
        path.append(parent)
    return path[::-1]


def oasst_examples(messages: dict[str, Message], lang: Optional[str], skips: Skips) -> Iterator[Example]:
    """Every prompter message with >= 2 ranked assistant replies -> one K-wise Example.

    Replies ordered by rank (0 best); scores = -rank; pairs (i, j) for every i ranked strictly better than j;
    sft_index = the best reply. The prompt is the conversation path from the root to the prompter message.
    """
    children = defaultdict(list)
    for msg in messages.values():
        children[msg.parent].append(msg)
    for msg in messages.values():
        if msg.role != "prompter" or msg.deleted or (lang and msg.lang != lang):
            continue
        replies = [c for c in children[msg.id]
                   if c.role == "assistant" and not c.deleted and c.rank is not None and not (lang and c.lang != lang)]
        for empty in [c for c in replies if not c.text.strip()]:
            skips("ranked repl(ies) with empty text", empty.where)
        replies = [c for c in replies if c.text.strip()]
        if len(replies) < 2:
            continue
        path = _path_to(msg, messages)
        if path is None:
            skips("prompt(s) whose conversation path has a missing or deleted message", msg.where)
            continue
        replies.sort(key=lambda c: c.rank)
        k = len(replies)
        yield Example(
            prompt=[{"role": "user" if m.role == "prompter" else "assistant", "content": m.text} for m in path],
            generations=[c.text for c in replies],
            scores=[float(-c.rank) for c in replies],
            pairs=[(i, j) for i in range(k) for j in range(k) if replies[i].rank < replies[j].rank],
            sft_index=0, dataset_name="oasst", source=msg.where,
        )


def _oasst_split_tag(path: Path) -> Optional[str]:
    """'train' / 'test' for files named like the hub's split files (train-*, validation-*), else None."""
    match = re.match(r"(train|validation|test)[-_.]", path.name)
    return None if match is None else ("train" if match.group(1) == "train" else "test")


def get_oasst(split: str, data_dir=None, lang: Optional[str] = "en", test_fraction: float = TEST_FRACTION) -> Dataset:
    """OpenAssistant/oasst1 (Köpf et al. 2023), flat table or tree export; `lang` None keeps every language.

    Hub: train / validation (= test). Local files named train-* / validation-* are those splits; any other file
    (e.g. a tree export) is split by prompt hash (`test_fraction`).
    """
    _check_split("oasst", split, ("train", "validation", "test"))
    split = "test" if split == "validation" else split
    skips = Skips("oasst")
    if data_dir is None:
        hub_split = "validation" if split == "test" else "train"
        examples = list(oasst_examples(oasst_messages(hub_records(HUB_IDS["oasst"], hub_split)), lang, skips))
    else:
        files = _files(_folder("oasst", data_dir), [f"**/{s}" for s in DATA_SUFFIXES])
        tagged = [f for f in files if _oasst_split_tag(f) == split]
        untagged = [f for f in files if _oasst_split_tag(f) is None]
        examples = list(oasst_examples(oasst_messages(_records(tagged)), lang, skips)) if tagged else []
        if untagged:
            loose = oasst_examples(oasst_messages(_records(untagged)), lang, skips)
            examples += _hash_split(loose, split, test_fraction)
    return _finish("oasst", examples, skips)


# ---------------------------------------------------------------- UltraFeedback

UF_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def _fine_grained(rec: Record, completion: dict, path: str) -> Optional[float]:
    """Mean of the numeric aspect ratings ("N/A" left out), as UltraFeedback's fine-grained_score."""
    annotations = get_field(rec, completion, "annotations", dict, "an object of aspect ratings", f"{path}.annotations")
    ratings = []
    for aspect in UF_ASPECTS:
        where = f"{path}.annotations.{aspect}"
        entry = get_field(rec, annotations, aspect, dict, "an object with a 'Rating'", where, optional=True)
        rating = "N/A" if entry is None else get_field(rec, entry, "Rating", (str, int, float), 'a rating or "N/A"',
                                                  f"{where}.Rating")
        try:
            ratings += [] if rating == "N/A" else [float(rating)]
        except ValueError:
            raise rec.fail(f"{where}.Rating", f"is '{rating}': use a number 1-5 or \"N/A\"") from None
    return sum(ratings) / len(ratings) if ratings else None


def ultrafeedback_example(rec: Record, score: str, skips: Skips) -> Optional[Example]:
    """One instruction with its K completions as scalar rewards (Cui et al. 2023): `overall_score`, or the
    mean fine-grained aspect rating when score="fine_grained"; sft_index = the best-scored completion."""
    instruction = text_field(rec, rec.data, "instruction")
    completions = get_field(rec, rec.data, "completions", list, "a list of completions")
    generations, scores = [], []
    for i, completion in enumerate(completions):
        path = f"completions[{i}]"
        if not isinstance(completion, dict):
            raise rec.fail(path, f"should be a completion object, got {type(completion).__name__}")
        response = text_field(rec, completion, "response", f"{path}.response")
        value = (number_field(rec, completion, "overall_score", f"{path}.overall_score") if score == "overall"
                 else _fine_grained(rec, completion, path))
        if not response.strip():
            skips("completion(s) with an empty response", rec.where)
        elif value is None:
            skips("completion(s) with no numeric fine-grained rating", rec.where)
        else:
            generations.append(response)
            scores.append(value)
    if not instruction.strip() or not generations:
        return skips("record(s) with an empty instruction or no usable completion", rec.where)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return Example(prompt=_user(instruction), generations=generations, scores=scores, sft_index=best,
                   dataset_name="ultrafeedback", source=rec.source)


def get_ultrafeedback(split: str, data_dir=None, score: str = "overall",
                      test_fraction: float = TEST_FRACTION) -> Dataset:
    """openbmb/UltraFeedback (one 'train' split upstream; 'test' is the hash-held-out slice)."""
    _check_split("ultrafeedback", split, ("train", "test"))
    if score not in ("overall", "fine_grained"):
        raise DataError(f"ultrafeedback: unknown score '{score}': use overall or fine_grained")
    records = _source("ultrafeedback", data_dir, "train", [f"**/{s}" for s in DATA_SUFFIXES])
    skips = Skips("ultrafeedback")
    examples = (ultrafeedback_example(rec, score, skips) for rec in records)
    return _finish("ultrafeedback", _hash_split((ex for ex in examples if ex), split, test_fraction), skips)


# ---------------------------------------------------------------- UltraFeedback binarized (Zephyr)


def ultrabin_example(rec: Record, skips: Skips) -> Optional[Example]:
    """chosen/rejected message lists -> prompt = turns before the final one, pairs [(0, 1)], scores
    [score_chosen, score_rejected], sft_index 0 (Tunstall et al. 2023)."""
    chosen, rejected = turns_field(rec, rec.data, "chosen"), turns_field(rec, rec.data, "rejected")
    scores = [number_field(rec, rec.data, "score_chosen"), number_field(rec, rec.data, "score_rejected")]
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise rec.fail(f"{key}[{len(turns) - 1}].role", "should be 'assistant': the last turn is the response")
    prompt = chosen[:-1] or _user(nonempty_text(rec, "prompt", text_field(rec, rec.data, "prompt")))
    if rejected[:-1] and rejected[:-1] != chosen[:-1]:
        return skips("record(s) whose chosen and rejected conversations differ before the final turn", rec.where)
    c, r = chosen[-1]["content"], rejected[-1]["content"]
    if not c.strip() or not r.strip():
        return skips("record(s) with an empty chosen or rejected response", rec.where)
    if c == r:
        return skips("record(s) whose chosen and rejected responses are identical", rec.where)
    return Example(prompt=prompt, generations=[c, r], scores=scores, pairs=[(0, 1)], sft_index=0,
                   dataset_name="ultrabin", source=rec.source)


def get_ultrabin(split: str, data_dir=None) -> Dataset:
    """HuggingFaceH4/ultrafeedback_binarized; train -> train_prefs, test -> test_prefs."""
    _check_split("ultrabin", split, ("train", "test", "train_prefs", "test_prefs"))
    split = {"train": "train_prefs", "test": "test_prefs"}.get(split, split)
    patterns = [f"data/{split}{sep}{s[1:]}" for sep in ("-*", "") for s in DATA_SUFFIXES]
    records, skips = _source("ultrabin", data_dir, split, patterns), Skips("ultrabin")
    return _finish("ultrabin", (ultrabin_example(rec, skips) for rec in records), skips)


# ---------------------------------------------------------------- judgments: CUT and Shepherd


def _critique(rec: Record, obj: dict, key: str, path: str = "") -> Optional[str]:
    """A judgment: a non-empty critique string, or None (no fault found)."""
    text = text_field(rec, obj, key, path, optional=True)
    if text is not None and not text.strip():
        raise rec.fail(path or key, "is an empty string: write the critique, or null when there is no fault")
    return text


def _judged(prompt: str, response: str, judgment: Optional[str], name: str, rec: Record) -> Example:
    """A single judged response: a critique makes it undesirable, None (no fault) desirable and an SFT target."""
    return Example(prompt=_user(prompt), generations=[response], judgments=[judgment], desirable=[judgment is None],
                   sft_index=0 if judgment is None else None, dataset_name=name, source=rec.source)


def cut_example(rec: Record, skips: Skips) -> Optional[Example]:
    """CUT's Alpaca-format record (Xu et al. 2023): prompt = instruction + "\\n" + input (as CUT joins them);
    `judgment` null = no fault; a `score` >= 7 also means no fault (CUT's rule)."""
    d = rec.data
    instruction, output = text_field(rec, d, "instruction"), text_field(rec, d, "output")
    extra = text_field(rec, d, "input", optional=True) or ""
    if "judgment" not in d:
        raise rec.fail("judgment", "is missing: give the critique text, or null when the output has no fault")
    judgment = _critique(rec, d, "judgment")
    score = number_field(rec, d, "score", optional=True)
    if score is not None and score >= 7:
        judgment = None
    if not instruction.strip() or not output.strip():
        return skips("record(s) with an empty instruction or output", rec.where)
    return _judged(f"{instruction}\n{extra}" if extra else instruction, output, judgment, "cut", rec)


def shepherd_example(rec: Record, skips: Skips) -> Optional[Example]:
    """Shepherd human critique (Wang et al. 2023): question -> answer, undesirable, judgment = feedback."""
    d = rec.data
    question, answer, feedback = text_field(rec, d, "question"), text_field(rec, d, "answer"), text_field(rec, d, "feedback")
    if not (question.strip() and answer.strip() and feedback.strip()):
        return skips("record(s) with an empty question, answer or feedback", rec.where)
    return _judged(question, answer, feedback, "shepherd", rec)


def _judgment_source(name: str, parse: Callable, patterns, split: str, data_dir, test_fraction: float) -> Dataset:
    _check_split(name, split, ("train", "test"))
    if data_dir is None:
        raise DataError(f"{name} has no Hugging Face hub copy: set data_dir to a folder holding "
                        f"'{DATA_FOLDERS[name]}/' with the upstream files (docs/data_formats.md)")
    skips = Skips(name)
    records = _records(_files(_folder(name, data_dir), patterns))
    examples = _drop_repeats((parse(rec, skips) for rec in records), skips)
    return _finish(name, _hash_split(examples, split, test_fraction), skips)


def get_cut(split: str, data_dir=None, test_fraction: float = TEST_FRACTION) -> Dataset:
    """CUT judgment data: every `cut_judgments/**/*.json`; no upstream split, 'test' is the hash slice."""
    return _judgment_source("cut", cut_example, ["**/*.json"], split, data_dir, test_fraction)


def get_shepherd(split: str, data_dir=None, test_fraction: float = TEST_FRACTION) -> Dataset:
    """Shepherd `human_data_for_model.jsonl`-format files under `shepherd/`; 'test' is the hash slice."""
    return _judgment_source("shepherd", shepherd_example, ["**/*.jsonl", "**/*.json"], split, data_dir,
                            test_fraction)


# ---------------------------------------------------------------- AlpacaEval's prompts (evaluation only)

ALPACAEVAL_FILE = "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json"  # the hub repository's data file


def alpacaeval_example(rec: Record, skips: Skips) -> Optional[Example]:
    """{instruction, output, generator, dataset} -> prompt = [user: instruction], the reference output as the one
    generation and SFT target (eval.py's `chosen`), as HALOs' alpacaeval mode."""
    instruction, output = text_field(rec, rec.data, "instruction"), text_field(rec, rec.data, "output")
    if not instruction.strip():
        return skips("record(s) with an empty instruction", rec.where)
    return Example(prompt=_user(instruction), generations=[output], sft_index=0, dataset_name="alpacaeval",
                   source=rec.source)


def get_alpacaeval(split: str, data_dir=None) -> Dataset:
    """AlpacaEval's 805 evaluation prompts (Li et al. 2023, tatsu-lab/alpaca_eval `alpaca_eval.json`) with their
    reference outputs, for eval.py: every split is the whole set. The instruction is kept verbatim, since
    `alpaca_eval evaluate` matches model outputs to its prompts by the instruction's text."""
    _check_split("alpacaeval", split, ("train", "test", "eval"))
    if data_dir is None:
        rows = hub_dataset("json", label=ALPACAEVAL_FILE, data_files=ALPACAEVAL_FILE, split="train")
        records = row_records(rows, ALPACAEVAL_FILE)
    else:
        records = _records(_files(_folder("alpacaeval", data_dir), ["alpaca_eval.json"]))
    skips = Skips("alpacaeval")
    return _finish("alpacaeval", (alpacaeval_example(rec, skips) for rec in records), skips)


# ---------------------------------------------------------------- the user's own file (generic schema, TRL's shapes)

_SINGULAR = {"scores": "score", "desirable": "label", "judgments": "judgment"}  # per-response key -> K=1 key
_RESPONSE_FORMS = ("responses", "chosen", "response", "completion")
_FORMS_HINT = ("give exactly one of 'responses' (a list), 'chosen' + 'rejected', 'response', 'completion' (each a "
               "string or a list of messages), or 'messages' (docs/data_formats.md)")


def _given(d: dict, key: str) -> bool:
    """A key with a value (hub rows hold None for a column another row of the file has)."""
    return d.get(key) is not None


def _generic_prompt(rec: Record, key: str = "prompt") -> list[dict]:
    if isinstance(rec.data.get(key), list):
        turns = turns_field(rec, rec.data, key)
        for i, turn in enumerate(turns):
            nonempty_text(rec, f"{key}[{i}].content", turn["content"])
        return turns
    prompt = get_field(rec, rec.data, key, str, "a string or a list of {role, content} turns")
    return _user(nonempty_text(rec, key, prompt))


def _response_text(rec: Record, key: str) -> tuple[str, list[dict]]:
    """(response, the turns before it): a string (TRL's standard format), or a message list whose last message
    is the assistant's response (TRL's conversational format; turns before it are an implicit prompt)."""
    value = rec.data.get(key)
    if isinstance(value, list):
        turns = _generic_prompt(rec, key)
        last = len(turns) - 1
        if turns[last]["role"] != "assistant":
            raise rec.fail(f"{key}[{last}].role", f"is '{turns[last]['role']}': the last message is the response, "
                                                 "so it must be 'assistant'")
        return turns[last]["content"], turns[:last]
    return nonempty_text(rec, key, get_field(rec, rec.data, key, str, "a string or a list of messages")), []


def _generic_responses(rec: Record) -> tuple[list[str], list[tuple[int, int]], Optional[int], list[dict]]:
    """The responses, the pairs and sft_index implied by chosen/rejected, and the turns the responses' message
    lists start with (TRL's implicit prompt; [] when none)."""
    d = rec.data
    forms = [k for k in _RESPONSE_FORMS if _given(d, k)]
    if not forms and _given(d, "messages"):
        text, before = _response_text(rec, "messages")
        if not before:
            raise rec.fail("messages", "holds only the response: put the prompt's turns before it")
        return [text], [], None, before
    if len(forms) != 1:
        problem = "is missing" if not forms else f"clashes with '{forms[1]}'"
        raise rec.fail("responses", f"{problem}: {_FORMS_HINT}")
    if forms[0] == "chosen":
        (chosen, before), (rejected, other) = _response_text(rec, "chosen"), _response_text(rec, "rejected")
        if before != other:
            raise rec.fail("rejected", "starts with other turns than 'chosen': the two conversations must share "
                                       "every turn before the final response")
        return [chosen, rejected], [(0, 1)], 0, before
    if forms[0] in ("response", "completion"):
        text, before = _response_text(rec, forms[0])
        if before and forms[0] == "completion":
            raise rec.fail("completion", f"holds {len(before) + 1} messages: give the one assistant message that is "
                                         "the response")
        return [text], [], None, before
    items = get_field(rec, d, "responses", list, "a list of response strings")
    if not items:
        raise rec.fail("responses", "is an empty list: give at least one response")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise rec.fail(f"responses[{i}]", f"should be a string, got {type(item).__name__}")
        nonempty_text(rec, f"responses[{i}]", item)
    return list(items), [], None, []


def _record_prompt(rec: Record, implicit: list[dict]) -> list[dict]:
    """`prompt`, or the turns the responses' conversations share (TRL's implicit prompt). An explicit list of
    turns must then be those turns; a string `prompt` beside full conversations is left aside, as TRL does."""
    if not implicit:
        if not _given(rec.data, "prompt"):
            raise rec.fail("prompt", "is missing: add the prompt (a string or a list of turns); text responses "
                                     "holding their prompt (TRL's implicit prompt) are split only as message lists")
        return _generic_prompt(rec)
    if isinstance(rec.data.get("prompt"), list) and _generic_prompt(rec) != implicit:
        raise rec.fail("prompt", "differs from the turns before the responses: drop one of them")
    return implicit


def _per_response(rec: Record, key: str, k: int) -> Optional[list]:
    """scores / desirable / judgments: a list with one entry per response (the singular key when K = 1)."""
    one = _SINGULAR[key]
    if one in rec.data and (key in rec.data or k != 1):
        raise rec.fail(one, f"is for a single response: use '{key}' (a list, one per response)")
    if one in rec.data:
        values, paths = [rec.data[one]], [one]
    else:
        values = get_field(rec, rec.data, key, list, "a list with one entry per response", optional=True)
        if values is None:
            return None
        if len(values) != k:
            raise rec.fail(key, f"has {len(values)} entries but there are {k} responses: give one per response")
        paths = [f"{key}[{i}]" for i in range(k)]
    check = {"scores": number_field, "desirable": _flag, "judgments": _critique}[key]
    return [check(rec, {key: value}, key, path) for value, path in zip(values, paths)]


def _flag(rec: Record, obj: dict, key: str, path: str) -> Optional[bool]:
    return get_field(rec, obj, key, bool, "true, false or null", path, optional=True)


def generic_example(rec: Record, name: str) -> Example:
    """One record of the generic schema (docs/data_formats.md) -> Example; every problem is a DataError."""
    responses, pairs, sft_index, implicit = _generic_responses(rec)
    prompt = _record_prompt(rec, implicit)
    k = len(responses)
    feedback = {key: _per_response(rec, key, k) for key in _SINGULAR}
    raw_pairs = get_field(rec, rec.data, "pairs", list, "a list of [i, j] index pairs", optional=True)
    if raw_pairs is not None:
        pairs = [_index_pair(rec, p, n, k) for n, p in enumerate(raw_pairs)]
    index = get_field(rec, rec.data, "sft_index", int, "a response index", optional=True)
    if index is not None and not 0 <= index < k:
        raise rec.fail("sft_index", f"is {index}: it must index the {k} responses (0-based)")
    if index is None and sft_index is None and k == 1 and feedback["desirable"] != [False] \
            and feedback["judgments"] in (None, [None]):
        index = 0  # a lone response not marked bad (no label, label true, or judgment null) is an SFT target
    return Example(prompt=prompt, generations=responses, pairs=pairs,
                   sft_index=index if index is not None else sft_index, dataset_name=name, source=rec.source,
                   **feedback)


def _index_pair(rec: Record, pair, n: int, k: int) -> tuple[int, int]:
    ok = (isinstance(pair, list) and len(pair) == 2
          and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k for i in pair) and pair[0] != pair[1])
    if not ok:
        raise rec.fail(f"pairs[{n}]", f"is {short_repr(pair)}: give [i, j] with i preferred over j, two different "
                                      f"0-based indices of the {k} responses")
    return pair[0], pair[1]


def _resolve(path: str, data_dir) -> Path:
    file = Path(path).expanduser()
    if not file.is_absolute() and not file.exists() and data_dir is not None:
        file = Path(data_dir) / file
    if not file.is_file():
        raise DataError(f"{path}: no such file (looked in {Path.cwd()}"
                        f"{'' if data_dir is None else ' and ' + str(data_dir)}): check the path")
    return file


def get_jsonl(split: str, data_dir=None, path: Optional[str] = None, test_fraction: float = TEST_FRACTION,
              name: Optional[str] = None) -> Dataset:
    """The user's own file in the generic schema (JSON Lines or a JSON array). A path containing '{split}' is
    one file per split; otherwise the hash slice of prompts (`test_fraction`) is 'test'. Records with the
    same prompt merge into one Example."""
    _check_split("jsonl", split, ("train", "test"))
    if path is None:
        raise DataError("jsonl: no file given: use get_dataset('jsonl:<path>', ...) or path=<file>")
    name = name or f"jsonl:{path}"
    per_split = "{split}" in path
    file = _resolve(path.replace("{split}", split), data_dir)
    examples = (generic_example(rec, name) for rec in read_file(file))
    return merge_by_prompt(name, list(examples) if per_split else _hash_split(examples, split, test_fraction))


# ---------------------------------------------------------------- any hub dataset in these shapes (`hf:<repo>[:<config>]`)

HUB_SPLITS = {"train": ("train", "train_prefs", "train_sft"),  # the first a repository has is used
              "test": ("test", "test_prefs", "validation", "valid", "test_sft")}


def get_hf(split: str, data_dir=None, repo: Optional[str] = None, config: Optional[str] = None,
           test_fraction: float = TEST_FRACTION, name: Optional[str] = None) -> Dataset:
    """A hub dataset (`repo`, optionally its `config`) whose rows are in the generic schema or one of TRL's
    shapes. `train` / `test` are the repository's split of that name or a usual alias (HUB_SPLITS); without a
    test split, `test` is the hash slice of `train`. With data_dir, a local copy at <data_dir>/<repo> is read
    when it exists (the same files, the same split rules)."""
    _check_split("hf", split, ("train", "test"))
    if not repo:
        raise DataError("hf: no repository given: use hf:<repo> or hf:<repo>:<config>, e.g. "
                        "hf:trl-lib/ultrafeedback_binarized")
    name = name or f"hf:{repo}" + (f":{config}" if config else "")
    local = Path(data_dir) / repo if data_dir is not None else None
    source = str(local) if local is not None and local.is_dir() else repo
    splits = hub_dataset(source, **({"name": config} if config else {}))
    present = {key: next((s for s in HUB_SPLITS[key] if s in splits), None) for key in HUB_SPLITS}
    if present["train"] is None:
        raise DataError(f"{name}: no train split among {', '.join(splits)} (looked for "
                        f"{', '.join(HUB_SPLITS['train'])})")
    chosen = present[split] or present["train"]
    records = row_records(splits[chosen], f"{repo}[{chosen}]")
    examples = (generic_example(rec, name) for rec in records)
    return merge_by_prompt(name, list(examples) if present["test"] else _hash_split(examples, split, test_fraction))


# ---------------------------------------------------------------- registry and dispatch

GETTERS: dict[str, Callable[..., Dataset]] = {
    "hh": get_hh, "hh_helpful": get_hh_helpful, "hh_harmless": get_hh_harmless, "shp": get_shp,
    "oasst": get_oasst, "ultrafeedback": get_ultrafeedback, "ultrabin": get_ultrabin, "cut": get_cut,
    "shepherd": get_shepherd, "alpacaeval": get_alpacaeval,
    "jsonl": get_jsonl, "json": get_jsonl,  # the reader tells JSON array from lines
    "wordsort": get_wordsort,  # the built-in controlled task (task.py)
}




def file_spec(name: str) -> Optional[tuple[str, str]]:
    """(kind, path) of a user-file dataset name ('jsonl:<path>', 'json:<path>', or a .jsonl/.json path), else None."""
    for kind in ("jsonl", "json"):
        if name.startswith(kind + ":"):
            return kind, name[len(kind) + 1:]
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl", name
    return None


def _check_options(name: str, fn: Callable, options: dict, reserved: tuple = ()) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p not in ("split", "data_dir") + reserved]
    unknown = [o for o in options if o not in valid]
    if unknown:
        raise DataError(f"dataset '{name}': unknown option(s) {', '.join(unknown)}: "
                        f"valid options are {', '.join(valid) or 'none'}")


def get_dataset(name: str, split: str, data_dir=None, **options) -> Dataset:
    """Dispatch by name to get_<name>; 'jsonl:<path>' / 'json:<path>' (or a .jsonl/.json path) read a user file;
    'hf:<repo>[:<config>]' a hub dataset in the same shapes."""
    if name.startswith("hf:"):
        repo, _, config = name[3:].partition(":")
        _check_options(name, get_hf, options, reserved=("repo", "config", "name"))
        return get_hf(split, data_dir, repo=repo, config=config or None, name=name, **options)
    spec = file_spec(name)
    if spec is not None:
        _check_options(name, get_jsonl, options, reserved=("path", "name"))
        return get_jsonl(split, data_dir, path=spec[1], name=name, **options)
    if name not in GETTERS:
        raise DataError(f"unknown dataset '{name}': valid names are {', '.join(sorted(GETTERS))}, "
                        f"jsonl:<path> / json:<path> for your own file, or hf:<repo>[:<config>] for a hub dataset")
    _check_options(name, GETTERS[name], options)
    return GETTERS[name](split, data_dir, **options)
