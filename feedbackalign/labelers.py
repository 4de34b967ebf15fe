"""Labelers: an eval.py samples file (K responses per prompt) -> feedback records in the generic JSONL schema
(docs/data_formats.md), so any loss trains on them with `datasets=[jsonl:<file>]`.

- `task`: the built-in task's true reward (`scores`) and its CUT-style critique (`judgments`) of every response;
- `rm`: a reward model's scalar score of every response: ours (loss=rm's LATEST/hf export) or any Hugging Face
  sequence classifier with one label;
- `judge`: any OpenAI-compatible chat model through compare.py's client (retries with backoff, the key never
  written): `scores` (1-10 per response, UltraFeedback's aspects), `pairs` (every pair of responses asked in both
  orders with compare.py's prompt; a preference counts only when both orders agree) or `judgments` (a CUT-style
  critique per response, null when the judge finds no error).

The record of a prompt holds its non-empty responses and the feedback the labeler gives; the loaders' converters
(feedbackalign/feedback.py) turn scores into pairs, labels and K-groups. Records are appended to the output one
by one, fsync'd, through compare.py's append-only log (a torn last line is cut on the next run), so a rerun
labels only the prompts that are missing. A record's `id` hashes the sample id, its responses and the labeler, so
resampled responses or another labeler are never taken for finished work: the log refuses to mix them.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import compare
import dataloader
from feedbackalign import task
from feedbackalign.errors import ConfigError, DataError, EnvError
from feedbackalign.feedback import last_user_turn
from feedbackalign.progress import progress

LABELERS = ("task", "rm", "judge")
JUDGE_MODES = ("scores", "pairs", "judgments")
PROMPT_VERSION = "feedbackalign-label-1"   # change with any change to the two templates below


def _is_label_record(record: dict) -> bool:
    return "sample_id" in record and isinstance(record.get("responses"), list) and "labeler" in record


LABEL_RECORDS = compare.RecordKind("label.py", "-o", _is_label_record)


# ---------------------------------------------------------------- samples


@dataclass(frozen=True)
class Item:
    """One prompt of a samples file and its responses (the empty ones left out: the schema needs text)."""

    sample_id: str
    turns: list
    responses: tuple[str, ...]
    dataset: str
    empty: int          # empty responses left out


def read_samples(path: Path) -> list[Item]:
    """The items of an eval.py samples file (compare.py checks the file); `responses` (K > 1) or `policy`."""
    path = Path(path)
    _, samples = compare.load_samples(path)
    items = []
    for sample_id, sample in samples.items():
        responses = sample.get("responses", [compare.side_text(path, sample, "policy")])
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise DataError(f"samples file {path}: sample {sample_id} 'responses' is not a list of strings: rewrite "
                            "it with eval.py")
        kept = tuple(r for r in responses if r.strip())
        items.append(Item(sample_id, compare.prompt_turns(path, sample), kept, str(sample.get("dataset") or ""),
                          len(responses) - len(kept)))
    return items


def record_id(item: Item, signature: str) -> str:
    """Stable id of a labelled item: sample id, responses and the labeler (its signature)."""
    return hashlib.sha256(json.dumps([item.sample_id, list(item.responses), signature]).encode()).hexdigest()


def feedback_record(item: Item, signature: str, labeler: str, **feedback) -> dict:
    """The generic-schema record of an item (id first: the log's torn-line check relies on it)."""
    return {"id": record_id(item, signature), "sample_id": item.sample_id, "prompt": item.turns,
            "responses": list(item.responses), **feedback, "labeler": labeler, "dataset": item.dataset}


class Sink:
    """Where labelled records go: the append-only log, with a progress bar; `None` (nothing could be parsed)
    is counted, not written, so a rerun asks again."""

    def __init__(self, log: compare.ResultsLog, total: int):
        self.log, self.path = log, log.path
        self.bar = progress(total=total, desc="label", unit="prompt")
        self.written, self.unlabelled = 0, 0
        self._lock = threading.Lock()

    def append(self, record: Optional[dict]) -> None:
        if record is not None:
            self.log.append(record)
        with self._lock:
            self.written += record is not None
            self.unlabelled += record is None
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------- the task's true reward


class TaskLabeler:
    """The built-in task (feedbackalign/task.py): true reward and critique of each response."""

    name = "task"
    signature = "task"

    def label(self, item: Item) -> Optional[dict]:
        if not item.responses:
            return None
        prompt = last_user_turn(item.turns)
        try:
            scores = [task.true_reward(prompt, r) for r in item.responses]
        except DataError:
            raise DataError(f"labeler=task scores the built-in wordsort task only; sample {item.sample_id} "
                            f"({item.dataset or 'no dataset'}) is not a wordsort prompt: use labeler=rm or "
                            "labeler=judge") from None
        return feedback_record(item, self.signature, self.name, scores=scores,
                               judgments=[task.judge(prompt, r) for r in item.responses])

    def run(self, todo: list[Item], sink: Sink) -> compare.RunResult:
        for item in todo:
            sink.append(self.label(item))
        return compare.RunResult(judged=len(todo))


# ---------------------------------------------------------------- reward models


def reward_model_dir(name: str) -> str:
    """A run directory of loss=rm (its LATEST/hf export), a save_pretrained directory, or a hub name."""
    path = Path(name).expanduser()
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        export = path / "LATEST" / "hf"
        if not (export / "config.json").is_file():
            raise ConfigError(f"reward model {name}: run directory without LATEST/hf/config.json (train loss=rm with "
                              "export_hf=true, or give the export's directory)")
        return str(export.resolve())
    return str(path) if path.exists() else name


class RewardModelLabeler:
    """Scores from an AutoModelForSequenceClassification with one label, batched (right padding; the model
    reads each sequence's last non-pad token). Ours (its config has `feedbackalign_reward_input`) gets the
    prompt formatted and truncated as in training and the response without EOS; another model gets its chat
    template's conversation, or the HALOs-style markers and the response when it has none."""

    name = "rm"

    def __init__(self, reward_model: str, batch_size: int = 16, device: Optional[str] = None,
                 dtype: Optional[str] = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from feedbackalign.models import torch_dtype

        self.path = reward_model_dir(reward_model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch_dtype(dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=self.dtype)
        except (OSError, ValueError) as e:
            raise EnvError(f"cannot load reward model '{reward_model}' as a sequence classifier: "
                           f"{str(e).splitlines()[0]} (give loss=rm's run directory, its LATEST/hf, or a hub "
                           "reward model available offline)") from None
        if self.model.config.num_labels != 1:
            raise ConfigError(f"reward model '{reward_model}' has {self.model.config.num_labels} labels; labeler=rm "
                              "reads one scalar score (num_labels=1)")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"rm batch size must be a positive integer, got {batch_size}")
        self.ours = getattr(self.model.config, "feedbackalign_reward_input", None)
        self.signature = f"rm:{self.path}"

    def input_ids(self, turns: list, response: str) -> list[int]:
        tok = self.tokenizer
        if self.ours is not None:
            fmt = dataloader.PromptFormat(**self.ours["prompt_format"])
            templated = dataloader.uses_chat_template(tok)
            prompt = dataloader.encode_prompt(tok, dataloader.format_prompt(turns, tok, fmt), not templated)
            p, (r,) = dataloader.truncate(prompt, [dataloader.encode_response(tok, response)],
                                          self.ours["max_length"], self.ours["max_prompt_length"])
            return list(p) + list(r[:-1])
        if dataloader.uses_chat_template(tok):
            return list(tok.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=True))
        prompt = dataloader.encode_prompt(tok, dataloader.format_prompt(turns, tok))
        return list(prompt) + list(tok(response, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def scores(self, sequences: list[list[int]]) -> list[float]:
        pad = self.tokenizer.pad_token_id
        width = max(map(len, sequences))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=self.device)
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()

    def chunks(self, items: list[Item]):
        """Items in chunks of at most `batch_size` responses (an item is never split)."""
        chunk, size = [], 0
        for item in items:
            if chunk and size + len(item.responses) > self.batch_size:
                yield chunk
                chunk, size = [], 0
            chunk.append(item)
            size += len(item.responses)
        if chunk:
            yield chunk

    def run(self, todo: list[Item], sink: Sink) -> compare.RunResult:
        """Each item's record is appended as soon as its chunk is scored."""
        for chunk in self.chunks(todo):
            sequences = [self.input_ids(c.turns, r) for c in chunk for r in c.responses]
            values = iter(self.scores(sequences) if sequences else [])
            for c in chunk:
                scores = [next(values) for _ in c.responses]
                sink.append(feedback_record(c, self.signature, self.name, scores=scores) if c.responses else None)
        return compare.RunResult(judged=len(todo))


# ---------------------------------------------------------------- an LLM judge

RATING_TEMPLATE = """\
Below is a conversation between a user and an AI assistant, then the assistant's response to the last turn. \
Rate the response's overall quality from 1 (worst) to 10 (best), weighing four aspects as UltraFeedback's \
annotators did:
1. instruction following: it does what the user asked and respects every stated constraint;
2. helpfulness: it is correct, informative and useful, neither padded nor cut short;
3. truthfulness: it states nothing false or made up;
4. honesty: it is confident where it is right and says so where it is unsure.

[Conversation]
{conversation}
[End of conversation]

[Response]
{response}
[End of response]

Give your reasons in at most three sentences. Then end with one final line that is exactly:
Rating: <an integer from 1 to 10>"""

JUDGMENT_TEMPLATE = """\
Below is a conversation between a user and an AI assistant, then the assistant's response to the last turn. \
Judge the response as a careful reviewer: name each specific error in it (a wrong fact or result, an instruction \
missed or broken, something missing or something that does not belong), quoting the words at fault, in one to \
three sentences. Do not rewrite the response. If it has no error, the judgment is exactly: No error.

[Conversation]
{conversation}
[End of conversation]

[Response]
{response}
[End of response]

End with one final line that is "Judgment: " followed by your judgment."""

_RATING = re.compile(r"rating\s*:\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.IGNORECASE)
_JUDGMENT = re.compile(r"^\W*judgment\s*:\s*\**\s*(.*)$", re.IGNORECASE | re.DOTALL | re.MULTILINE)
_NO_ERROR = re.compile(r"no (errors?|faults?)( found)?\W*", re.IGNORECASE)
NO_ERROR = "no error"   # parse_judgment's value for a response the judge finds faultless (null in the record)


def single_messages(template: str, turns: list, response: str) -> list[dict]:
    user = template.format(conversation=compare.render_conversation(turns), response=response)
    return [{"role": "system", "content": compare.SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_rating(answer: Optional[str]) -> Optional[float]:
    """The 1-10 rating on the answer's last non-empty line `Rating: N` (markdown and '/10' allowed), else None."""
    lines = [line for line in (answer or "").splitlines() if line.strip()]
    match = _RATING.fullmatch(lines[-1].strip().strip("*_`#> ").rstrip(".").strip("*_` ")) if lines else None
    value = float(match.group(1)) if match else None
    return value if value is not None and 1 <= value <= 10 else None


def parse_judgment(answer: Optional[str]) -> Optional[str]:
    """The text after the last `Judgment:`; NO_ERROR for "No error"; None when there is no judgment."""
    found = _JUDGMENT.findall(answer or "")
    text = " ".join(found[-1].split()).strip("*_` ") if found else ""
    if not text:
        return None
    return NO_ERROR if _NO_ERROR.fullmatch(text) else text


@dataclass
class JudgeLabeler:
    """Labels through compare.py's Judge (its retry loop, backoff and stop); one item per thread-pool task."""

    judge: compare.Judge
    mode: str
    concurrency: int = 8
    stop: threading.Event = field(default_factory=threading.Event)
    name: str = "judge"

    def __post_init__(self):
        if self.mode not in JUDGE_MODES:
            raise ConfigError(f"judge mode '{self.mode}' is unknown: use one of {', '.join(JUDGE_MODES)}")
        version = PROMPT_VERSION if self.mode != "pairs" else compare.PROMPT_VERSION
        self.signature = f"judge:{self.mode}:{self.judge.model}:{version}"

    def label(self, item: Item) -> Optional[dict]:
        return getattr(self, f"label_{self.mode}")(item)

    def _record(self, item: Item, answers, **feedback) -> dict:
        return feedback_record(item, self.signature, self.name, **feedback,
                               judge={"model": self.judge.model, "mode": self.mode, "answers": answers})

    def _per_response(self, item: Item, template: str, parse, key: str) -> Optional[dict]:
        """One request per response; the responses whose answer parses are the record's (their answers aligned
        with them), the others go to `judge.unparsed` with their answer."""
        answers = [self.judge.ask(single_messages(template, item.turns, r)) for r in item.responses]
        parsed = [parse(a) for a in answers]
        keep = [k for k, v in enumerate(parsed) if v is not None]
        if not keep:
            return None
        kept = Item(item.sample_id, item.turns, tuple(item.responses[k] for k in keep), item.dataset, item.empty)
        values = [None if parsed[k] == NO_ERROR else parsed[k] for k in keep]
        record = self._record(kept, [answers[k] for k in keep], **{key: values})
        record["judge"]["unparsed"] = [{"response": item.responses[k], "answer": answers[k]}
                                       for k in range(len(answers)) if parsed[k] is None]
        return record

    def label_scores(self, item: Item) -> Optional[dict]:
        return self._per_response(item, RATING_TEMPLATE, parse_rating, "scores")

    def label_judgments(self, item: Item) -> Optional[dict]:
        return self._per_response(item, JUDGMENT_TEMPLATE, parse_judgment, "judgments")

    def label_pairs(self, item: Item) -> Optional[dict]:
        """Every pair (i, j), i < j, in both orders (compare.py's prompt and rule): [i, j] when both orders prefer
        i, [j, i] when both prefer j; ties, disagreements and unparseable answers give no pair."""
        if len(item.responses) < 2:
            return None
        pairs, answers = [], []
        for i in range(len(item.responses)):
            for j in range(i + 1, len(item.responses)):
                first = self.judge.ask(compare.judge_messages(item.turns, item.responses[i], item.responses[j]))
                second = self.judge.ask(compare.judge_messages(item.turns, item.responses[j], item.responses[i]))
                outcome = compare.combine(compare.parse_verdict(first), compare.parse_verdict(second))
                answers.append({"pair": [i, j], "outcome": outcome, "answers": [first, second]})
                if outcome in ("win", "loss"):
                    pairs.append([i, j] if outcome == "win" else [j, i])
        return self._record(item, answers, pairs=pairs)

    def run(self, todo: list[Item], sink: Sink) -> compare.RunResult:
        return compare.judge_all(todo, self.label, sink, self.concurrency, self.stop)


def make_judge(model: str, base_url: Optional[str], api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
               max_retries: int = 6, backoff: float = 1.0, backoff_max: float = 60.0, temperature: float = 0.0,
               seed: int = 0, stop: Optional[threading.Event] = None):
    """compare.py's Judge on an openai client (key from the environment only, the client's own retries off);
    returns (judge, client, base_url)."""
    import os

    import openai

    secret = compare.api_key(api_key_env)
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or compare.OPENAI_DEFAULT_URL
    client = openai.OpenAI(api_key=secret, base_url=base_url, timeout=timeout, max_retries=0)
    judge = compare.Judge(client, model, compare.Backoff(max_retries, backoff, backoff_max, seed),
                          stop or threading.Event(), temperature, seed, secret)
    return judge, client, base_url


# ---------------------------------------------------------------- labelling a file


@dataclass
class LabelResult:
    """What a labelling run did; `outcome` is compare.py's RunResult (fatal, exhausted, interrupted...)."""

    items: int
    already: int
    labelled: int
    unlabelled: int
    empty_responses: int
    outcome: compare.RunResult

    @property
    def complete(self) -> bool:
        o = self.outcome
        return not (o.fatal or o.exhausted or o.write_error or o.interrupted)


def label_file(samples: Path, out: Path, labeler) -> LabelResult:
    """Label every item of `samples` missing from `out` with `labeler`, appending each record as it comes."""
    items = read_samples(samples)
    planned = {record_id(item, labeler.signature) for item in items}
    log = compare.ResultsLog(Path(out), LABEL_RECORDS)
    try:
        foreign = [i for i in log.done_ids if i not in planned]
        if foreign:
            raise DataError(f"feedback file {out} holds {len(foreign)} record(s) of other samples or another labeler "
                            f"than {labeler.signature} on {samples}: pass another -o, or delete it to label again")
        todo = [item for item in items if record_id(item, labeler.signature) not in log.done_ids]
        sink = Sink(log, len(todo))
        try:
            outcome = labeler.run(todo, sink)
        finally:
            sink.close()
    finally:
        log.close()
    return LabelResult(len(items), len(items) - len(todo), sink.written, sink.unlabelled,
                       sum(item.empty for item in items), outcome)


def records(path: Path) -> list[dict]:
    """The complete records of a feedback file written by label.py (a torn last line ignored)."""
    return compare.read_results(Path(path), LABEL_RECORDS)

