"""Model construction without downloads: the shipped architectures are the real models' shapes, `random` builds
one with seeded weights, and the embedded tiny model is the `tiny` architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from feedbackalign import models
from feedbackalign.errors import ConfigError
from helpers import make_trainer

# published parameter counts (model cards / papers), in billions
PUBLISHED = {"mistral-7b": 7.24, "llama-3-8b": 8.03, "llama-3.2-1b": 1.24, "llama-1-7b": 6.74, "llama-2-13b": 13.02,
             "pythia-1.4b": 1.41, "pythia-6.9b": 6.86, "pythia-12b": 11.85}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_architectures_have_the_published_sizes(name):
    with torch.device("meta"):  # no memory: the shape only
        model = AutoModelForCausalLM.from_config(models.architecture_config(name))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED[name], abs=0.01)


def test_random_builds_the_architecture_from_its_seed_and_tiny_is_one():
    a = models.build_model("random", torch.float32, seed=3, architecture="tiny")
    b = models.build_model("tiny", torch.float32, seed=3)
    c = models.build_model("tiny", torch.float32, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(b.lm_head.weight, c.lm_head.weight)
    with pytest.raises(ConfigError, match="model.architecture=nope is not a shipped architecture; valid: .*mistral-7b"):
        models.build_model("random", torch.float32, architecture="nope")
    with pytest.raises(ConfigError, match="set model.architecture"):
        models.build_model("random", torch.float32)


def test_a_model_config_trains_its_architecture_with_random_weights(tmp_path):
    """model.name_or_path=random + model.architecture: any shipped shape built offline with seeded weights and
    trained through the normal path (here the tiny shape, to stay fast on CPU)."""
    trainer = make_trainer(tmp_path, "loss=sft", "model=tiny", "model.name_or_path=random", "model.architecture=tiny",
                           "model.tokenizer_name_or_path=tiny", "n_examples=8")
    assert trainer.policy.config.hidden_size == 256
    assert "loss" in trainer.train_step([next(iter(trainer.train_loader))])
