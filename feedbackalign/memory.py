"""The dry-run memory plan: per-GPU memory of a run by part, from its config alone.

    python train.py loss=nca model=mistral7b ++dry_run=true ++world_size=8

The model is built on the meta device from its shipped architecture (`model.architecture`; no weights, no hub),
so parameter counts are exact. Token counts come from the run's own DataLoader where its tokenizer and data are
at hand (every microbatch of the training split is measured and the largest is planned for), else from the
max lengths. Saved activations per token and layer come from a meta-device trace of one and two decoder layers
of the real transformers code (every tensor autograd saves, deduplicated by storage), plus the packed attention's
own saved tensors, which this module states in closed form (`attention_bytes`). Everything else is closed form:

- weights: trained weights in `model.policy_dtype` (fp32 master weights), a LoRA run's frozen base in
  `model.reference_dtype` (QLoRA's in ~4 bits), sharded over the world under FSDP2 (builders.precision).
- gradients: one per trainable weight, sharded like it; with accumulation and `model.gradient_sync=
  last_microbatch` FSDP2 keeps an unsharded fp32 gradient of the whole model between reductions.
- optimizer: AdamW's two moments per trainable weight, in its storage dtype, sharded.
- reference: the frozen copy in `model.reference_dtype`, sharded; none when cached (after the cache pass) or LoRA.
- activations: what backward needs from the forward of the largest microbatch (with activation checkpointing:
  each block's input; else every saved tensor of every layer), plus the largest one-layer transient (a block's
  recomputation and its gradients in backward), which the token budget bounds.
- logits: the label rows the LM head keeps (hidden, label, logsumexp) and one chunk of logits (packed layout);
  the whole (positions x vocab) logits and their gradient (padded layout).
- buffers: FSDP2's all-gathered blocks (the current one and the prefetched next, in the compute dtype), the root
  (embeddings, final norm, LM head) kept unsharded through a step, and one block's gradients before reduction;
  unsharded with autocast: the compute-dtype copies of the weights autocast keeps for backward.

The peak is not the sum of the parts: gradients are freed each step (`zero_grad(set_to_none=True)`) and grow in
backward while saved activations are freed, so peak = weights + optimizer + reference + buffers + gradients kept
across microbatches + max(activations + logits (end of forward), gradients of this backward (end of backward)).
The cache pass (when enabled) is planned apart: weights, reference and a no-grad round. What the plan does not
see: the CUDA context and allocator fragmentation (~1-3 GiB on a GPU; compare with max_memory_reserved).
"""

from __future__ import annotations

import gc
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from feedbackalign import logprobs, models
from feedbackalign.batches import KINDS
from feedbackalign.errors import ConfigError, UserError

GIB = 2 ** 30
PARTS = ("weights", "gradients", "optimizer", "reference", "activations", "logits", "buffers")
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "RMSprop": 1, "Adagrad": 1, "SGD": 0}  # fp states per trainable weight
TRACE_ATTENTION = "memory_plan_trace"  # attention that saves nothing: its own tensors come from attention_bytes
TRACE_TOKENS = 64
GROUP_RESPONSES = 4  # K assumed for a K-group loss when neither the data nor loss.data.n_responses says
# One layer's transient in backward, in units of what it saves: the gradients of its activations (without
# checkpointing), or its recomputation plus those gradients, freed and allocated as its backward proceeds (with
# checkpointing). Calibrated against measured CPU peaks (tests/test_memory.py: within 3% and 18% before).
BACKWARD_TRANSIENT = {False: 1.0, True: 1.25}


# ---------------------------------------------------------------- the model, on the meta device


@dataclass
class ModelShape:
    """What the plan needs to know about the model, from its meta-device build."""

    architecture: str
    params: int  # every parameter (tied ones once)
    block_params: int  # parameters of the largest decoder block
    root_params: int  # parameters outside the decoder blocks (embeddings, final norm, LM head)
    layers: int
    hidden: int
    q_dim: int  # attention heads x head dim
    kv_dim: int  # key/value heads x head dim
    heads: int
    vocab: int
    layer_bytes: float  # bytes saved per token by one decoder layer, attention kernel aside, in the compute dtype
    outside_bytes: float  # bytes saved per token outside the layers (final norm), in the compute dtype


def architecture_of(cfg: DictConfig):
    """The Hugging Face config of the run's model: its shipped architecture, else a local model's config."""
    m = cfg.model
    if m.architecture:
        return models.architecture_config(m.architecture)
    if os.path.isdir(str(m.name_or_path)):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(m.name_or_path)
    raise ConfigError(f"model={m.name} has no model.architecture: the dry run builds a shipped architecture "
                      f"({', '.join(models.architectures())}) or a local model directory's config")


