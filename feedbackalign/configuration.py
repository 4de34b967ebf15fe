"""The Hydra configuration: where it lives, composing it outside `@hydra.main` (eval.py, tests, the benchmark),
translating HALOs' command-line keys, checking a command line's names and keys before anything is composed or
built, and reading optional nodes as plain dicts.

Hydra's struct mode rejects `key=value` for an unknown key, but `+key=value` and `++key=value` add any key, so
`+beta=0.5` (what Hydra's own hint suggests for `beta=0.5`) would train with the loss's beta untouched.
`check_overrides` closes that hole for every entry point: each override's key must exist in the composed config
(the groups it selects included), except below the open nodes whose keys their readers check (`OPEN_NODES`),
and each group choice (`loss=`, `model=`) must be a config file of that group; the error names the override, the
closest known keys ("did you mean loss.beta?") or every valid choice, on one line.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from feedbackalign.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
# Nodes whose keys are options of something the config names, checked (with the valid ones listed) by that reader:
# dataset_options.<dataset>.<option> by the dataset getters, loss.data.<option> by the loss's DataLoader.
OPEN_NODES = ("dataset_options", "loss.data")
TRAIN_KEYS_HINT = "the command with --cfg job added prints every key"


def compose(overrides: list[str], config_dir: Path = CONFIG_DIR, config_name: str = "config", *,
            check: bool = True) -> DictConfig:
    """The config train.py would see with these command-line overrides; their names and keys are checked
    first (`check_overrides`) unless `check` is false (callers that add keys of their own, like eval.py)."""
    if check:
        check_overrides(overrides, config_dir=config_dir, config_name=config_name)
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
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


# ---------------------------------------------------------------- names and keys of a command line


def parse_override(text: str) -> Override:
    """One command-line override in Hydra's grammar, or a ConfigError naming it."""
    try:
        return OverridesParser.create().parse_overrides([text])[0]
    except HydraException as e:
        why = str(e).splitlines()[0].strip()
        raise ConfigError(f"cannot read the override {text!r}: {why} (write key=value, +key=value or "
                          "++key=value; quote values with spaces)") from None


def config_groups(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The config groups: folders of config_dir holding yaml files (loss, model, tuning)."""
    return sorted(p.name for p in Path(config_dir).iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The choices of a config group, without bases: a file whose `name` is `???` (model/base_model.yaml) is
    what the others extend, not a model."""
    names = []
    for path in sorted((Path(config_dir) / group).glob("*.yaml")):
        node = OmegaConf.load(path)
        if not (isinstance(node, DictConfig) and "name" in node.keys() and OmegaConf.is_missing(node, "name")):
            names.append(path.stem)
    return names


def check_overrides(overrides: list[str], *, config_dir: Path = CONFIG_DIR, config_name: str = "config",
                    known: DictConfig | None = None, hint: str = TRAIN_KEYS_HINT) -> None:
    """Fail with one line on the first override whose group choice or key does not exist.

    The keys are those of `known`, else of the config composed with the overrides' own group choices (so
    `loss=dpo loss.beta=0.5` is checked against DPO's keys). Hydra's own keys (`hydra.*`, `hydra/...`) pass."""
    parsed = [parse_override(text) for text in overrides]
    groups = config_groups(config_dir) if known is None else []
    choices = []
    for override in parsed:
        if override.key_or_group in groups:
            check_choice(override, override.key_or_group, config_dir)
            if not override.is_delete():
                first = next(override.sweep_string_iterator()) if override.is_sweep_override() else override.value()
                choices.append(f"{override.key_or_group}={first}")
    if known is None:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            known = hydra_compose(config_name, overrides=choices)
    for override in parsed:
        key = override.key_or_group
        if key not in groups and key != "hydra" and not key.startswith(("hydra.", "hydra/")):
            check_key(override, known, groups, config_dir, hint)


def check_key(override: Override, known: DictConfig, groups: list[str], config_dir: Path, hint: str) -> None:
    """`key=value` sets an existing key, `+key=value` adds a new one (only below OPEN_NODES), `++` does either."""
    key, line = override.key_or_group, override.input_line
    if has_key(known, key):
        if override.is_add():
            raise ConfigError(f"{line}: {key} already exists; set it without the +: {line.lstrip('+')}")
        return
    open_node = next((n for n in OPEN_NODES if key.startswith(n + ".") and has_key(known, n)), None)
    if open_node is None:
        raise ConfigError(f"{line}: there is no key '{key}' ({guess(key, all_keys(known), groups, config_dir)}); "
                          f"{hint}")
    if not (override.is_add() or override.is_force_add() or override.is_delete()):
        raise ConfigError(f"{line}: {key} is a new key under {open_node}, so it needs a +: +{line}")


def check_choice(override: Override, group: str, config_dir: Path) -> None:
    """`loss=<name>` / `model=<name>`: the name must be one of the group's config files."""
    if override.is_delete():
        return
    valid = group_options(group, config_dir)
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    for value in values:
        if isinstance(value, str) and value in valid:
            continue
        close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.6)
        guess = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{override.input_line}: there is no {group} '{value}'{guess}; valid {group} names: "
                          f"{', '.join(valid)} (config/{group}/<name>.yaml)")


