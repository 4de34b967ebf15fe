"""Config values checked before anything is built or written: one ConfigError line naming the key, its value,
the rule and what to do. `validate(cfg, world_size)` runs first thing in `builders.build_trainer` (after the
command line's names and keys are known to exist, before data, models and disk).

Loss hyper-parameters are checked by key wherever a loss config has one, with the range the paper defines:
temperatures and scales (beta, tau, alpha, cliprange, delta) are > 0, weights and coefficients >= 0,
probabilities and discounts in their intervals; TRAINER_RANGES holds a trainer's own meaning of a shared key
(GRPO's beta is a KL weight, 0 allowed). A new loss whose keys are not listed here gets no check.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig

from feedbackalign.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """A range of real numbers; `low_open` / `high_open` exclude the end."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def contains(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return math.isfinite(x) and above and below

    def text(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Interval(0.0, low_open=True)
NON_NEGATIVE = Interval(0.0)
UNIT = Interval(0.0, 1.0)

# loss.<key>: the range its paper gives it
LOSS_RANGES = {
    "beta": Interval(0.0, low_open=True, why="the inverse temperature of the implicit reward (DPO, KTO, NCA, "
                                             "SimPO); <= 0 reverses or removes the preference"),
    "tau": Interval(0.0, low_open=True, why="IPO's regularisation; the target margin is 1/(2 tau)"),
    "alpha": Interval(0.0, low_open=True, why="NCA/InfoNCA's reward temperature (softmax(r / alpha)), ORPO's "
                                              "odds-ratio weight"),
    "label_smoothing": Interval(0.0, 0.5, high_open=True, why="cDPO's label noise; 0.5 makes chosen and rejected "
                                                              "interchangeable"),
    "desirable_weight": Interval(0.0, why="KTO's lambda_D"),
    "undesirable_weight": Interval(0.0, why="KTO's lambda_U"),
    "delta": Interval(0.0, low_open=True, why="SLiC's calibration margin"),
    "lambda_coef": Interval(0.0, why="SLiC's weight of the chosen NLL"),
    "gamma_beta_ratio": Interval(0.0, why="SimPO's target margin over beta"),
    "threshold": Interval(0.0, why="CUT's probability-ratio threshold for flagging a token"),
    "weight_unlike": Interval(0.0, why="CUT's unlikelihood weight"),
    "downsample": Interval(0.0, why="CUT's positives kept per judged negative"),
    "gamma": Interval(0.0, 1.0, why="PPO's discount"),
    "lam": Interval(0.0, 1.0, why="PPO's GAE lambda"),
    "cliprange": Interval(0.0, 1.0, low_open=True, high_open=True, why="PPO clips the ratio to [1 - c, 1 + c]"),
    "critic_coef": Interval(0.0, why="PPO's value-loss weight"),
    "kl_coef": Interval(0.0, why="PPO's KL-penalty weight"),
    "epsilon": Interval(0.0, 1.0, low_open=True, high_open=True, why="GRPO clips the ratio to [1 - epsilon, "
                                                                     "1 + epsilon]"),
}
# where a trainer gives a key another meaning than LOSS_RANGES' (loss.trainer: {key: range})
TRAINER_RANGES = {
    "GRPOTrainer": {"beta": Interval(0.0, why="GRPO's KL-penalty weight (0: no penalty)")},
}
LR_SCHEDULES = ("constant", "linear", "cosine")
LAYOUTS = ("packed", "padded")


def _where(key: str, value) -> str:
    return f"{key}={value}"


def number(cfg: DictConfig, key: str, rule: Interval, hint: str = "") -> Optional[float]:
    """cfg.<key> as a float checked against `rule` (None stays None)."""
    value = _get(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{_where(key, value)} is not a number; give a value {rule.text()}")
    if not rule.contains(float(value)):
        why = f" ({rule.why})" if rule.why else ""
        raise ConfigError(f"{_where(key, value)} must be {rule.text()}{why}{'; ' + hint if hint else ''}")
    return float(value)


def integer(cfg: DictConfig, key: str, low: int, *, optional: bool = False, hint: str = "") -> Optional[int]:
    """cfg.<key> as an int >= low (null allowed when `optional`)."""
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        null = " or null" if optional else ""
        raise ConfigError(f"{_where(key, value)} must be an integer >= {low}{null}{'; ' + hint if hint else ''}")
    return value


def choice(cfg: DictConfig, key: str, valid) -> None:
    value = _get(cfg, key)
    if value not in valid:
        raise ConfigError(f"{_where(key, value)} is not one of {', '.join(map(str, valid))}")


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return node


def check_exp_name(name) -> None:
    """exp_name names one directory under cache_dir: a single path component, never '.', '..' or empty (with
    overwrite=true those would delete cache_dir itself, other runs and the reference cache included)."""
    text = "" if name is None else str(name)
    bad = not text.strip() or text in (".", "..") or "/" in text or "\0" in text or \
        (os.sep != "/" and os.sep in text) or (os.altsep is not None and os.altsep in text)
    if bad:
        raise ConfigError(f"exp_name={name!r} must be one directory name (no '/', not '.', '..' or empty): the run "
                          "directory is <cache_dir>/<exp_name>; pick a plain name such as exp_name=dpo_run1")


def check_run(cfg: DictConfig, world_size: int) -> None:
    check_exp_name(cfg.get("exp_name"))
    choice(cfg, "use_fsdp", ("auto", True, False))
    integer(cfg, "seed", 0)


def check_optimisation(cfg: DictConfig, world_size: int) -> None:
    number(cfg, "lr", POSITIVE, "e.g. lr=5e-7 for a 7B model, 1e-3 for the tiny one")
    optimizer = cfg.get("optimizer")
    found = getattr(torch.optim, str(optimizer), None)
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        raise ConfigError(f"optimizer={optimizer} is not a torch.optim optimizer; e.g. AdamW, Adam, SGD, RMSprop")
    number(cfg, "weight_decay", NON_NEGATIVE)
    integer(cfg, "warmup_steps", 0)
    choice(cfg, "lr_schedule", LR_SCHEDULES)
    number(cfg, "model.max_grad_norm", POSITIVE)
    number(cfg, "model.head_max_grad_norm", POSITIVE)
    integer(cfg, "max_nonfinite_steps", 1)


def check_batches(cfg: DictConfig, world_size: int) -> None:
    """The global batch splits evenly over processes x accumulation; an eval batch over processes."""
    accum = integer(cfg, "model.gradient_accumulation_steps", 1)
    batch = integer(cfg, "model.batch_size", 1)
    parts = world_size * accum
    if batch % parts:
        raise ConfigError(f"model.batch_size={batch} must be a multiple of processes x "
                          f"model.gradient_accumulation_steps = {world_size} x {accum} = {parts}: every process "
                          f"takes equal microbatches; e.g. model.batch_size={max(parts, batch // parts * parts)}")
    eval_batch = integer(cfg, "model.eval_batch_size", 1)
    if eval_batch % world_size:
        raise ConfigError(f"model.eval_batch_size={eval_batch} must be a multiple of the {world_size} processes; "
                          f"e.g. model.eval_batch_size={max(world_size, eval_batch // world_size * world_size)}")
    integer(cfg, "n_epochs", 1, optional=True)
    integer(cfg, "n_examples", 1, optional=True)
    integer(cfg, "n_eval_examples", 0, optional=True)
    integer(cfg, "eval_every", 1, hint="examples between evaluations")
    integer(cfg, "intermediate_checkpoints", 0, hint="examples between checkpoints; 0 = final checkpoint only")
    integer(cfg, "keep_checkpoints", 0)


def check_model(cfg: DictConfig, world_size: int) -> None:
    max_length = integer(cfg, "model.max_length", 2)
    prompt = integer(cfg, "model.max_prompt_length", 1)
    if prompt >= max_length:
        raise ConfigError(f"model.max_prompt_length={prompt} must be < model.max_length={max_length}: a truncated "
                          "prompt must leave room for the response")
    choice(cfg, "model.forward_layout", LAYOUTS)
    if cfg.model.get("lora") is not None and cfg.model.lora.get("enabled"):
        integer(cfg, "model.lora.r", 1)
        number(cfg, "model.lora.alpha", POSITIVE)
        number(cfg, "model.lora.dropout", Interval(0.0, 1.0, high_open=True))


def check_loss(cfg: DictConfig, world_size: int) -> None:
    loss = cfg.get("loss")
    ranges = {**LOSS_RANGES, **TRAINER_RANGES.get(str(loss.get("trainer")) if loss is not None else "", {})}
    for key, rule in ranges.items():
        if isinstance(loss, DictConfig) and key in loss:
            number(cfg, f"loss.{key}", rule)
    if loss is not None and "desirable_weight" in loss and "undesirable_weight" in loss and \
            loss.desirable_weight == 0 and loss.undesirable_weight == 0:
        raise ConfigError("loss.desirable_weight=0 and loss.undesirable_weight=0 leave KTO nothing to learn; "
                          "set one of them > 0")


CHECKS = (check_run, check_optimisation, check_batches, check_model, check_loss)


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Every value check, in config order; raises the first ConfigError."""
    for check in CHECKS:
        check(cfg, world_size)
