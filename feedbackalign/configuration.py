"""The Hydra configuration: where it lives, composing it outside `@hydra.main` (eval.py, tests, the benchmark),
reading optional nodes as plain dicts, and translating HALOs' command-line keys."""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from feedbackalign.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def compose(overrides: list[str], config_dir: Path = CONFIG_DIR, config_name: str = "config") -> DictConfig:
    """The config train.py would see with these command-line overrides."""
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))


def as_dict(node) -> dict:
    """A plain dict of an optional config node (an empty or missing node is {})."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


# ---------------------------------------------------------------- HALOs' command-line habits
# HALOs' top-level keys, as data: renamed where this project has the same setting, refused with the equivalent
# where it has none. `halos_overrides` applies them to the command line before the config is composed.

HALOS_RENAMED = {  # HALOs key -> this project's key, per program
    "train.py": {"human_prefix": "model.human_prefix", "human_suffix": "model.human_suffix",
                 "assistant_prefix": "model.assistant_prefix", "assistant_suffix": "model.assistant_suffix"},
    "eval.py": {"human_prefix": "model.human_prefix", "human_suffix": "model.human_suffix",
                "assistant_prefix": "model.assistant_prefix", "assistant_suffix": "model.assistant_suffix",
                "saved_policy": "checkpoint"},
}
HALOS_MODES = {  # mode=<value> -> the overrides it stands for here (None: refused, with the line to print)
    "train.py": {"train": []},
    "eval.py": {"sample": ["mode=sample"], "eval": ["mode=eval"],
                "alpacaeval": ["mode=sample", "datasets=[alpacaeval]", "alpaca_eval=true", "n_samples=null"]},
}
HALOS_REFUSED = {  # HALOs key -> what to do here instead
    "debug": "there is no debug mode: set wandb.enabled=false (and export_hf=false, intermediate_checkpoints=0)",
    "fsdp_port": "a free port is picked by itself (several nodes: torchrun --rdzv_endpoint)",
    "local_run_dir": "the run directory is <cache_dir>/<exp_name>: set cache_dir and exp_name",
    "minimum_log_interval_secs": "every step is logged to metrics.jsonl (and W&B with wandb.enabled=true)",
    "frac_unique_desirable": "drop records from the data instead (e.g. a jsonl: file)",
    "frac_unique_undesirable": "drop records from the data instead (e.g. a jsonl: file)",
    "trainer": "the loss config names its trainer: loss.trainer=<Trainer class in trainers.py>",
    "saved_policy": "train.py starts from model.load_from=<run>/LATEST/policy.pt; saved_policy is eval.py's",
}
_OVERRIDE = re.compile(r"^(~|\+\+|\+)?([A-Za-z_]\w*)=(.*)$", re.DOTALL)


def halos_overrides(overrides: list[str], program: str) -> list[str]:
    """The command line with HALOs' top-level keys translated for `program` (train.py or eval.py): renamed
    (human_prefix= -> model.human_prefix=, eval.py's saved_policy= -> checkpoint=), mode= mapped
    (train.py: mode=train; eval.py: sample, eval, alpacaeval), and ConfigError naming the equivalent for the
    rest. Every other argument passes unchanged."""
    out = []
    for arg in overrides:
        match = _OVERRIDE.match(arg)
        if match is None:
            out.append(arg)
            continue
        sign, key, value = match.group(1) or "", match.group(2), match.group(3)
        if key == "mode":
            modes = HALOS_MODES[program]
            if value not in modes:
                other = "eval.py --config-path=<run_dir> ++mode=sample|eval" if program == "train.py" else "train.py"
                raise ConfigError(f"mode={value}: {program} takes mode={' or '.join(modes)}; use {other}")
            out += [f"++{item}" for item in modes[value]]
        elif key in HALOS_RENAMED[program]:
            if key == "saved_policy" and value in ("null", "None", ""):
                raise ConfigError("saved_policy=null (HALOs: sample the model before training) has no equivalent: "
                                  "eval.py samples a run's checkpoint (++checkpoint=policy, hf or a path)")
            out.append(f"{sign}{HALOS_RENAMED[program][key]}={value}")
        elif key in HALOS_REFUSED:
            raise ConfigError(f"{key}= is a HALOs key with no equivalent in {program}: {HALOS_REFUSED[key]}")
        else:
            out.append(arg)
    return out