def _meta_model(config, layers: int, dtype: torch.dtype, device: str = "meta"):
    """`config` with `layers` decoder layers on the meta device (no memory), its attention saving nothing."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(TRACE_ATTENTION, _no_saving_attention)
    config = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": layers})
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation=TRACE_ATTENTION, dtype=dtype)


def _no_saving_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention output's shape and dtype, saving nothing for backward (the kernel's own saved tensors are
    `attention_bytes`)."""
    return query.transpose(1, 2) * 1.0, None


def saved_bytes(config, layers: int, tokens: int, dtype: torch.dtype, device: str = "meta") -> int:
    """Bytes autograd saves in a training forward of `tokens` positions through `layers` decoder layers, on the
    meta device by default (tensors deduplicated by their storage's base; parameters excluded)."""
    model = _meta_model(config, layers, dtype, device).train()
    params = {id(p) for p in model.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def keep(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in params:
            saved[id(base)] = base  # held, so ids stay unique
        return tensor

    device = torch.device(device)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=torch.zeros(1, tokens, dtype=torch.long, device=device),
              position_ids=torch.arange(tokens, device=device).unsqueeze(0),
              attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),
              logits_to_keep=torch.arange(1, device=device), use_cache=False)
    return sum(t.untyped_storage().nbytes() for t in saved.values())


def model_shape(cfg: DictConfig, compute: torch.dtype) -> ModelShape:
    """Count the model's parameters on the meta device and trace what its layers save per token."""
    config = architecture_of(cfg)
    full = _meta_model(config, config.num_hidden_layers, compute)
    blocks = models_blocks(full)
    params = sum(p.numel() for p in full.parameters())
    block_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    one, two = (saved_bytes(config, n, TRACE_TOKENS, compute) for n in (1, 2))
    longer = saved_bytes(config, 1, 2 * TRACE_TOKENS, compute)
    layer = (two - one) / TRACE_TOKENS
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(
        architecture=cfg.model.architecture or str(cfg.model.name_or_path), params=params, block_params=block_params,
        root_params=params - sum(sum(p.numel() for p in b.parameters()) for b in blocks),
        layers=config.num_hidden_layers, hidden=config.hidden_size, q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim, heads=heads, vocab=config.vocab_size, layer_bytes=layer,
        outside_bytes=(longer - one) / TRACE_TOKENS - layer)


