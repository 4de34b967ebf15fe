"""Model and tokenizer construction: the embedded tiny Llama (no download), real hub/local models, and real
architectures with random weights.

`tiny` is a 5.25M-parameter Llama (hidden 256, 4 layers, 4 heads, MLP 1024, tied embeddings, vocab 4096),
initialised from a seed, with the byte-level BPE tokenizer committed in assets/tiny/ (built by
tools/build_tiny_tokenizer.py). It is what `python train.py` trains with no arguments, fp32 on CPU.

`assets/architectures/<name>.json` are the exact shapes of the models the configs name (Mistral-7B, Llama 1/2/3,
Pythia, tiny), as Hugging Face config fields, shipped so that a real architecture can be built with no hub
access: `model.name_or_path=random` builds `model.architecture` with seeded random weights (tests, GPU checks),
and a model can be built on the meta device (no memory) to plan a run.

`build_model(..., empty=True)` builds any of them with parameters on the meta device and real buffers (the
rotary frequencies are computed, not loaded): what every rank but rank 0 builds before FSDP2 shards the model and
rank 0's weights are broadcast into the shards (builders.py). `compute_in` runs a model's forward under
torch.autocast: the compute dtype of a model that is not sharded (FSDP2's MixedPrecisionPolicy does it for a
sharded one).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from feedbackalign.errors import ConfigError, EnvError

TINY_NAME = "tiny"        # the embedded model: architecture "tiny" with seeded weights, and its committed tokenizer
RANDOM_NAME = "random"    # model.name_or_path=random: model.architecture with seeded random weights
ASSETS = Path(__file__).resolve().parent / "assets"
TINY_DIR = ASSETS / "tiny"
ARCHITECTURES_DIR = ASSETS / "architectures"
CONTROL_TOKENS = ["<|good|>", "<|bad|>"]  # CSFT's defaults (Korbak et al. 2023, as in HALOs)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model dtype '{name}' is unknown; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def compute_dtype(model_cfg) -> torch.dtype:
    """`model.compute_dtype`; a run directory saved before the key existed computed in its policy_dtype."""
    return torch_dtype(model_cfg.get("compute_dtype") or model_cfg.policy_dtype)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store the parameters in `dtype`, leaving buffers alone: `model.to(bfloat16)` would also round the rotary
    inverse frequencies (fp32 buffers) to bf16, shifting the rotation angles at long positions."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


class _Autocast:
    """Forward hooks that run a module's forward under torch.autocast (what accelerate does by wrapping
    `forward`; hooks keep state dicts, `deepcopy` and peft's adapter switches untouched)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.active: list = []

    def enter(self, module, args):
        device = next(module.parameters()).device.type
        context = torch.autocast(device, dtype=self.dtype)
        context.__enter__()
        self.active.append(context)

    def exit(self, module, args, output):
        self.active.pop().__exit__(None, None, None)


def compute_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Run every forward of `model` (training, reference, cache pass, generation) with its matmuls in `dtype`
    via autocast, whatever its parameters' stored dtype; float32 (or the parameters' own dtype) needs nothing.
    Gradients still land in each parameter's own dtype (fp32 master weights get fp32 gradients)."""
    if dtype == torch.float32 or all(p.dtype == dtype for p in model.parameters()):
        return model
    hooks = _Autocast(dtype)
    model.register_forward_pre_hook(hooks.enter)
    model.register_forward_hook(hooks.exit, always_call=True)
    return model


def to_meta(model: torch.nn.Module) -> torch.nn.Module:
    """Move a model's parameters and buffers to the meta device (freeing them), ties kept: moving replaces each
    parameter, which unties tied embeddings until the model re-ties them."""
    model.to("meta")
    return retie(model)


def retie(model: torch.nn.Module) -> torch.nn.Module:
    """Re-tie a Hugging Face model's tied weights (input embeddings = LM head where its config says so), which
    meta-device construction and moves break; LoRA models through their base."""
    (model.get_base_model() if is_lora(model) else model).tie_weights()
    return model


def empty_weights(empty: bool):
    """Parameters on the meta device (no memory, no initialisation), buffers real (accelerate's
    init_empty_weights(include_buffers=False)); a no-op context when `empty` is false."""
    if not empty:
        return nullcontext()
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def load_tokenizer(name_or_path: str, special_tokens=()):
    """The tokenizer with a pad token (EOS where it has none), plus `special_tokens` where missing: only a run
    whose DataLoader conditions on control tokens (CSFT) asks for any, so every other run keeps the base model's
    vocabulary (its embedding, export and reference fingerprint stay the base model's)."""
    if name_or_path == TINY_NAME:  # the committed vocabulary already holds the chat markers and control tokens
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(TINY_DIR / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|pad|>",
            additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
        )
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as e:
            raise EnvError(f"cannot load tokenizer '{name_or_path}': {str(e).splitlines()[0]} "
                            "(offline? set model.tokenizer_name_or_path to a local directory)") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    missing = [t for t in special_tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "TRUE", "ON")


