"""Throughput metrics: model FLOPs per token from a Hugging Face config, the hardware peak, and MFU.

Model FLOPs follow the usual accounting (Kaplan et al. 2020, Sec. 2.1; PaLM, Chowdhery et al. 2022, App. B):
a forward costs 2 FLOPs per matmul weight per token plus attention's QK^T and AV products, 4 * layers *
(heads * head_dim) * context per token (context = the keys a query sees); a training step (forward + backward) is
3x its forward. Norms, activations, softmax and the optimizer are not counted. MFU = model FLOPs / (seconds x
peak). Only FLOPs the model really computes count: a shared prompt counts once and padding not at all, so a
padded layout shows its waste as lower MFU.

The peak is `config.peak_flops` when set; else a table entry for a known GPU; else (CPU) a measured dense-matmul
peak of this process's threads in the model's dtype; an unknown GPU gets no peak, and runs log no MFU.

`Meter` is the one place work is counted: every forward a trainer runs (policy with and without gradients, live
reference, KTO's KL partners) is recorded from its `TokenLogps` counts, and tokens/s, padding and MFU come from it.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass

import torch

from feedbackalign.errors import ConfigError

TIMING_METRICS = ("tokens/s", "computed_tokens/s", "examples/s", "s/step", "mfu")  # wall-clock dependent metrics
# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets; fp32 is not listed.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
# Architectures whose MLP is gated (gate, up and down projections: three matrices instead of two).
GATED_MLP = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2"}


def matmul_parameters(config) -> int:
    """Weights multiplied per token: attention q, k, v, o and the MLP of every layer, and the LM head."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    ffn = getattr(config, "intermediate_size", None) or 4 * hidden
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = (3 if config.model_type in GATED_MLP else 2) * hidden * ffn
    return layers * (attention + mlp) + hidden * config.vocab_size


def head_parameters(config) -> int:
    """The LM head's weights (hidden x vocab), multiplied only where logits are computed."""
    return config.hidden_size * config.vocab_size


def attention_flops_per_token(config, context: float) -> float:
    """Forward FLOPs of QK^T and AV for one query that sees `context` keys."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 4.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * context


def causal_context(lengths) -> float:
    """Mean keys a query sees under causal attention over sequences of these lengths: sum L(L+1)/2 / sum L."""
    lengths = list(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / max(sum(lengths), 1)


def forward_flops(config, tokens: int, context: float = 0.0, logit_tokens: int | None = None) -> float:
    """Model FLOPs of a forward over `tokens` positions, with logits at `logit_tokens` of them (default all)."""
    body = 2.0 * (matmul_parameters(config) - head_parameters(config)) + attention_flops_per_token(config, context)
    logits = tokens if logit_tokens is None else logit_tokens
    return tokens * body + logits * 2.0 * head_parameters(config)


def training_flops(config, tokens: int, context: float = 0.0, logit_tokens: int | None = None) -> float:
    """Forward + backward: 3x the forward (the backward computes gradients for activations and weights)."""
    return 3.0 * forward_flops(config, tokens, context, logit_tokens)


def logps_flops(config, logps, context: float = 0.0, backward: bool = False) -> float:
    """FLOPs of one logprobs.py forward, from its TokenLogps counts (`tokens` computed positions, `logits`
    LM-head positions); x3 with the backward."""
    flops = forward_flops(config, logps.tokens, context, logps.logits)
    return 3.0 * flops if backward else flops


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return flops / max(seconds, 1e-12) / peak


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 10) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul over `repeats` timed runs on this CPU's threads."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm the kernels
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2.0 * size ** 3 / best


def peak_flops(setting, device: torch.device, dtype: torch.dtype = torch.float32) -> float | None:
    """The peak MFU is measured against: the user's `peak_flops`, a known GPU's data-sheet value, a measured
    matmul peak on CPU, or None (an unknown GPU: MFU is not logged, and a warning says how to set it)."""
    if setting is not None:
        value = float(setting)
        if not value > 0:
            raise ConfigError(f"peak_flops must be a positive FLOP/s value (e.g. 989e12), got {setting}")
        return value
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAKS.items():
            if key in name:
                return value
        warnings.warn(f"no known peak for GPU '{name}': MFU is not logged; set peak_flops=<FLOP/s> to log it")
        return None
    return measured_matmul_peak(dtype)


@dataclass
class Meter:
    """Work of the forwards since the last `take()`: recorded from each forward's TokenLogps counts.

    `sequence_tokens` counts len(prompt) + len(response) of every sequence a policy forward scored (what an
    unshared, unpadded forward computes: comparable across layouts and with TRL); `tokens` the non-pad positions
    every forward really computed (a shared prompt once); `positions` those plus padding; `flops` model FLOPs
    (a cached reference costs none)."""

    model_config: object
    sequence_tokens: int = 0
    tokens: int = 0
    positions: int = 0
    flops: float = 0.0

    def record(self, logps, sequences, *, backward: bool, policy: bool = True) -> None:
        """Count one forward over `sequences` (x3 FLOPs with its backward); `policy=False` for the reference."""
        if policy:
            self.sequence_tokens += logps.sequence_tokens
        self.tokens += logps.tokens
        self.positions += logps.positions
        if logps.tokens:
            context = causal_context(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
            self.flops += logps_flops(self.model_config, logps, context, backward=backward)

    def take(self) -> dict[str, float]:
        """The counts so far, then zero."""
        out = {"sequence_tokens": self.sequence_tokens, "tokens": self.tokens, "positions": self.positions,
               "flops": self.flops}
        self.sequence_tokens = self.tokens = self.positions = 0
        self.flops = 0.0
        return out
