"""Processes and FSDP2: one process per GPU of the node (spawned), or torchrun for many nodes; gloo on CPU.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder block, then the whole model, with
MixedPrecisionPolicy(param_dtype=model.compute_dtype, reduce_dtype=float32): the stored (fp32 master) shards are
all-gathered and computed in bf16, gradients are reduce-scattered in fp32 into fp32 gradient shards, and AdamW
updates fp32 shards (CPU and GPU alike). The reference is sharded the same way and never gets gradients.

Rank-0 loading: only rank 0 reads weights (hub, `load_from`, random init) into host RAM; every other rank builds
the model with its parameters on the meta device; all shard, allocate their shards (`to_empty`) and receive
rank 0's tensors one at a time (`set_model_state_dict(..., broadcast_from_rank0=True)`). Host RAM per node: one
model copy, on rank 0; at 7B in fp32, 29 GB instead of 8 x 29 GB.

Parameters outside FSDP (a trainer's heads, e.g. PPO's value head; every parameter with use_fsdp=false) get their
gradients averaged by hand, as FSDP's reduce-scatter averages the sharded ones.
"""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from feedbackalign.errors import ConfigError
from feedbackalign.models import retie


def world_from_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when launched by torchrun, else None."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, local_rank: int, world_size: int) -> torch.device:
    """Join the process group (nccl on GPU, gloo on CPU) and pick this process's device."""
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=30))
    return device


def single_process_group(device: torch.device) -> None:
    """FSDP2 in one process (use_fsdp=true on one GPU) still needs a process group: a one-member group on an
    in-memory store, no port."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers into every rank's whole copy (use_fsdp=false; a trainer's heads)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, src=0)


def decoder_blocks(model: torch.nn.Module, block_name: str | None) -> list[torch.nn.Module]:
    """Modules to shard one by one: instances of `block_name`, else the first non-empty ModuleList (`*.layers`)."""
    if block_name:
        blocks = [m for m in model.modules() if type(m).__name__ == block_name]
        if not blocks:
            raise ConfigError(f"model.block_name={block_name} matches no module of this model; set it to the decoder "
                            "layer class (e.g. LlamaDecoderLayer) or null to shard model.layers")
        return blocks
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    warnings.warn("no decoder blocks found: FSDP2 shards the whole model as one unit (set model.block_name)")
    return []


def shard(model: torch.nn.Module, device: torch.device, block_name: str | None, compute_dtype: torch.dtype,
          reshard_after_forward: bool = True) -> torch.nn.Module:
    """FSDP2: fully_shard each decoder block, then the root; all-gathers and compute in `compute_dtype`,
    gradient reduction in fp32 (no cast where the stored dtype is already the compute dtype). The model may be
    on the meta device (then `load_from_rank0`). A frozen model (the reference) is sharded the same way."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # our forwards never modify a model output in place (logprobs.py gathers copies), so FSDP2's view warning
    # about PPO's hidden states is noise
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
              "mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)}
    for block in decoder_blocks(model, block_name):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def buffers_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a model's buffers (computed by every rank at construction, e.g. rotary frequencies; not in
    the state dict, so not broadcast): `to_empty` discards them and `materialize` puts them back."""
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()}


def materialize(model: torch.nn.Module, device: torch.device, buffers: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Allocate a meta model's parameters (or shards) on `device`, uninitialised (filled next by a broadcast or a
    copy), and put its buffers back. FSDP2 keeps tied parameters tied through `to_empty`; a plain model is re-tied."""
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return model if is_sharded(model) else retie(model)


def load_from_rank0(model: torch.nn.Module, state: dict, device: torch.device, buffers: dict[str, torch.Tensor]):
    """Fill a sharded meta model with rank 0's full `state` (other ranks pass {}), broadcast tensor by tensor
    into each rank's shards (cast to the stored dtypes), then start FSDP2 (`start`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    materialize(model, device, buffers)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return start(model, device)


def start(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Run FSDP2's lazy initialisation now, with one one-token forward, while every trainable parameter is marked
    trainable. FSDP2 fixes each parameter group's gradient dtypes at its first forward from `requires_grad`;
    peft's `disable_adapter()` (the LoRA reference pass, the first forward of a LoRA run) turns the adapters'
    requires_grad off, which would leave their gradients in bf16 against fp32 shards and fail the first backward."""
    training = model.training
    model.eval()  # no dropout: the warm-up draws no random numbers
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    return model.train(training)


def is_sharded(model: torch.nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def average_gradients(params, world_size: int) -> None:
    """Mean of each gradient over ranks, for parameters FSDP does not manage (value head; use_fsdp=false).

    FSDP2's reduce-scatter averages the same way, so every parameter sees the mean of per-rank gradients."""
    if world_size <= 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor, e.g. clip_grad_norm_'s total norm under FSDP2."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def enable_activation_checkpointing(model) -> None:
    """Recompute each block's activations in backward (non-reentrant, so frozen inputs and LoRA work)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        warnings.warn("activation checkpointing requested but the model has no gradient_checkpointing_enable")