def check_available(model_cfg) -> None:
    """Fail before anything is built when the model's weights or tokenizer cannot be loaded here, naming every
    missing piece and its key in one message: a local directory that does not exist or lacks the files, or, with
    the hub offline (HF_HUB_OFFLINE=1), a hub name whose files are not in the local Hugging Face cache. Online,
    hub names are left to `from_pretrained` (which downloads them)."""
    wanted = []
    if model_cfg.name_or_path not in (TINY_NAME, RANDOM_NAME):
        wanted.append(("weights", model_cfg.name_or_path, "model.name_or_path", ("config.json",), WEIGHT_FILES))
    if model_cfg.tokenizer_name_or_path != TINY_NAME:
        wanted.append(("tokenizer", model_cfg.tokenizer_name_or_path, "model.tokenizer_name_or_path", (),
                       TOKENIZER_FILES))
    missing = [(what, name, key, why) for what, name, key, needed, any_of in wanted
               if (why := unavailable(str(name), needed, any_of))]
    if not missing:
        return
    pieces = "; ".join(f"the {what} '{name}' ({key}={name}): {why}" for what, name, key, why in missing)
    hub = [name for _, name, _, why in missing if "cache" in why]
    fetch = f"download {' and '.join(dict.fromkeys(hub))} once with network access (huggingface-cli download " \
            f"<name>) or " if hub else ""
    raise EnvError(f"model={model_cfg.name} cannot be loaded: {pieces}; {fetch}set "
                   f"{' and '.join(dict.fromkeys(key for _, _, key, _ in missing))} to local directories")


def unavailable(name: str, needed: tuple[str, ...], any_of: tuple[str, ...]) -> str:
    """Why `name` (a directory or hub name) lacks the files `needed` and one of `any_of` (with the shards an index
    lists), or '' when it has them or the hub will be asked."""
    path = Path(name).expanduser()
    if not path.is_dir():
        if path.exists() or name.startswith(("/", "./", "../", "~")):
            return "no such directory"
        if not hub_offline():
            return ""
    lacking = [f for f in needed if located(name, f) is None]
    found = next((f for f in any_of if located(name, f) is not None), None)
    if found is None:
        lacking.append(" or ".join(any_of))
    elif found.endswith(".index.json"):
        listed = json.loads(located(name, found).read_text()).get("weight_map", {}).values()
        lacking += [shard for shard in sorted(set(listed)) if located(name, shard) is None]
    if not lacking:
        return ""
    where = f"{path} lacks" if path.is_dir() else "not in the local Hugging Face cache (HF_HUB_OFFLINE=1):"
    return f"{where} {', '.join(lacking)}"


def located(name: str, file: str) -> Path | None:
    """`file` of the local directory `name`, else of the hub repository `name` in the local cache; None if absent."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path / file if (path / file).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, file)
    except ValueError:   # not a valid hub name
        return None
    return Path(found) if isinstance(found, str) else None


def attention_implementation(requested: str) -> str:
    """flash_attention_2 where it is importable and a GPU exists, else sdpa (with a clear message)."""
    if requested == "flash_attention_2":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            return requested
        warnings.warn("flash_attention_2 needs CUDA and the flash-attn package (pip install '.[gpu]'); using sdpa")
        return "sdpa"
    return requested


def architectures() -> list[str]:
    return sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))


def architecture_config(name: str):
    """The Hugging Face config of a shipped architecture (assets/architectures/<name>.json)."""
    path = ARCHITECTURES_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"model.architecture={name} is not a shipped architecture; valid: "
                          f"{', '.join(architectures())}")
    fields = json.loads(path.read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_model(architecture: str, dtype: torch.dtype, seed: int = 0, attn_implementation: str = "sdpa",
                 empty: bool = False):
    """`architecture` with weights drawn from `seed` (the model's own initialisation, in fp32, then stored in
    `dtype`), on the CPU; `empty`: parameters on the meta device."""
    config = architecture_config(architecture)
    with torch.random.fork_rng(devices=[]), empty_weights(empty):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return cast_parameters(retie(model) if empty else model, dtype)


def build_model(name_or_path: str, dtype: torch.dtype, seed: int = 0, attn_implementation: str = "sdpa",
                vocab_size: int | None = None, architecture: str | None = None, empty: bool = False):
    """A causal LM: the seeded tiny Llama, a shipped architecture with seeded random weights
    (`name_or_path=random`), or `from_pretrained` of a hub name / local directory. `empty`: the same model with
    its parameters on the meta device (only the hub config is read), to be filled from rank 0."""
    if name_or_path == TINY_NAME:
        return random_model(TINY_NAME, dtype, seed, attn_implementation, empty)
    if name_or_path == RANDOM_NAME:
        if not architecture:
            raise ConfigError("model.name_or_path=random builds model.architecture with random weights: set "
                              f"model.architecture to one of {', '.join(architectures())}")
        return random_model(architecture, dtype, seed, attention_implementation(attn_implementation), empty)
    attention = attention_implementation(attn_implementation)
    try:
        if empty:
            config = AutoConfig.from_pretrained(name_or_path)
            if vocab_size is not None and config.vocab_size < vocab_size:  # what resize_token_embeddings gives rank 0
                config.vocab_size = vocab_size
            with empty_weights(True):
                model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
            return cast_parameters(retie(model), dtype)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attention)
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