def guess(key: str, keys: list[str], groups: list[str], config_dir: Path) -> str:
    """'did you mean ...?' from the known keys, else the group choices that have the key (`+beta` under loss=sft:
    the losses with a beta)."""
    close = similar_keys(key, keys)
    if close:
        return f"did you mean {' or '.join(close)}?"
    leaf = key.rsplit(".", 1)[-1]
    elsewhere = choices_with_key(leaf, groups, config_dir)
    if elsewhere:
        group = elsewhere[0][0]
        return f"{group}.{leaf} exists with {group}={'|'.join(choice for _, choice in elsewhere)}"
    return "no key is close to it"


def choices_with_key(name: str, groups: list[str], config_dir: Path) -> list[tuple[str, str]]:
    """(group, choice) pairs whose config file has the top-level key `name` (`beta`: the losses that have one)."""
    found = []
    for group in groups:
        for choice in group_options(group, config_dir):
            node = OmegaConf.load(Path(config_dir) / group / f"{choice}.yaml")
            if isinstance(node, DictConfig) and name in node.keys():
                found.append((group, choice))
    return [pair for pair in found if pair[0] == found[0][0]] if found else []


def has_key(cfg, key: str) -> bool:
    """Whether the dotted `key` names a node of `cfg` (list indices included), without resolving values."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig):
            if part not in node.keys():
                return False
            node = node._get_node(part)
        elif isinstance(node, ListConfig):
            return part.isdigit()   # an item of a list the same command line may replace: Hydra checks the index
        else:
            return False
    return True


def all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of `cfg` (sections and leaves), Hydra's own excluded."""
    out = []
    for name in cfg.keys():
        key = f"{prefix}{name}"
        if key == "hydra":
            continue
        out.append(key)
        node = cfg._get_node(name)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            out += all_keys(node, key + ".")
    return out


def similar_keys(key: str, keys: list[str], limit: int = 3) -> list[str]:
    """Known keys close to `key`: the whole dotted path, or its last part (`beta` -> loss.beta)."""
    leaf = key.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        last = difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio()
        return max(whole, last)

    ranked = sorted(((score(k), k) for k in keys), key=lambda pair: (-pair[0], len(pair[1])))
    return [k for s, k in ranked[:limit] if s >= 0.8]


def check_command_line(argv: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """`check_overrides` on the overrides of a `@hydra.main` script's command line, before Hydra composes them.

    Hydra's own flags are read with Hydra's own parser; `--config-name` is honoured. With `--config-path` or
    `--config-dir` the configuration is the user's own tree, which this check does not know: it is skipped.
    Under `--multirun`, a swept group (`loss=dpo,kto`) has every choice checked and keys are checked against the
    first one."""
    from hydra._internal.utils import get_args_parser   # the parser @hydra.main uses (no public accessor)

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.config_dir:
        return
    check_overrides(args.overrides, config_dir=config_dir, config_name=args.config_name or "config")
