"""Train a policy: `python train.py loss=<name> model=<name> datasets=[a,b] exp_name=E`.

One process on CPU; one process per visible GPU (spawned) on a GPU node; under torchrun, the processes torchrun
made (many nodes). The loss config names its Trainer subclass (trainers.py) and DataLoader (dataloader.py); no
code tests a loss's name. With no arguments it trains the embedded tiny model on the built-in task, offline.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import os
import random
import shutil
import sys
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import checkpoints
import dataloader
import distributed
import getters
import models
import ref_cache
import trainers
from feedback import DataError

CONFIG_DIR = str(Path(__file__).resolve().parent / "config")


class ConfigError(DataError):
    """A configuration the user gave cannot run; the message names the key and the valid choices."""


def class_by_name(module, name: str, base: type, key: str) -> type:
    """Resolve `name` to a subclass of `base` defined in `module`, or fail listing the valid names."""
    found = getattr(module, str(name), None)
    if isinstance(found, type) and issubclass(found, base):
        return found
    valid = sorted(n for n, c in vars(module).items() if isinstance(c, type) and issubclass(c, base) and c is not base)
    raise ConfigError(f"{key}={name} is not a {base.__name__} in {module.__name__}.py; valid: {', '.join(valid)}")


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(run_dir, resume_from). Refuses to mix a new run into an existing directory."""
    run_dir = Path(cfg.cache_dir) / cfg.exp_name
    resume = cfg.resume
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        checkpoints.latest_dir(run_dir)  # fail now, not after loading models, when there is nothing to resume
        return run_dir, run_dir
    if resume:
        checkpoints.latest_dir(resume)
        return Path(resume), Path(resume)
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"run directory {run_dir} already exists: pick another exp_name, resume=true to continue "
                          "it, or overwrite=true to replace it")
    return run_dir, None


def as_dict(node) -> dict:
    """A plain dict of an optional config node (an empty or missing node is {})."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def load_datasets(cfg: DictConfig, split: str) -> list:
    options = as_dict(cfg.get("dataset_options"))
    return [getters.get_dataset(name, split, data_dir=cfg.data_dir, **options.get(name, {})) for name in cfg.datasets]


def make_loader(cfg, tokenizer, datasets, *, split, rank, world_size, train: bool):
    loader_class = class_by_name(dataloader, cfg.loss.dataloader, dataloader.DataLoader, "loss.dataloader")
    m = cfg.model
    options = as_dict(cfg.loss.get("data"))
    return loader_class(
        datasets, tokenizer, split=split, rank=rank, world_size=world_size, seed=cfg.seed,
        batch_size=m.batch_size if train else m.eval_batch_size,
        gradient_accumulation_steps=m.gradient_accumulation_steps if train else 1,
        max_length=m.max_length, max_prompt_length=m.max_prompt_length,
        n_epochs=cfg.n_epochs if train else 1, n_examples=cfg.n_examples if train else cfg.n_eval_examples,
        shuffle=train, human_prefix=m.human_prefix, human_suffix=m.human_suffix,
        assistant_prefix=m.assistant_prefix, assistant_suffix=m.assistant_suffix, system_prefix=m.system_prefix,
        **{k: v for k, v in options.items() if v is not None})


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = models.torch_dtype(name)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        warnings.warn(f"{name} on CPU is slow or unsupported here; using float32 (set model.policy_dtype=float32)")
        return torch.float32
    return dtype


def build_policy(cfg, tokenizer, device):
    """The policy: built (or loaded in 4 bits for QLoRA), `load_from` weights, LoRA adapters, checkpointing."""
    m = cfg.model
    if m.lora.load_in_4bit:
        policy = load_4bit(cfg, device)
    else:
        policy = models.build_model(m.name_or_path, model_dtype(m.policy_dtype, device), seed=m.init_seed,
                                    attn_implementation=m.attn_implementation, vocab_size=len(tokenizer))
    if m.load_from:
        state = checkpoints.load_policy_weights(m.load_from)
        missing, unexpected = policy.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ConfigError(f"model.load_from={m.load_from} does not match model={m.name}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    if m.lora.enabled:
        policy = lora_wrap(policy, m.lora)
    if m.activation_checkpointing:
        distributed.enable_activation_checkpointing(policy)
    return policy if m.lora.load_in_4bit else policy.to(device)  # a 4-bit model is placed by from_pretrained


def lora_wrap(policy, lora_cfg):
    """peft LoRA adapters (Hu et al. 2021); the reference is the same model with adapters disabled."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(policy, config)
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules={list(lora_cfg.target_modules)} do not fit "
                          f"{type(policy).__name__}: {str(e).splitlines()[0]}") from None


def load_4bit(cfg, device):
    """QLoRA (Dettmers et al. 2023): the base in 4-bit NF4 via bitsandbytes, bf16 compute, bf16 storage (so
    FSDP2 can shard it), prepared for k-bit training. Needs CUDA, bitsandbytes and a pretrained model."""
    m = cfg.model
    if not m.lora.enabled:
        raise ConfigError("model.lora.load_in_4bit=true is QLoRA and trains adapters only: set "
                          "model.lora.enabled=true")
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.lora.load_in_4bit=true needs a CUDA GPU and the bitsandbytes package (pip install "
                          "bitsandbytes); set model.lora.load_in_4bit=false to train LoRA on full-precision weights")
    if m.name_or_path == models.TINY_NAME or m.load_from:
        raise ConfigError("model.lora.load_in_4bit=true loads a pretrained model directory or hub name: the embedded "
                          "tiny model and model.load_from are not supported with it")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            m.name_or_path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device},
            attn_implementation=models.attention_implementation(m.attn_implementation))
    except OSError as e:
        raise ConfigError(f"cannot load model '{m.name_or_path}' in 4 bits: {str(e).splitlines()[0]}") from None
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(m.activation_checkpointing))


