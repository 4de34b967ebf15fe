"""A run's tokenizer: control tokens only for CSFT, `model.chat_template` (tokenizer / prefixes / a .jinja file),
and the exported tokenizer carrying the template the run used, on a real model directory laid out as the hub's."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as token_models
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import dataloader as dl
from feedbackalign import builders, chat_templates, ref_cache
from feedbackalign.errors import ConfigError
from feedbackalign.task import get_wordsort
from helpers import make_config, make_trainer

TURNS = [{"role": "system", "content": "Be {% brief %}."}, {"role": "user", "content": "Hi\n"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Sort: b a"}]
HUB_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
CONTROL = ("<|good|>", "<|bad|>")


@pytest.mark.parametrize("fmt", [
    dl.PromptFormat(),
    dl.PromptFormat("\n<|user|>\n", "", "\n<|assistant|>\n", "", "\n<|system|>\n"),  # HALOs' leading newlines
    dl.PromptFormat("\n\nHuman: ", "", "\n\nAssistant: ", "", 'SYS "q" \\ {{x}} é\t'),
])
def test_the_prefix_template_renders_exactly_the_prefixes(tiny_tokenizer, fmt):
    template = chat_templates.prefix_template(fmt)
    rendered = tiny_tokenizer.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True,
                                                  chat_template=template)
    assert rendered == dl.format_prompt(TURNS, tiny_tokenizer, fmt)


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory):
    """A model directory as from the hub: a byte-level BPE tokenizer that adds BOS and ships its own chat
    template but no control tokens, and a small Llama, both written with save_pretrained."""
    out = tmp_path_factory.mktemp("hub_model")
    corpus = [t for ex in get_wordsort("train", n_prompts=48) for t in [ex.prompt[0]["content"], *ex.generations]]
    tok = Tokenizer(token_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = HUB_TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=0,
                         eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def hub_overrides(path, *more):
    return [f"model.name_or_path={path}", f"model.tokenizer_name_or_path={path}", "model.policy_dtype=float32",
            "model.reference_dtype=float32", "model.attn_implementation=sdpa", "model.max_length=96",
            "model.max_prompt_length=48", *more]


def test_control_tokens_are_added_for_csft_runs_only(hub_model, tmp_path):
    """A DPO run keeps the base vocabulary and embedding, so its reference fingerprint does not depend on the
    seed (the cache reuse across runs); a CSFT run adds <|good|>/<|bad|> as single tokens and two rows."""
    base_rows = LlamaConfig.from_pretrained(hub_model).vocab_size
    fingerprints = []
    for seed in (0, 1, 0):
        cfg = make_config(tmp_path, "loss=dpo", f"seed={seed}", *hub_overrides(hub_model))
        builders.seed_everything(cfg.seed, False)
        tokenizer = builders.build_tokenizer(cfg)
        assert len(tokenizer) == base_rows and not set(CONTROL) & set(tokenizer.get_vocab())
        policy = builders.build_policy(cfg, tokenizer, torch.device("cpu"))
        assert policy.get_input_embeddings().weight.shape[0] == base_rows
        fingerprints.append(ref_cache.weights_fingerprint(policy))
    assert len(set(fingerprints)) == 1
    cfg = make_config(tmp_path, "loss=csft", *hub_overrides(hub_model))
    tokenizer = builders.build_tokenizer(cfg)
    assert len(tokenizer) == base_rows + 2
    assert [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in CONTROL] == [1, 1]
    assert builders.build_policy(cfg, tokenizer, torch.device("cpu")).get_input_embeddings().weight.shape[0] \
        == base_rows + 2


def loader_prompt(cfg, tokenizer) -> str:
    loader = builders.build_loader(cfg, tokenizer, split="test", train=False)
    return next(iter(loader)).prompts[0]


def test_model_chat_template_selects_the_format(hub_model, tmp_path):
    example = get_wordsort("test", n_prompts=48)
    first = None
    for choice, expected in [("tokenizer", "[user] {}\n[assistant] "), ("prefixes", "<|user|>\n{}\n<|assistant|>\n")]:
        cfg = make_config(tmp_path, "loss=sft", f"model.chat_template={choice}", *hub_overrides(hub_model))
        tokenizer = builders.build_tokenizer(cfg)
        prompt = loader_prompt(cfg, tokenizer)
        first = first or next(ex for ex in example if ex.prompt[0]["content"] in prompt).prompt[0]["content"]
        assert prompt == ("<s>" if choice == "tokenizer" else "") + expected.format(first)
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
                        "{% if add_generation_prompt %}=> {% endif %}")
    cfg = make_config(tmp_path, "loss=sft", f"model.chat_template={template}", *hub_overrides(hub_model))
    tokenizer = builders.build_tokenizer(cfg)
    assert loader_prompt(cfg, tokenizer) == f"<<{first}>>=> "
    assert chat_templates.describe(tokenizer, str(template)) == f"the chat template in {template}"

    template.write_text("{% for m in messages %}{{ m['content'] }")
    cases = {str(template): f"model.chat_template={template}, line 1: unexpected '}}'",
             str(tmp_path / "missing.jinja"): "is neither tokenizer nor prefixes nor an existing .jinja file"}
    for choice, message in cases.items():
        cfg = make_config(tmp_path, "loss=sft", f"model.chat_template={choice}", *hub_overrides(hub_model))
        with pytest.raises(ConfigError) as err:
            builders.build_tokenizer(cfg)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_the_export_carries_the_template_the_run_used(hub_model, tmp_path):
    """A CSFT run with prefixes on a BOS-adding tokenizer: the exported tokenizer's apply_chat_template gives the
    training prompt's ids (BOS, markers and all) and holds the control tokens; a run with a .jinja file exports
    that file's template."""
    trainer = make_trainer(tmp_path, "loss=csft", "model.chat_template=prefixes", "n_examples=8", "export_hf=true",
                           *hub_overrides(hub_model))
    trainer.train()
    exported = AutoTokenizer.from_pretrained(trainer.run_dir / "LATEST" / "hf")
    assert set(CONTROL) <= set(exported.get_vocab())
    batch = next(iter(trainer.train_loader))
    item_prompt = batch.parts["targets"][0].prompt_ids
    turns = [{"role": "user", "content": batch.prompts[0].removeprefix("<|user|>\n").rsplit("\n<|assistant|>", 1)[0]}]
    ids = exported.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    control = exported.convert_tokens_to_ids(exported.convert_ids_to_tokens(item_prompt[-1]))
    assert ids[0] == exported.bos_token_id and list(item_prompt) == list(ids) + [control]

    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}=> ")
    trainer = make_trainer(tmp_path / "jinja", "loss=sft", f"model.chat_template={template}", "n_examples=8",
                           "export_hf=true")
    trainer.train()
    assert AutoTokenizer.from_pretrained(trainer.run_dir / "LATEST" / "hf").chat_template == template.read_text()