def models_blocks(model) -> list:
    """The decoder blocks (the first non-empty ModuleList, as FSDP2 wraps them)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def lora_parameters(model_config, architecture) -> int:
    """LoRA adapter parameters: r x (in + out) for every Linear whose name ends in a target module."""
    model = _meta_model(architecture, architecture.num_hidden_layers, torch.float32)
    targets = set(model_config.lora.target_modules)
    return sum(model_config.lora.r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def attention_bytes(shape: ModelShape, packed_tokens: float, sequence_tokens: float, path: str, itemsize: int):
    """What the packed attention kernel saves for backward per layer, in bytes.

    flex: rotated q and k, v, the output and one fp32 logsumexp per head, per packed token (read in place).
    sdpa: the gathered q and the K/V repeated to every head, the output and the logsumexp, per token of every
    (prompt, response) sequence (a shared prompt is gathered again for each of its responses)."""
    if path == "flex":
        return packed_tokens * (itemsize * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.heads)
    return sequence_tokens * (itemsize * 4 * shape.q_dim + 4 * shape.heads)


# ---------------------------------------------------------------- the tokens of the largest microbatch


@dataclass
class MicrobatchTokens:
    packed: int  # tokens the policy's packed forwards compute for the microbatch (prompts once per forward)
    sequence: int  # sum of len(prompt) + len(response) over its sequences
    labels: int  # response tokens (LM-head rows)
    largest_forward: int  # packed tokens of its largest forward (the token budget's bound)
    positions: int  # padded layout: sequences x the longest
    source: str


def microbatch_items(cfg: DictConfig, world_size: int) -> int:
    m = cfg.model
    return max(1, m.batch_size // (world_size * m.gradient_accumulation_steps))


def measured_tokens(cfg: DictConfig, world_size: int, trainer_cls) -> MicrobatchTokens:
    """Tokens of the largest microbatch of the training data (by packed tokens), measured with the run's
    tokenizer and DataLoader (1 process, world x accumulation microbatches: the same microbatch size)."""
    from feedbackalign import builders

    tokenizer = builders.build_tokenizer(cfg)
    one_rank = cfg.copy()
    one_rank.model.gradient_accumulation_steps = world_size * cfg.model.gradient_accumulation_steps
    loader = builders.build_loader(one_rank, tokenizer, split="train", train=True)
    largest, count = None, 0
    for batch in loader:
        count += 1
        sequences = batch.sequences(trainer_cls.loss_parts)
        tokens = _tokens_of(sequences, cfg.model.max_tokens_per_forward)
        if largest is None or tokens.packed > largest.packed:
            largest = tokens
    if largest is None:
        raise ConfigError("the training data yields no microbatch: lower model.batch_size")
    largest.source = f"measured: the largest of {count} microbatches of the training data"
    return largest


def _tokens_of(sequences, budget) -> MicrobatchTokens:
    split = logprobs.forward_split(sequences, budget)
    forwards = [logprobs.packed_tokens([sequences[i] for i in f]) for f in split]
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
    return MicrobatchTokens(packed=sum(forwards), sequence=sum(lengths),
                            labels=sum(len(s.response_ids) for s in sequences), largest_forward=max(forwards),
                            positions=len(sequences) * max(lengths), source="")


def bound_tokens(cfg: DictConfig, world_size: int, trainer_cls, why: str) -> MicrobatchTokens:
    """The largest microbatch the max lengths allow: every sequence max_length tokens (a one-token prompt is the
    worst case for prompt sharing), K responses per group."""
    m = cfg.model
    kind = KINDS[trainer_cls.batch_kind]
    parts = trainer_cls.loss_parts or kind.parts
    k = 1
    if trainer_cls.batch_kind == "groups":
        k = (cfg.loss.get("data") or {}).get("n_responses") or GROUP_RESPONSES
    n = microbatch_items(cfg, world_size) * len(parts) * k
    packed = n * m.max_length
    largest = packed if not m.max_tokens_per_forward else min(packed, max(m.max_tokens_per_forward, m.max_length))
    return MicrobatchTokens(packed=packed, sequence=packed, labels=n * (m.max_length - 1), largest_forward=largest,
                            positions=packed, source=f"bound by max_length={m.max_length} ({n} sequences of "
                                                         f"{microbatch_items(cfg, world_size)} items; {why})")


def microbatch_tokens(cfg: DictConfig, world_size: int, trainer_cls) -> MicrobatchTokens:
    try:
        return measured_tokens(cfg, world_size, trainer_cls)
    except (UserError, OSError) as e:
        return bound_tokens(cfg, world_size, trainer_cls, f"data not at hand: {' '.join(str(e).split())[:160]}")


# ---------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    parts: dict[str, float]  # bytes: each part's largest size during a step
    phases: dict[str, float]  # bytes at the end of forward, in backward, in the cache pass
    peak: float
    tokens: MicrobatchTokens
    shape: ModelShape
    sharded: bool
    notes: list[str] = field(default_factory=list)


def process_count(cfg: DictConfig) -> int:
    """The processes a run of this config would start here: ++world_size, else torchrun's, else one per GPU."""
    if cfg.get("world_size"):
        return int(cfg.world_size)
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return max(1, torch.cuda.device_count())


@dataclass
class States:
    """Bytes per process of what lives across steps, and the gradients."""

    weights: float
    optimizer: float
    reference: float  # live reference during training
    reference_weights: float  # the reference's weights, whether live or only during the cache pass
    gradients: float  # created in backward, freed at each step's zero_grad
    kept_gradients: float  # alive through the forward of a later microbatch (accumulation)
    trainable: int
    notes: list[str]


