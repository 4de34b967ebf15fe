"""The Hydra configuration: where it lives, composing it outside `@hydra.main` (eval.py, tests, the benchmark),
and reading optional nodes as plain dicts."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def compose(overrides: list[str], config_dir: Path = CONFIG_DIR, config_name: str = "config") -> DictConfig:
    """The config train.py would see with these command-line overrides."""
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))


def as_dict(node) -> dict:
    """A plain dict of an optional config node (an empty or missing node is {})."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
