"""Tokenised, sharded microbatches for every loss, built from `feedback.Dataset`s.

Each DataLoader flattens Examples into its unit (SFT target, pair, unpaired item, K-group, judgment pair),
formats the prompt (the tokenizer's chat template, else HALOs-style prefixes), tokenises prompt and response
separately (Response = text + EOS), truncates by the HALOs rule and yields this rank's microbatches as named
`batches.Batch`es; `batch_kind` names the layout (batches.KINDS), which a Trainer must declare it trains on:

- SFTDataLoader                 sft              targets
- ConditionalSFTDataLoader      conditional_sft  targets (prompt + <|good|>/<|bad|>); desirable
- PairedPreferenceDataLoader    pairs            chosen, rejected; chosen_scores / rejected_scores when known
- UnpairedPreferenceDataLoader  unpaired         targets, kl_partners (kl_i = prompt_i + response_{i+1 mod B});
                                                 desirable, scores
- RewardDataLoader              groups           responses (B*K, row-major, one K per microbatch); rewards (B, K)
- JudgmentDataLoader (CUT)      judged           judged (judgment-conditioned prompt, or plain for positives),
                                                 plain (plain prompt, identical response ids); weight_unlike

Sharding: `batch_size` is the global batch (items per optimizer step). It is cut into world_size x accumulation
chunks of m items; chunk c goes to rank c % world_size as accumulation microbatch c // world_size, so any
(world_size, accumulation) with the same product sees the same microbatches. Each epoch's order is a
permutation drawn from (seed, epoch), identical on every rank; the final partial global batch of an epoch is
dropped (a different remainder each epoch when shuffling). `n_examples` (items, as in HALOs) wins over
`n_epochs`; the run is ceil(n_examples / batch_size) steps and may span epochs. An evaluation loader
(`drop_last=False`, in order) makes one pass over the first `n_examples` items, its last batch smaller when they
do not fill one (split as evenly as possible over the processes), so an eval split smaller than a batch is
evaluated whole.

Resume: `state_dict()` holds the next global step; a step counts as done once its last microbatch has been
handed out. Every `iter()` starts at step 0, or at the step given to `load_state_dict`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from jinja2 import TemplateError

from feedbackalign.batches import Batch, Sequence
from feedbackalign.errors import CheckpointError, ConfigError, DataError
from feedbackalign.feedback import (ROLES, Dataset, Example, check_finite_scores, desirable_of, groups_of, has_scores,
                                    pairs_of)
from feedbackalign.models import CONTROL_TOKENS

GOOD_TOKEN, BAD_TOKEN = CONTROL_TOKENS  # CSFT control tokens (Korbak et al. 2023, as in HALOs)

# CUT's Alpaca templates (wwxu21/CUT templates/alpaca.json, Apache-2.0): plain and judgment-conditioned.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_JUDGE_PROMPT = ("Below is an instruction that describes a task. Write a response to the instruction and the "
                       "response should match the corresponding judgment.\n\n### Instruction:\n{instruction}\n\n"
                       "### Judgment:\n{judgment}\n\n### Response:\n")
# Chat format: the judgment is appended to the last user turn, so it sits right before the response (as in CUT).
CHAT_JUDGMENT = "{content}\n\nJudgment of the response to write: {judgment}"


@dataclass(frozen=True)
class PromptFormat:
    """HALOs-style turn markers, used when the tokenizer has no chat template."""

    human_prefix: str = "<|user|>\n"
    human_suffix: str = "\n"
    assistant_prefix: str = "<|assistant|>\n"
    assistant_suffix: str = "\n"
    system_prefix: str = "<|system|>\n"

    @classmethod
    def from_config(cls, model_config) -> "PromptFormat":
        """The markers of a model config (`model.human_prefix` ...)."""
        return cls(**{name: model_config[name] for name in cls.__dataclass_fields__})


# ---------------------------------------------------------------- formatting, tokenising, truncating


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(turns: list[dict], tokenizer, fmt: PromptFormat = PromptFormat(), where: str = "prompt") -> str:
    """The prompt text ending where the response starts: the chat template with a generation prompt, else
    user = human_prefix+content+human_suffix, assistant = assistant_prefix+content+assistant_suffix,
    system = system_prefix+content+human_suffix, then the final assistant_prefix (HALOs)."""
    if uses_chat_template(tokenizer):
        clean = [{"role": t["role"], "content": t["content"]} for t in turns]
        try:
            return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except (TemplateError, ValueError, TypeError) as e:
            raise DataError(f"{where}: the tokenizer's chat template rejects this prompt ({e}); drop such "
                            "turns from the data or use a model whose template accepts them") from None
    marks = {"user": (fmt.human_prefix, fmt.human_suffix), "system": (fmt.system_prefix, fmt.human_suffix),
             "assistant": (fmt.assistant_prefix, fmt.assistant_suffix)}
    return "".join(marks[t["role"]][0] + t["content"] + marks[t["role"]][1] for t in turns) + fmt.assistant_prefix


def encode_prompt(tokenizer, text: str, special: bool = True) -> tuple[int, ...]:
    """Prompt ids; `special` adds the tokenizer's BOS (off for chat-template text, which already has it).
    A trailing EOS some tokenizers append is removed: the prompt must flow into the response."""
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if special and ids and ids[-1] == tokenizer.eos_token_id and not text.endswith(str(tokenizer.eos_token)):
        ids = ids[:-1]
    return tuple(ids)


def encode_response(tokenizer, text: str) -> tuple[int, ...]:
    """Response ids: the text's tokens (no special tokens) + EOS."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) + (tokenizer.eos_token_id,)


