"""Processes and FSDP2: one process per GPU of the node (spawned), or torchrun for many nodes; gloo on CPU.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder block, then the whole model. On GPU the
parameters compute in bf16 with fp32 gradient reduction (MixedPrecisionPolicy). FSDP2 has no
sync_module_states, so rank 0's weights are broadcast before sharding.
The reference model is sharded the same way and never gets gradients or optimizer state. Parameters outside
FSDP (a trainer's heads, e.g. PPO's value head; every parameter with use_fsdp=false) get their gradients averaged by hand, as FSDP's
reduce-scatter averages the sharded ones.
"""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from feedbackalign.errors import ConfigError


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


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (FSDP2 has no sync_module_states)."""
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


def shard(model: torch.nn.Module, device: torch.device, block_name: str | None, mixed_precision: bool,
          reshard_after_forward: bool = True) -> torch.nn.Module:
    """FSDP2: fully_shard each decoder block, then the root. Mixed precision = bf16 compute, fp32 reduction.

    A frozen model (the reference) is sharded the same way; it has no gradients, so nothing is reduced."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # our forwards never modify a model output in place (logprobs.py gathers copies), so FSDP2's view warning
    # about PPO's hidden states is noise
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in decoder_blocks(model, block_name):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


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