def build_reference(cfg, policy, device):
    """A frozen copy of the initial policy, unless the loss needs none or LoRA is on (the reference is then the
    policy with adapters disabled: no second model in memory)."""
    if not cfg.loss.use_reference_model or cfg.model.lora.enabled:
        return None
    reference = copy.deepcopy(policy).to(model_dtype(cfg.model.reference_dtype, device))
    reference.eval()
    reference.requires_grad_(False)
    return reference


def use_fsdp(cfg, world_size: int) -> bool:
    if cfg.use_fsdp not in ("auto", True, False):
        raise ConfigError(f"use_fsdp={cfg.use_fsdp} is not one of auto, true, false")
    return world_size > 1 and cfg.use_fsdp in ("auto", True)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)


def worker(rank: int, local_rank: int, world_size: int, cfg: DictConfig) -> None:
    device = distributed.init(rank, local_rank, world_size)
    try:
        run(cfg, rank, world_size, device)
    finally:
        distributed.shutdown()


def run(cfg: DictConfig, rank: int, world_size: int, device: torch.device) -> None:
    trainer = setup(cfg, rank, world_size, device)
    if cfg.wandb.enabled and rank == 0:
        import wandb

        wandb.init(entity=cfg.wandb.entity, project=cfg.wandb.project, name=cfg.exp_name,
                   config=OmegaConf.to_container(cfg, resolve=True), dir=str(trainer.run_dir))
    trainer.train()
    if rank == 0:
        print(f"done: {trainer.run_dir / 'LATEST'}", flush=True)


def setup(cfg: DictConfig, rank: int, world_size: int, device: torch.device) -> trainers.BasicTrainer:
    """Everything before the loop: data, models, sharding, reference (live, or a cache pass then freed), run dir,
    resume. Order matters: weights are broadcast and fingerprinted before sharding; the cache pass runs on the
    sharded reference."""
    seed_everything(cfg.seed, cfg.deterministic)
    run_dir, resume_from = resolve_run_dir(cfg)
    sharded = use_fsdp(cfg, world_size)
    tokenizer = models.load_tokenizer(cfg.model.tokenizer_name_or_path)
    trainer_class = class_by_name(trainers, cfg.loss.trainer, trainers.BasicTrainer, "loss.trainer")
    train_loader = make_loader(cfg, tokenizer, load_datasets(cfg, "train"), split="train", rank=rank,
                               world_size=world_size, train=True)
    eval_loader = make_loader(cfg, tokenizer, load_datasets(cfg, "test"), split="test", rank=rank,
                              world_size=world_size, train=False) if cfg.n_eval_examples else None
    policy = build_policy(cfg, tokenizer, device)
    if not cfg.model.lora.load_in_4bit:
        distributed.broadcast_parameters(policy)
    reference = build_reference(cfg, policy, device)
    caching = bool(cfg.cache_reference_logprobs and cfg.loss.use_reference_model)
    identity = ref_cache.reference_identity(reference if reference is not None else policy, world_size) \
        if caching else None
    value_head = trainer_class.make_value_head(policy) if hasattr(trainer_class, "make_value_head") else None
    if value_head is not None:
        distributed.broadcast_parameters(value_head)
    if sharded:
        mixed = device.type == "cuda" and cfg.model.policy_dtype == "bfloat16"
        policy = distributed.shard(policy, device, cfg.model.block_name, mixed)
        if reference is not None:
            reference = distributed.shard(reference, device, cfg.model.block_name, mixed)
    reference_cache = None
    if caching:
        reference_cache = ref_cache.build(cfg, tokenizer, reference if reference is not None else policy, identity,
                                          [train_loader, eval_loader], rank=rank, world_size=world_size,
                                          sharded=sharded)
        reference = None  # the cache serves every reference log-prob from here on
        release_memory()
    if rank == 0:
        if resume_from is None and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    trainer = trainer_class(cfg, tokenizer, policy, reference, train_loader, eval_loader, run_dir, rank=rank,
                            world_size=world_size, reference_cache=reference_cache, value_head=value_head)
    if resume_from is not None:
        trainer.resume_from(resume_from)
    return trainer


def release_memory() -> None:
    """Return freed model memory (the reference after the cache pass) to the system / CUDA allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def spawned(local_rank: int, world_size: int, cfg: DictConfig, port: int) -> None:
    """One GPU's process on a single node; a user-caused failure prints its one line and exits 2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        worker(local_rank, local_rank, world_size, cfg)
    except (DataError, trainers.TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def launch(cfg: DictConfig) -> None:
    """torchrun's processes, else one per visible GPU, else one CPU process."""
    env = distributed.world_from_env()
    if env is not None:
        worker(*env, cfg)
    elif torch.cuda.device_count() > 1:
        import torch.multiprocessing as mp

        n = torch.cuda.device_count()
        try:
            mp.spawn(spawned, args=(n, cfg, distributed.free_port()), nprocs=n, join=True)
        except mp.ProcessExitedException:
            sys.exit(2)  # the failing process printed why
    else:
        run(cfg, 0, 1, distributed.init(0, 0, 1))


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        launch(cfg)
    except (DataError, trainers.TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
