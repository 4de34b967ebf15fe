"""Model and tokenizer construction: the embedded tiny Llama (no download) and real hub/local models.

`tiny` is a 5.25M-parameter Llama (hidden 256, 4 layers, 4 heads, MLP 1024, tied embeddings, vocab 4096),
initialised from a seed, with the byte-level BPE tokenizer committed in assets/tiny/ (built by
tools/build_tiny_tokenizer.py). It is what `python train.py` trains with no arguments, fp32 on CPU.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from feedbackalign.errors import ConfigError, EnvError

TINY_NAME = "tiny"
TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
TINY_CONFIG = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
    bos_token_id=None, eos_token_id=0, pad_token_id=1,
)
CONTROL_TOKENS = ["<|good|>", "<|bad|>"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model dtype '{name}' is unknown; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str):
    """The tokenizer, with a pad token and the CSFT control tokens guaranteed to exist."""
    if name_or_path == TINY_NAME:
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(TINY_DIR / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|pad|>",
            additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", *CONTROL_TOKENS],
        )
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as e:
            raise EnvError(f"cannot load tokenizer '{name_or_path}': {str(e).splitlines()[0]} "
                            "(offline? set model.tokenizer_name_or_path to a local directory)") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        missing = [t for t in CONTROL_TOKENS if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


def attention_implementation(requested: str) -> str:
    """flash_attention_2 where it is importable and a GPU exists, else sdpa (with a clear message)."""
    if requested == "flash_attention_2":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            return requested
        warnings.warn("flash_attention_2 needs CUDA and the flash-attn package (pip install '.[gpu]'); using sdpa")
        return "sdpa"
    return requested


def build_model(name_or_path: str, dtype: torch.dtype, seed: int = 0, attn_implementation: str = "sdpa",
                vocab_size: int | None = None):
    """A causal LM: the seeded tiny Llama, or `from_pretrained` of a hub name / local directory."""
    if name_or_path == TINY_NAME:
        config = LlamaConfig(**TINY_CONFIG)
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        return model.to(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attention_implementation(attn_implementation))
    except OSError as e:
        raise EnvError(f"cannot load model '{name_or_path}': {str(e).splitlines()[0]} "
                        "(offline? set model.name_or_path to a local directory)") from None
    if vocab_size is not None and model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def is_lora(model) -> bool:
    """A peft model (LoRA adapters on a base; its reference is the base with adapters disabled)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_quantized(model) -> bool:
    """A base loaded in 4 bits (QLoRA): nothing can be merged into it."""
    return getattr(model, "hf_quantizer", None) is not None
