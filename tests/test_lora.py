"""LoRA through peft on the real tiny model: the reference is the base with adapters disabled (no second model in
memory), training moves only the adapters, the export is a plain merged model (or the adapter, by flag), the
reference cache serves LoRA runs, and 4-bit loading fails clearly where CUDA/bitsandbytes are missing."""

from __future__ import annotations

import math

import pytest
import torch

from feedbackalign import checkpoints
from feedbackalign import models
from helpers import make_trainer
from feedbackalign.errors import ConfigError, EnvError

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"]


def dpo_loss_on(trainer, batch):
    policy, reference = trainer.forward(batch)
    loss, _ = trainer.loss(batch, policy, reference, None)
    return loss.item()


def test_lora_trains_adapters_only_and_exports_a_plain_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, "loss=dpo", *LORA, "lr=1e-2", "n_examples=16", "export_hf=true")
    assert trainer.reference is None                       # the reference is the policy with adapters disabled
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        assert dpo_loss_on(trainer, batch) == pytest.approx(math.log(2), rel=1e-6)   # lora_B = 0 at start
    base = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    trainer.train()
    after = dict(trainer.policy.named_parameters())
    assert all(torch.equal(after[n], base[n]) for n in base)
    assert any(after[n].abs().max() > 0 for n in after if "lora_B" in n)
    trainer.policy.eval()
    sequence = batch.sequences()[0]
    ids = torch.tensor([sequence.prompt_ids + sequence.response_ids])
    with torch.no_grad():
        with trainer.policy.disable_adapter():
            base_logits = trainer.policy(input_ids=ids).logits
        fresh = models.build_model("tiny", torch.float32)(input_ids=ids).logits
        torch.testing.assert_close(base_logits, fresh)                  # disabled adapters = the initial model
        assert abs(dpo_loss_on(trainer, batch) - math.log(2)) > 1e-3      # the policy moved off its reference
        trained = trainer.policy(input_ids=ids).logits

    export = checkpoints.latest_dir(trainer.run_dir) / "hf"
    plain = AutoModelForCausalLM.from_pretrained(export)
    assert type(plain).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
    weights = checkpoints.load_policy_weights(trainer.run_dir / "LATEST")  # policy.pt: the same merged weights
    assert all(torch.equal(weights[k], v) for k, v in plain.state_dict().items() if k in weights)

    trainer.config.model.lora.merge_on_export = False                    # the adapter-only export
    trainer.save()
    adapter = checkpoints.latest_dir(trainer.run_dir) / "hf"
    assert (adapter / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(models.build_model("tiny", torch.float32), adapter)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_lora_runs_reuse_the_full_model_runs_reference_cache(tmp_path):
    """Same base weights -> same reference identity (peft names normalised, adapters left out): 0 new entries."""
    shared = [f"reference_cache_dir={tmp_path / 'refcache'}", "cache_reference_logprobs=true", "n_examples=16",
              "n_eval_examples=0"]
    full = make_trainer(tmp_path / "full", "loss=dpo", *shared)
    lora = make_trainer(tmp_path / "lora", "loss=dpo", *LORA, *shared)
    assert full.reference_cache.stats["misses"] > 0
    assert lora.reference_cache.stats == {"hits": full.reference_cache.stats["misses"], "misses": 0}
    with torch.no_grad():
        assert dpo_loss_on(lora, next(iter(lora.train_loader))) == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("override, key", [
    ("model.lora.load_in_4bit=true", "model.lora.load_in_4bit"),      # no CUDA / bitsandbytes here
    ("model.lora.target_modules=[nope]", "model.lora.target_modules"),
])
def test_bad_lora_settings_fail_with_the_key(tmp_path, override, key):
    with pytest.raises((ConfigError, EnvError), match=key.replace(".", r"\.")):
        make_trainer(tmp_path, "loss=dpo", *LORA, override)
    assert not any(tmp_path.iterdir())