def states(cfg: DictConfig, shape: ModelShape, trainer_cls, sharded: bool, world_size: int, dtypes) -> States:
    """`dtypes`: builders.Precision (trained weights, compute, frozen weights: the reference, a LoRA base)."""
    m = cfg.model
    storage = dtypes.trained.itemsize
    shards = world_size if sharded else 1
    lora = bool(m.lora.enabled)
    trainable = lora_parameters(m, architecture_of(cfg)) if lora else shape.params
    notes = []
    base = shape.params * (dtypes.frozen.itemsize if lora else storage)
    if lora and m.lora.load_in_4bit:
        base = shape.params * 0.5  # QLoRA: ~4 bits a weight
    n_states = OPTIMIZER_STATES.get(cfg.optimizer)
    if n_states is None:
        n_states = 2
        notes.append(f"optimizer={cfg.optimizer}: planned with two states per weight, like AdamW")
    cached = bool(cfg.cache_reference_logprobs) and trainer_cls.uses_reference
    reference_weights = shape.params * dtypes.frozen.itemsize / shards
    gradients = trainable * storage / shards
    kept = 0.0
    if m.gradient_accumulation_steps > 1:
        if sharded and m.gradient_sync == "last_microbatch":
            kept = trainable * 4  # FSDP2's unsharded fp32 accumulation between reductions
            notes.append(f"gradients: {kept / GIB:.2f} GiB are FSDP2's unsharded fp32 gradient kept between "
                         "reductions (model.gradient_sync=last_microbatch); model.gradient_sync=every_microbatch "
                         "drops it for one reduce-scatter per microbatch")
        else:
            kept = gradients
    if cached:
        notes.append("reference: cached, so freed after the cache pass (planned as its own phase)")
    return States(weights=(base + (trainable * storage if lora else 0)) / shards,
                  optimizer=n_states * trainable * storage / shards,
                  reference=reference_weights if trainer_cls.uses_reference and not lora and not cached else 0.0,
                  reference_weights=reference_weights, gradients=gradients, kept_gradients=kept, trainable=trainable,
                  notes=notes)


def activation_bytes(m, shape: ModelShape, tokens: MicrobatchTokens, device: str, residual: int,
                     itemsize: int) -> tuple[float, float]:
    """(saved for backward through the microbatch, the largest one-layer transient in backward), in bytes."""
    if m.forward_layout == "packed":
        path = logprobs.attention_path(m.packed_attention, torch.device(device))
        attention = attention_bytes(shape, tokens.packed, tokens.sequence, path, itemsize)
        one_layer = (shape.layer_bytes + attention / max(tokens.packed, 1)) * tokens.largest_forward
        layer_tokens = tokens.packed
    else:
        attention = tokens.positions * (itemsize * 2 * shape.q_dim + 4 * shape.heads)  # SDPA on the padded batch
        one_layer = shape.layer_bytes * tokens.positions + attention
        layer_tokens = tokens.positions
    if m.activation_checkpointing:
        saved = shape.layers * residual * shape.hidden * layer_tokens
    else:
        saved = shape.layers * (shape.layer_bytes * layer_tokens + attention)
    saved += shape.outside_bytes * layer_tokens
    return saved, BACKWARD_TRANSIENT[bool(m.activation_checkpointing)] * one_layer


def logit_bytes(m, shape: ModelShape, tokens: MicrobatchTokens, itemsize: int) -> tuple[float, float]:
    """(kept for backward, transient), in bytes: the packed layout's label rows and one chunk of logits; the
    padded layout's whole logits, their gathered label rows and their gradient."""
    if m.forward_layout == "packed":
        return (tokens.labels * (itemsize * shape.hidden + 8 + 4),
                min(logprobs.chunk_rows(shape.vocab), tokens.labels) * shape.vocab * (8 + itemsize))
    return ((tokens.positions + tokens.labels) * shape.vocab * itemsize,
            tokens.positions * shape.vocab * itemsize + min(logprobs.LOGSUMEXP_CHUNK, tokens.labels) * shape.vocab * 4)


def buffer_bytes(shape: ModelShape, sharded: bool, storage: int, itemsize: int, trainable: int) -> float:
    """FSDP2's all-gathered blocks (current + prefetched), one block's gradients before reduction (compute dtype
    and fp32) and the unsharded root; unsharded with autocast, the compute-dtype weight copies it keeps."""
    if sharded:
        return shape.block_params * (3 * itemsize + 4) + shape.root_params * itemsize
    return trainable * itemsize if storage != itemsize else 0.0