def truncate(prompt_ids: tuple, responses: list[tuple], max_length: int, max_prompt_length: int):
    """HALOs/DPO rule for a prompt shared by its responses: if prompt + longest response > max_length, keep the
    END of the prompt to max_prompt_length tokens; then cut each response to max_length - len(prompt),
    keeping its start. Returns (prompt_ids, [response_ids])."""
    longest = max(len(r) for r in responses)
    if len(prompt_ids) + longest > max_length and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length:]
    room = max_length - len(prompt_ids)
    return prompt_ids, [r[:room] for r in responses]


# ---------------------------------------------------------------- checking and choosing from Examples


def check_example(ex: Example, where: str) -> None:
    """Raise DataError (naming the record and field) when an Example is malformed."""
    if not isinstance(ex.prompt, list) or not ex.prompt:
        raise DataError(f"{where}: field 'prompt' must be a non-empty list of turns")
    for k, turn in enumerate(ex.prompt):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: prompt turn {k} must be {{'role': one of {', '.join(ROLES)}, "
                            f"'content': str}}, got {turn!r:.80}")
    n = len(ex.generations)
    for k, g in enumerate(ex.generations):
        if not isinstance(g, str):
            raise DataError(f"{where}: generation {k} must be a string, got {type(g).__name__}")
    for name in ("scores", "desirable", "judgments"):
        values = getattr(ex, name)
        if values is not None and len(values) != n:
            raise DataError(f"{where}: field '{name}' has {len(values)} entries for {n} generations")
    for i, j in ex.pairs:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise DataError(f"{where}: pair ({i}, {j}) must name two different generations among {n}")
    if ex.sft_index is not None and not 0 <= ex.sft_index < n:
        raise DataError(f"{where}: sft_index {ex.sft_index} is out of range for {n} generations")
    check_finite_scores(ex)


def sft_target(ex: Example) -> Optional[int]:
    """The SFT target: sft_index, else the best-scored, else the first chosen/desirable generation."""
    if ex.sft_index is not None:
        return ex.sft_index
    if has_scores(ex):
        return max(range(len(ex.scores)), key=lambda i: (ex.scores[i], -i))
    return next((i for i, d in enumerate(desirable_of(ex)) if d), None)


def judgment_of(ex: Example, i: int) -> Optional[str]:
    """Generation i's critique text, or None."""
    if ex.judgments is None or not isinstance(ex.judgments[i], str) or not ex.judgments[i].strip():
        return None
    return ex.judgments[i]


def single_user_instruction(ex: Example, where: str) -> str:
    """The instruction for an Alpaca template: the prompt must be one user turn."""
    if len(ex.prompt) != 1 or ex.prompt[0]["role"] != "user":
        raise DataError(f"{where}: prompt_template=alpaca needs a single user turn, this prompt has "
                        f"{len(ex.prompt)} turn(s); use prompt_template=chat")
    return ex.prompt[0]["content"]


def with_judgment(turns: list[dict], judgment: str) -> list[dict]:
    """The chat prompt with the judgment appended to its last user turn (CHAT_JUDGMENT)."""
    turns = [dict(t) for t in turns]
    last = max((k for k, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last is None:
        return turns + [{"role": "user", "content": CHAT_JUDGMENT.format(content="", judgment=judgment).lstrip()}]
    turns[last]["content"] = CHAT_JUDGMENT.format(content=turns[last]["content"], judgment=judgment)
    return turns


@dataclass(frozen=True, eq=False)
class Item:
    """One global-batch element: an Example and the generation indices of its unit."""

    example: Example
    gens: tuple[int, ...]
    values: Optional[tuple[float, ...]] = None   # rewards of a group / scores of a pair or an item
    label: Optional[bool] = None                 # desirable (unpaired, CSFT)
    judgment: Optional[str] = None               # CUT: the critique of a negative


# ---------------------------------------------------------------- the base loader


class DataLoader:
    """Shared machinery: options, item collection, epoch order, sharding, tokenisation cache, resume.
    `batch_size_key` is the config key that set `batch_size` (model.batch_size or model.eval_batch_size), named
    in the error when a split holds less than one batch."""

    batch_kind: str = ""           # the Batch layout it yields (batches.KINDS)
    OPTIONS: dict[str, Any] = {}
    NEEDS = "generations"          # what the loss needs, for errors
    SKIPPED = "examples that give no unit"   # what items_of counts as skipped, for the warning

    def __init__(self, datasets: list[Dataset], tokenizer, *, split: str = "train", batch_size: int,
                 gradient_accumulation_steps: int = 1, rank: int = 0, world_size: int = 1, max_length: int = 512,
                 max_prompt_length: int = 256, seed: int = 0, n_epochs: Optional[int] = None,
                 n_examples: Optional[int] = None, shuffle: bool = True, drop_last: bool = True,
                 prompt_format: PromptFormat = PromptFormat(), batch_size_key: str = "batch_size", **loader_options):
        self.name = type(self).__name__
        self.options = self._check_options(loader_options)
        self.tokenizer, self.split, self.seed, self.shuffle = tokenizer, split, int(seed), bool(shuffle)
        self.batch_size, self.accum = int(batch_size), int(gradient_accumulation_steps)
        self.rank, self.world_size = int(rank), int(world_size)
        self.max_length, self.max_prompt_length = int(max_length), int(max_prompt_length)
        self.fmt = prompt_format
        self.drop_last = bool(drop_last)
        self._check_settings(n_epochs, n_examples)
        self.microbatch_size = self.batch_size // (self.world_size * self.accum)
        self._prompt_ids: dict[tuple[str, bool], tuple[int, ...]] = {}
        self._response_ids: dict[str, tuple[int, ...]] = {}
        self._prompt_text: dict[int, tuple[Example, str]] = {}
        self._setup()
        self.items = self._collect(datasets)
        if not self.drop_last and n_examples is not None:
            self.items = self.items[:int(n_examples)]   # an evaluation: the first n_examples items, once
        self._buckets = self._bucket_items()
        first_epoch = self.epoch_batches(0)
        self.steps_per_epoch = len(first_epoch)
        self.items_per_epoch = sum(map(len, first_epoch))   # every item but a dropped remainder
        if self.steps_per_epoch == 0:
            if self.drop_last:
                raise DataError(f"{self.name}: {self._size_text()} fewer than one global batch ({batch_size_key}="
                                f"{self.batch_size}) on split '{split}'; lower {batch_size_key} or add data")
            raise DataError(f"{self.name}: {self._size_text()} fewer than one item per process "
                            f"({self.world_size * self.accum}) on split '{split}'; add data or run fewer processes")
        if not self.drop_last:
            left = len(self.items) - self.items_per_epoch
            if left:
                warnings.warn(f"{self.name}: the last {left} item(s) of split '{split}' are fewer than one per "
                              f"process ({self.world_size * self.accum}) and are not evaluated")
        if n_examples is not None and self.drop_last:
            self.total_steps = math.ceil(int(n_examples) / self.batch_size)
        else:
            self.total_steps = self.steps_per_epoch * (int(n_epochs) if n_epochs is not None else 1)
        self._start_step = 0
        self._position = 0

    # -- configuration

    def _check_options(self, given: dict) -> dict:
        unknown = sorted(set(given) - set(self.OPTIONS))
        if unknown:
            valid = ", ".join(sorted(self.OPTIONS)) or "none"
            raise ConfigError(f"{self.name} got unknown option(s) {', '.join(repr(u) for u in unknown)}; "
                            f"valid options: {valid}")
        return {**self.OPTIONS, **given}

    def _check_settings(self, n_epochs, n_examples) -> None:
        parts = self.world_size * self.accum
        if self.world_size < 1 or self.accum < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"{self.name}: need world_size >= 1, gradient_accumulation_steps >= 1 and "
                            f"0 <= rank < world_size; got {self.world_size}, {self.accum}, {self.rank}")
        if self.batch_size < 1 or self.batch_size % parts:
            raise ConfigError(f"{self.name}: batch_size {self.batch_size} must be a positive multiple of world_size "
                            f"x gradient_accumulation_steps = {self.world_size} x {self.accum} = {parts}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"{self.name}: need 0 < max_prompt_length < max_length so every response keeps a "
                            f"token; got {self.max_prompt_length} and {self.max_length}")
        for key, value in (("n_epochs", n_epochs), ("n_examples", n_examples)):
            if value is not None and int(value) < 1:
                raise ConfigError(f"{self.name}: {key} must be a positive integer or null, got {value}")
        if self.tokenizer.eos_token_id is None:
            raise ConfigError(f"{self.name}: the tokenizer has no EOS token; every response ends with EOS")

    def _setup(self) -> None:
        """Subclass hook: validate options before items are collected."""

    # -- items

    def items_of(self, ex: Example, where: str) -> tuple[list[Item], int]:
        """The units of one Example and how many of its labelled generations had to be skipped."""
        raise NotImplementedError

    def _collect(self, datasets: list[Dataset]) -> list[Item]:
        if not datasets:
            raise ConfigError(f"{self.name}: no datasets given; set datasets=[...] in the config")
        items: list[Item] = []
        for ds in datasets:
            if len(ds) == 0:
                raise DataError(f"{self.name}: dataset '{ds.name}' (split {self.split}) is empty")
            found, skipped = [], 0
            for k, ex in enumerate(ds):
                where = ex.source or f"dataset '{ds.name}' example {k}"
                check_example(ex, where)
                new, bad = self.items_of(ex, where)
                if new:
                    self.prompt_text(ex)   # format now: a prompt the template rejects fails before training
                found += new
                skipped += bad
            if not found:
                raise DataError(f"{self.name} needs {self.NEEDS}; dataset '{ds.name}' (split {self.split}) has none")
            if skipped:
                warnings.warn(f"{self.name}: skipped {skipped} {self.SKIPPED} in dataset '{ds.name}'")
            items += found
        return items

    def _bucket_key(self, item: Item) -> int:
        return 0

    def _bucket_items(self) -> list[np.ndarray]:
        keys: dict[int, list[int]] = {}
        for n, item in enumerate(self.items):
            keys.setdefault(self._bucket_key(item), []).append(n)
        return [np.array(keys[k], dtype=np.int64) for k in sorted(keys)]

    def _size_text(self) -> str:
        return f"{len(self.items)} items is"

    # -- order and sharding

    def _rng(self, *words: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % 2**63, *words])

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches (item indices) of one epoch: each bucket permuted from (seed, epoch) and cut
        into batch_size chunks, its remainder dropped (drop_last, training) or kept as a last, smaller batch
        when it holds at least one item per process (evaluation); with several buckets the batches are then
        shuffled."""
        rng = self._rng(epoch, 0)
        batches = []
        for bucket in self._buckets:
            order = bucket[rng.permutation(len(bucket))] if self.shuffle else bucket
            usable = len(order) // self.batch_size * self.batch_size
            if not self.drop_last and len(order) - usable >= self.world_size * self.accum:
                usable = len(order)
            batches += [order[k:k + self.batch_size] for k in range(0, usable, self.batch_size)]
        if self.shuffle and len(self._buckets) > 1:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        """Number of optimizer steps of the whole run."""
        return self.total_steps

    def __iter__(self) -> Iterator[Batch]:
        batches, batches_epoch = None, -1
        for step in range(self._start_step, self.total_steps):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch != batches_epoch:
                batches, batches_epoch = self.epoch_batches(epoch), epoch
            chunks = np.array_split(batches[pos], self.world_size * self.accum)  # equal, but in a last eval batch
            for micro in range(self.accum):
                out = self.collate([self.items[n] for n in chunks[micro * self.world_size + self.rank]])
                out.step, out.micro, out.epoch = step, micro, epoch
                if micro == self.accum - 1:
                    self._position = step + 1
                yield out

    def state_dict(self) -> dict:
        """The data position (next global step) and what it is valid for; plain ints, JSON-safe."""
        return {"next_step": self._position, "seed": self.seed, "batch_size": self.batch_size,
                "n_items": len(self.items), "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration starts at state['next_step'] (checked against this run's data)."""
        have = {"seed": self.seed, "batch_size": self.batch_size, "n_items": len(self.items)}
        for key, value in have.items():
            if key in state and int(state[key]) != value:
                raise CheckpointError(f"{self.name}: resume state has {key}={state[key]} but this run has {value}; "
                                "resume with the same datasets, split, seed, batch_size and loader options")
        if "next_step" not in state:
            raise CheckpointError(f"{self.name}: resume state has no 'next_step'; pass a dict from state_dict()")
        step = int(state["next_step"])
        if not 0 <= step <= self.total_steps:
            raise CheckpointError(f"{self.name}: resume step {step} is outside this run's {self.total_steps} steps; "
                            "use the same n_epochs/n_examples as the saved run")
        self._start_step = self._position = step

    # -- tokenisation (cached per distinct text)

    def prompt_text(self, ex: Example) -> str:
        """The formatted inference prompt of an Example (cached)."""
        cached = self._prompt_text.get(id(ex))
        if cached is None or cached[0] is not ex:
            cached = self._prompt_text[id(ex)] = (ex, format_prompt(ex.prompt, self.tokenizer, self.fmt,
                                                                     ex.source or "prompt"))
        return cached[1]

    def prompt_ids(self, text: str, templated: bool) -> tuple[int, ...]:
        key = (text, templated)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = encode_prompt(self.tokenizer, text, special=not templated)
        return self._prompt_ids[key]

    def response_ids(self, text: str) -> tuple[int, ...]:
        if text not in self._response_ids:
            self._response_ids[text] = encode_response(self.tokenizer, text)
        return self._response_ids[text]

    def sequences(self, prompt: str, responses: list[str], templated: Optional[bool] = None) -> list[Sequence]:
        """Sequences of one prompt and its responses, truncated jointly (they keep identical prompt ids)."""
        templated = uses_chat_template(self.tokenizer) if templated is None else templated
        p, rs = truncate(self.prompt_ids(prompt, templated), [self.response_ids(r) for r in responses],
                         self.max_length, self.max_prompt_length)
        return [Sequence(p, r) for r in rs]

    # -- batches

    def collate(self, items: list[Item]) -> Batch:
        """One microbatch of this loader's `batch_kind`."""
        raise NotImplementedError

    def _batch(self, items: list[Item], parts: dict[str, list[Sequence]], **values: torch.Tensor) -> Batch:
        return Batch(self.batch_kind, parts, values, prompts=[self.prompt_text(it.example) for it in items],
                     sources=[it.example.source for it in items])


# ---------------------------------------------------------------- the six loaders


class SFTDataLoader(DataLoader):
    """SFT: one target per Example (sft_index, else best-scored, else chosen/desirable); N = B."""

    batch_kind = "sft"
    NEEDS = "an SFT target (sft_index, scores, pairs, desirable labels or unjudged generations)"
    SKIPPED = "example(s) with no SFT target"

    def items_of(self, ex, where):
        target = sft_target(ex) if ex.generations else None
        return ([Item(ex, (target,))], 0) if target is not None else ([], 1)

    def collate(self, items):
        seqs = [self.sequences(self.prompt_text(it.example), [it.example.generations[it.gens[0]]])[0]
                for it in items]
        return self._batch(items, {"targets": seqs})


class ConditionalSFTDataLoader(DataLoader):
    """CSFT (Korbak et al. 2023; HALOs): every labelled generation is an SFT target whose prompt ends with
    <|good|> (desirable) or <|bad|> (undesirable), as the original HALOs appends it to the prompt; the token is
    masked from the labels. At sampling time condition on `GOOD_TOKEN`: format_prompt(...) + GOOD_TOKEN."""

    batch_kind = "conditional_sft"
    OPTIONS = {"desirable_threshold": None, "chosen_control_token": GOOD_TOKEN, "rejected_control_token": BAD_TOKEN}
    NEEDS = "desirable labels, scores, judgments or pairs"

    def _setup(self):
        vocab = self.tokenizer.get_vocab()
        for key in ("chosen_control_token", "rejected_control_token"):
            token = self.options[key]
            if token not in vocab:
                raise ConfigError(f"{self.name}: {key} '{token}' is not a token of the tokenizer; build it with "
                                  "builders.build_tokenizer (which adds a CSFT run's control tokens) or add it as a "
                                  "special token")
        self.good_token = self.options["chosen_control_token"]
        self.bad_token = self.options["rejected_control_token"]

    def items_of(self, ex, where):
        labels = desirable_of(ex, self.options["desirable_threshold"])
        return [Item(ex, (i,), label=d) for i, d in enumerate(labels) if d is not None], 0

    def collate(self, items):
        seqs = []
        for it in items:
            token = self.good_token if it.label else self.bad_token
            seqs += self.sequences(self.prompt_text(it.example) + token, [it.example.generations[it.gens[0]]])
        return self._batch(items, {"targets": seqs},
                           desirable=torch.tensor([bool(it.label) for it in items], dtype=torch.bool))


class PairedPreferenceDataLoader(DataLoader):
    """DPO-style pairs from feedback.pairs_of; N = 2B: chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}.
    `chosen_scores`/`rejected_scores` (B,) are present when every pair of the microbatch has scores."""

    batch_kind = "pairs"
    OPTIONS = {"pair_mode": "best_worst", "pair_margin": 0.0}
    NEEDS = "preference pairs or scores"

    def _setup(self):
        if self.options["pair_mode"] not in ("best_worst", "all"):
            raise ConfigError(f"{self.name}: pair_mode '{self.options['pair_mode']}' is unknown; use best_worst or all")

    def items_of(self, ex, where):
        scored = ex.scores is not None
        items = []
        for i, j in pairs_of(ex, self.options["pair_mode"], float(self.options["pair_margin"])):
            known = scored and ex.scores[i] is not None and ex.scores[j] is not None
            items.append(Item(ex, (i, j), values=(ex.scores[i], ex.scores[j]) if known else None))
        return items, 0

    def collate(self, items):
        chosen, rejected = [], []
        for it in items:
            c, r = self.sequences(self.prompt_text(it.example), [it.example.generations[k] for k in it.gens])
            chosen.append(c)
            rejected.append(r)
        scores = {}
        if all(it.values is not None for it in items):
            scores = {"chosen_scores": torch.tensor([it.values[0] for it in items], dtype=torch.float32),
                      "rejected_scores": torch.tensor([it.values[1] for it in items], dtype=torch.float32)}
        return self._batch(items, {"chosen": chosen, "rejected": rejected}, **scores)


class UnpairedPreferenceDataLoader(DataLoader):
    """KTO (Ethayarajh et al. 2024): items (prompt, generation, desirable) from feedback.desirable_of;
    N = 2B: targets, then KL partners kl_i = (prompt_i, response of item (i+1) mod B), the mismatched pairs
    KTO's reference point needs. Tensors: desirable (B,) bool, scores (B,) float (the generation's score,
    else +1/-1; PPO's reward). Each sequence is truncated on its own, as in HALOs."""

    batch_kind = "unpaired"
    OPTIONS = {"desirable_threshold": None}
    NEEDS = "desirable labels, scores, judgments or pairs"

    def _setup(self):
        if self.microbatch_size < 2:
            warnings.warn(f"{self.name}: microbatches of 1 item pair each prompt with its own response as KL "
                          "partner; use batch_size >= 2 x world_size x gradient_accumulation_steps for KTO")

    def items_of(self, ex, where):
        items = []
        for i, d in enumerate(desirable_of(ex, self.options["desirable_threshold"])):
            if d is not None:
                known = ex.scores is not None and ex.scores[i] is not None
                items.append(Item(ex, (i,), values=(float(ex.scores[i]) if known else (1.0 if d else -1.0),), label=d))
        return items, 0

    def collate(self, items):
        texts = [it.example.generations[it.gens[0]] for it in items]
        targets, partners = [], []
        for k, it in enumerate(items):
            prompt = self.prompt_text(it.example)
            targets += self.sequences(prompt, [texts[k]])
            partners += self.sequences(prompt, [texts[(k + 1) % len(items)]])
        return self._batch(items, {"targets": targets, "kl_partners": partners},
                           desirable=torch.tensor([bool(it.label) for it in items], dtype=torch.bool),
                           scores=torch.tensor([it.values[0] for it in items], dtype=torch.float32))


class RewardDataLoader(DataLoader):
    """NCA/InfoNCA (Chen et al. 2024): K-groups from feedback.groups_of (n_responses = K kept, None = all);
    N = B*K row-major, `rewards` (B, K). Groups are bucketed by K so every microbatch has one K; each bucket's
    remainder that does not fill a global batch is dropped for that epoch (a different one each epoch).
    Groups with fewer than n_responses generations keep their own K. Pairs-only data: K=2, rewards (1, 0)."""

    batch_kind = "groups"
    OPTIONS = {"n_responses": None}
    NEEDS = "K responses with scores, or preference pairs"

    def _setup(self):
        k = self.options["n_responses"]
        if k is not None and (int(k) != k or int(k) < 2):
            raise ConfigError(f"{self.name}: n_responses must be an integer >= 2 or null, got {k}")

    def items_of(self, ex, where):
        k = self.options["n_responses"]
        groups = groups_of(ex, None if k is None else int(k))
        return [Item(ex, tuple(idx), values=tuple(float(r) for r in rw)) for idx, rw in groups], 0

    def _bucket_key(self, item):
        return len(item.gens)

    def _size_text(self):
        sizes = ", ".join(f"K={len(self.items[b[0]].gens)}: {len(b)}" for b in self._buckets)
        return f"no K bucket has enough groups ({sizes}); each is"

    def collate(self, items):
        seqs = []
        for it in items:
            seqs += self.sequences(self.prompt_text(it.example), [it.example.generations[k] for k in it.gens])
        return self._batch(items, {"responses": seqs},
                           rewards=torch.tensor([it.values for it in items], dtype=torch.float32))


class JudgmentDataLoader(DataLoader):
    """CUT (Xu et al. 2023): a judged response gives row i = judgment-conditioned prompt + response and
    row B+i = plain prompt + the identical response ids; a positive (no judgment / desirable) gives the plain
    sequence in both rows. `weight_unlike` (B,): -1 for positives, the option for negatives (as CUT's data).
    Generations without judgments use desirable_of: desirable -> positive; undesirable without a judgment
    text cannot be a CUT negative and is skipped (counted in a warning). `downsample` keeps
    int(downsample x #negatives) positives, chosen once from the seed (CUT's finetune_unlikelihood.py: positives
    are sampled relative to the judged negatives; None keeps all). prompt_template: alpaca = CUT's templates
    (single-turn prompts), chat = the loader's format with the judgment appended to the last user turn."""

    batch_kind = "judged"
    OPTIONS = {"weight_unlike": 1.0, "downsample": None, "prompt_template": "chat"}
    NEEDS = "judgments or desirable generations"
    SKIPPED = "undesirable generation(s) without a judgment text (a CUT negative needs one)"

    def _setup(self):
        if self.options["prompt_template"] not in ("chat", "alpaca"):
            raise ConfigError(f"{self.name}: prompt_template '{self.options['prompt_template']}' is unknown; "
                            "use chat or alpaca")
        d = self.options["downsample"]
        if d is not None and not float(d) >= 0:
            raise ConfigError(f"{self.name}: downsample is the number of positives kept per judged negative "
                            f"(>= 0); got {d}")

    def items_of(self, ex, where):
        if self.options["prompt_template"] == "alpaca":
            single_user_instruction(ex, where)
        labels, items, skipped = desirable_of(ex), [], 0
        for i in range(len(ex.generations)):
            text = judgment_of(ex, i)
            if text is not None:
                items.append(Item(ex, (i,), judgment=text))
            elif labels[i] is True:
                items.append(Item(ex, (i,)))
            elif labels[i] is False:
                skipped += 1
        return items, skipped

    def _collect(self, datasets):
        items = super()._collect(datasets)
        if not any(it.judgment is not None for it in items):
            names = ", ".join(f"'{d.name}'" for d in datasets)
            raise DataError(f"{self.name} needs natural-language judgments; datasets {names} have none "
                            "(without them CUT is plain SFT: use the sft loss)")
        positives = [n for n, it in enumerate(items) if it.judgment is None]
        if self.options["downsample"] is None:
            return items
        negatives = len(items) - len(positives)
        keep = min(len(positives), int(negatives * float(self.options["downsample"])))
        kept = set(self._rng(0, 1).choice(positives, size=keep, replace=False).tolist()) if keep else set()
        return [it for n, it in enumerate(items) if it.judgment is not None or n in kept]

    def prompt_text(self, ex):
        if self.options["prompt_template"] == "alpaca":
            return ALPACA_PROMPT.format(instruction=ex.prompt[0]["content"])
        return super().prompt_text(ex)

    def _judged_prompt(self, ex: Example, judgment: str) -> str:
        if self.options["prompt_template"] == "alpaca":
            return ALPACA_JUDGE_PROMPT.format(instruction=ex.prompt[0]["content"], judgment=judgment)
        return format_prompt(with_judgment(ex.prompt, judgment), self.tokenizer, self.fmt, ex.source or "prompt")

    def collate(self, items):
        templated = self.options["prompt_template"] == "chat" and uses_chat_template(self.tokenizer)
        first, second, weights = [], [], []
        for it in items:
            response = it.example.generations[it.gens[0]]
            plain = self.sequences(self.prompt_text(it.example), [response], templated)[0]
            if it.judgment is None:
                first.append(plain)
                second.append(plain)
                weights.append(-1.0)
                continue
            judged = self.sequences(self._judged_prompt(it.example, it.judgment), [response], templated)[0]
            shared = min(judged.response_ids, plain.response_ids, key=len)   # both are prefixes of one response
            first.append(Sequence(judged.prompt_ids, shared))
            second.append(Sequence(plain.prompt_ids, shared))
            weights.append(float(self.options["weight_unlike"]))
        return self._batch(items, {"judged": first, "plain": second},
                           weight_unlike=torch.tensor(weights, dtype=torch.float32))