def plan(cfg: DictConfig, world_size: int, device: str = "cuda") -> MemoryPlan:
    """Per-process memory of one training step of `cfg` on `world_size` processes on `device` (cuda: per GPU;
    cpu: the packed attention's CPU path), as the module docstring says."""
    from feedbackalign import builders

    m = cfg.model
    if world_size < 1:
        raise ConfigError(f"world_size={world_size}: plan for at least one process")
    trainer_cls = builders.trainer_class(cfg)
    builders.dataloader_class(cfg, trainer_cls)
    dtypes = builders.precision(cfg)
    c, storage = dtypes.compute.itemsize, dtypes.trained.itemsize
    shape = model_shape(cfg, dtypes.compute)
    tokens = microbatch_tokens(cfg, world_size, trainer_cls)
    sharded = builders.use_fsdp(cfg, world_size)
    held = states(cfg, shape, trainer_cls, sharded, world_size, dtypes)
    # unsharded, autocast keeps the residual stream in the embeddings' stored dtype (fp32 master weights: fp32)
    residual = c if sharded else (dtypes.frozen if m.lora.enabled else dtypes.trained).itemsize
    saved, backward_transient = activation_bytes(m, shape, tokens, device, residual, c)
    logits_saved, logits_transient = logit_bytes(m, shape, tokens, c)
    buffers = buffer_bytes(shape, sharded, storage, c, held.trainable)

    fixed = held.weights + held.optimizer + held.reference + buffers + held.kept_gradients
    phases = {"end of forward": fixed + saved + logits_saved + logits_transient,
              "backward": fixed + max(saved + logits_saved, held.gradients)
              + max(backward_transient, logits_transient)}
    if bool(cfg.cache_reference_logprobs) and trainer_cls.uses_reference:
        round_tokens = m.max_tokens_per_forward or m.max_length * m.eval_batch_size
        phases["reference cache pass"] = (
            held.weights + held.reference_weights + shape.layer_bytes * round_tokens
            + min(logprobs.chunk_rows(shape.vocab), round_tokens) * shape.vocab * (8 + c)
            + (shape.block_params * 2 * c + shape.root_params * c if sharded else 0))
    parts = {"weights": held.weights, "gradients": held.gradients + held.kept_gradients,
             "optimizer": held.optimizer, "reference": held.reference, "activations": saved + backward_transient,
             "logits": logits_saved + logits_transient, "buffers": buffers}
    return MemoryPlan(parts, phases, max(phases.values()), tokens, shape, sharded, held.notes)


def report(result: MemoryPlan, cfg: DictConfig, world_size: int) -> str:
    """The plan as printed by the dry run, ending with `per-GPU peak: X GiB`."""
    m, s, t = cfg.model, result.shape, result.tokens
    lines = [f"memory plan: loss={cfg.loss.name} model={m.name} ({s.architecture}, {s.params / 1e9:.2f}B parameters, "
             f"{s.layers} layers) on {world_size} process(es), FSDP2 {'on' if result.sharded else 'off'}",
             f"  microbatch: {microbatch_items(cfg, world_size)} items; {t.packed} packed tokens "
             f"({t.sequence} sequence tokens, {t.labels} labels), largest forward {t.largest_forward} tokens "
             f"(model.max_tokens_per_forward={m.max_tokens_per_forward})",
             f"  tokens {t.source}",
             f"  dtypes: weights {m.policy_dtype}, compute {str(models.compute_dtype(m)).split('.')[-1]}, reference "
             f"{m.reference_dtype}; activation checkpointing {'on' if m.activation_checkpointing else 'off'}; "
             f"layout {m.forward_layout}",
             "", "  part          GiB per GPU"]
    lines += [f"  {name:12s} {result.parts[name] / GIB:9.2f}" for name in PARTS]
    lines += ["", "  phases (the parts alive together):"]
    lines += [f"  {name:22s} {value / GIB:9.2f} GiB" for name, value in result.phases.items()]
    lines += [f"  note: {note}" for note in result.notes]
    lines.append(f"per-GPU peak: {result.peak / GIB:.2f} GiB")
    return "\n".join(lines)


def measured_peak(function, device: torch.device):
    """(function(), the peak bytes torch allocated while it ran, above what was allocated before): CUDA's
    allocator statistics (`max_memory_allocated`); on CPU, which keeps no such statistics, the running sum of the
    profiler's allocation events (slow: every operator is recorded)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = function()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = function()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak


@contextmanager
def offline():
    """Hub and datasets libraries in offline mode (cache and local files only) for the block, whatever the
    environment says: a dry run never downloads, and never waits on a network that is not there."""
    # huggingface_hub's switch (loaded with transformers) and datasets' copy of it, if datasets is loaded (when it
    # is imported later it copies huggingface_hub's)
    modules = [m for m in (sys.modules.get("huggingface_hub.constants"), sys.modules.get("datasets.config")) if m]
    before = [m.HF_HUB_OFFLINE for m in modules]
    for module in modules:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in zip(modules, before):
            module.HF_HUB_OFFLINE = value


def dry_run(cfg: DictConfig) -> None:
    """train.py's `++dry_run=true`: print the plan for `++world_size` (default: the processes a run would start)
    and exit without loading weights, downloading anything or training."""
    world_size = process_count(cfg)
    with offline():
        print(report(plan(cfg, world_size), cfg, world_size), flush=True)
