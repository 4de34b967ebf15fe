"""From a config to the objects of a run: trainer and DataLoader classes (checked against each other), datasets,
tokenizer, loaders, policy (LoRA, QLoRA, `load_from`), reference, sharding, the reference cache, the trainer.

train.py, eval.py, the showcase and the tests build through these functions only, so a run, its evaluation and
the benchmark construct the same things the same way.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import dataloader
import trainers
from feedbackalign import chat_templates, checkpoints, distributed, fileio, getters, models, ref_cache, validation
from feedbackalign.configuration import as_dict
from feedbackalign.errors import ConfigError, EnvError, SettingWarning

BASE_WEIGHTS = "base"  # model.reference_load_from=base: the reference is the base model, without model.load_from

# ---------------------------------------------------------------- classes named by the loss config


def class_by_name(module, name: str, base: type, key: str) -> type:
    """Resolve `name` to a subclass of `base` defined in `module`, or fail listing the valid names."""
    found = getattr(module, str(name), None)
    if isinstance(found, type) and issubclass(found, base) and found is not base:
        return found
    valid = sorted(n for n, c in vars(module).items() if isinstance(c, type) and issubclass(c, base) and c is not base
                   and getattr(c, "batch_kind", ""))
    raise ConfigError(f"{key}={name} is not a {base.__name__} in {module.__name__}.py; valid: {', '.join(valid)}")


def trainer_class(cfg: DictConfig) -> type:
    return class_by_name(trainers, cfg.loss.trainer, trainers.BasicTrainer, "loss.trainer")


def dataloader_class(cfg: DictConfig, trainer: type) -> type:
    """The loss's DataLoader (`loss.dataloader`, else the trainer's default), which must yield the kind of batch
    the trainer reads: a mismatch fails here, naming both, before anything is built."""
    name = cfg.loss.get("dataloader") or trainer.default_dataloader
    loader = class_by_name(dataloader, name, dataloader.DataLoader, "loss.dataloader")
    if loader.batch_kind != trainer.batch_kind:
        fitting = sorted(n for n, c in vars(dataloader).items() if isinstance(c, type)
                         and issubclass(c, dataloader.DataLoader) and c.batch_kind == trainer.batch_kind)
        raise ConfigError(f"loss={cfg.loss.name} ({trainer.__name__}) trains on '{trainer.batch_kind}' batches but "
                          f"loss.dataloader={name} yields '{loader.batch_kind}' batches: use "
                          f"{' or '.join(fitting)}")
    return loader


# ---------------------------------------------------------------- data


def load_datasets(cfg: DictConfig, split: str) -> list:
    """cfg.datasets' `split`, each with its `dataset_options.<name>`; a user file (`jsonl:<path>`, whose name
    cannot be a command-line key) takes `dataset_options.jsonl` / `dataset_options.json` unless named itself."""
    options = as_dict(cfg.get("dataset_options"))
    return [getters.get_dataset(name, split, data_dir=cfg.data_dir, **dataset_options(options, name))
            for name in cfg.datasets]


def dataset_options(options: dict, name: str) -> dict:
    spec = getters.file_spec(name)
    if name in options or spec is None:
        return options.get(name, {})
    return options.get(spec[0], {})


def loader_options(cfg: DictConfig) -> dict:
    """The run's DataLoader options: the class defaults updated by `loss.data`."""
    loader = dataloader_class(cfg, trainer_class(cfg))
    return {**loader.OPTIONS, **as_dict(cfg.loss.get("data"))}


def control_tokens(cfg: DictConfig) -> list[str]:
    """The tokens the run's DataLoader conditions prompts on (`*_control_token` options: CSFT's <|good|>/<|bad|>);
    none for every other loss."""
    return [str(v) for k, v in loader_options(cfg).items() if k.endswith("_control_token") and v]


def build_tokenizer(cfg: DictConfig):
    """The run's tokenizer: its control tokens added (CSFT only), the chat template `model.chat_template`
    selects (chat_templates.py)."""
    tokenizer = models.load_tokenizer(cfg.model.tokenizer_name_or_path, special_tokens=control_tokens(cfg))
    chat_templates.select(tokenizer, cfg.model.get("chat_template", "tokenizer"))
    return tokenizer


def build_loader(cfg: DictConfig, tokenizer, *, split: str, train: bool, rank: int = 0, world_size: int = 1,
                 datasets=None):
    """The loss's DataLoader over `datasets` (default: cfg.datasets' `split`): the training loader (global batch,
    accumulation, epochs, shuffled) or an evaluation loader (eval_batch_size, one pass, in order)."""
    loader_class = dataloader_class(cfg, trainer_class(cfg))
    m = cfg.model
    options = as_dict(cfg.loss.get("data"))
    return loader_class(
        load_datasets(cfg, split) if datasets is None else datasets, tokenizer, split=split, rank=rank,
        world_size=world_size, seed=cfg.seed, batch_size=m.batch_size if train else m.eval_batch_size,
        gradient_accumulation_steps=m.gradient_accumulation_steps if train else 1,
        max_length=m.max_length, max_prompt_length=m.max_prompt_length,
        n_epochs=cfg.n_epochs if train else 1, n_examples=cfg.n_examples if train else cfg.n_eval_examples,
        shuffle=train, drop_last=train, prompt_format=dataloader.PromptFormat.from_config(m),
        batch_size_key="model.batch_size" if train else "model.eval_batch_size",
        **{k: v for k, v in options.items() if v is not None})


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class Precision:
    """The dtype each part of a run is stored and computed in (README, "Precision on GPUs").

    trained: `model.policy_dtype`, the trained weights (every policy weight, or a LoRA run's adapters) and with
             them their gradients and AdamW moments. float32 for every model: these are the master weights. An
             AdamW step moves a weight by about lr (5e-7 for real models), far below bf16's resolution (2^-8 of
             the weight), so bf16 storage rounds almost every update away.
    compute: `model.compute_dtype`, the forward and backward matmuls: FSDP2 all-gathers the fp32 shards as bf16
             and computes in bf16 (MixedPrecisionPolicy, gradients reduced in fp32); unsharded, autocast.
    frozen:  `model.reference_dtype`, weights that never change (the reference, a LoRA run's base): stored in
             the compute dtype, nothing is lost and memory halves."""

    trained: torch.dtype
    compute: torch.dtype
    frozen: torch.dtype


LOW_PRECISION = (torch.bfloat16, torch.float16)


def precision(cfg: DictConfig) -> Precision:
    """The run's dtypes, checked: compute in bfloat16 or float32, never in a higher precision than a weight's
    storage upcasts for free (the same config must compute alike sharded or not)."""
    m = cfg.model
    p = Precision(models.torch_dtype(m.policy_dtype), models.compute_dtype(m), models.torch_dtype(m.reference_dtype))
    if p.compute not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"model.compute_dtype={m.get('compute_dtype')} is not supported: use bfloat16 (or float32); "
                          "float16 compute would need loss scaling, which this trainer does not do")
    if p.compute == torch.float32:
        for key in ("policy_dtype", "reference_dtype"):
            if models.torch_dtype(m[key]) in LOW_PRECISION:
                raise ConfigError(f"model.{key}={m[key]} stores weights in lower precision than model.compute_dtype="
                                  f"float32: set model.compute_dtype=bfloat16, or model.{key}=float32")
    return p


def warn_on_low_precision_weights(cfg: DictConfig) -> None:
    """Pure bf16 (or fp16) training is allowed, loudly: it silently learns little at real-model learning rates."""
    m = cfg.model
    if models.torch_dtype(m.policy_dtype) in LOW_PRECISION:
        warnings.warn(
            f"model.policy_dtype={m.policy_dtype} stores the TRAINED weights and their AdamW state in "
            f"{m.policy_dtype}: an update smaller than ~1/256 of a weight rounds away, so at lr={cfg.lr} most "
            "weights never change and the run learns little or nothing. Set model.policy_dtype=float32 (fp32 master "
            f"weights; the forward and backward still compute in model.compute_dtype={m.get('compute_dtype')}).",
            stacklevel=2)


def build_policy(cfg: DictConfig, tokenizer, device: torch.device, *, load_from=None, lora=None, in_4bit=None,
                 activation_checkpointing=None, empty: bool = False):
    """The policy: built (or loaded in 4 bits for QLoRA), `load_from` weights, LoRA adapters, checkpointing.
    The keyword arguments override the config's model.load_from / model.lora.enabled / model.lora.load_in_4bit /
    model.activation_checkpointing (eval.py rebuilds a run's model with other choices).

    Stored dtypes (`precision`): the trained weights in policy_dtype; a LoRA run's base in reference_dtype (it
    is frozen, and it is the reference). `empty`: the same model with its parameters on the meta device and
    nothing read (a rank that receives rank 0's weights); else on `device`."""
    m = cfg.model
    if m.lora.load_in_4bit and not m.lora.enabled:
        raise ConfigError("model.lora.load_in_4bit=true is QLoRA and trains adapters only: set "
                          "model.lora.enabled=true")
    p = precision(cfg)
    load_from = m.load_from if load_from is None else load_from
    lora = m.lora.enabled if lora is None else lora
    quantized = lora and (m.lora.load_in_4bit if in_4bit is None else in_4bit)
    if quantized:
        policy = load_4bit(cfg, device)
    else:
        policy = models.build_model(m.name_or_path, p.frozen if lora else p.trained, seed=m.init_seed,
                                    attn_implementation=m.attn_implementation, vocab_size=len(tokenizer),
                                    architecture=m.architecture, empty=empty)
    if load_from and not empty:
        state = checkpoints.load_policy_weights(load_from)
        try:
            missing, unexpected = policy.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a shape mismatch: another model's checkpoint
            raise ConfigError(f"model.load_from={load_from} does not fit model={m.name}: "
                              f"{str(e).splitlines()[-1].strip()}") from None
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ConfigError(f"model.load_from={load_from} does not match model={m.name}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    if lora:
        policy = lora_wrap(policy, m.lora, p.trained)
    if m.activation_checkpointing if activation_checkpointing is None else activation_checkpointing:
        distributed.enable_activation_checkpointing(policy)
    return policy if quantized or empty else policy.to(device)  # a 4-bit model is placed by from_pretrained


def lora_wrap(policy, lora_cfg, adapter_dtype: torch.dtype):
    """peft LoRA adapters (Hu et al. 2021), stored in `adapter_dtype` (the trained dtype, fp32); the reference
    is the same model with adapters disabled."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
    try:
        model = get_peft_model(policy, config)
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules={list(lora_cfg.target_modules)} do not fit "
                          f"{type(policy).__name__}: {str(e).splitlines()[0]}") from None
    for param in model.parameters():
        if param.requires_grad and param.dtype != adapter_dtype:
            param.data = param.data.to(adapter_dtype)
    return model


def load_4bit(cfg: DictConfig, device: torch.device):
    """QLoRA (Dettmers et al. 2023): the base in 4-bit NF4 via bitsandbytes, bf16 compute, bf16 storage (so
    FSDP2 can shard it), prepared for k-bit training. Needs CUDA, bitsandbytes and a pretrained model."""
    m = cfg.model
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise EnvError("model.lora.load_in_4bit=true needs a CUDA GPU and the bitsandbytes package (pip install "
                       "bitsandbytes); set model.lora.load_in_4bit=false to train LoRA on full-precision weights")
    if m.name_or_path == models.TINY_NAME or m.load_from:
        raise ConfigError("model.lora.load_in_4bit=true loads a pretrained model directory or hub name: the "
                          "embedded tiny model and model.load_from are not supported with it")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            m.name_or_path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device},
            attn_implementation=models.attention_implementation(m.attn_implementation))
    except OSError as e:
        raise EnvError(f"cannot load model '{m.name_or_path}' in 4 bits: {str(e).splitlines()[0]}") from None
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(m.activation_checkpointing))


def reference_source(cfg: DictConfig, policy) -> str | None:
    """model.reference_load_from as build_policy's `load_from` ("" for `base`: the base model's own weights), or
    None when the reference is the policy's starting weights. A LoRA run's reference is its base with adapters
    disabled, so the key is refused there."""
    source = cfg.model.get("reference_load_from")
    if source is None or not trainer_class(cfg).uses_reference:
        return None
    if models.is_lora(policy):
        raise ConfigError(f"model.reference_load_from={source} needs full fine-tuning: a LoRA run's reference is "
                          "its base with adapters disabled; set model.lora.enabled=false or drop the key")
    return "" if source == BASE_WEIGHTS else str(source)


def build_reference(cfg: DictConfig, tokenizer, device: torch.device, *, policy, policy_is_initial: bool,
                    empty: bool = False):
    """The frozen reference in reference_dtype: the run's starting weights (model.load_from, else the base), or
    model.reference_load_from's (a policy.pt, or `base`: loop.py's reference=start); a copy of `policy` when it
    still holds them (`policy_is_initial`), else built (`empty`: on the meta device, as build_policy). None when
    the loss needs no reference or `policy` is a LoRA model (its reference is itself with adapters disabled)."""
    source = reference_source(cfg, policy)
    if not trainer_class(cfg).uses_reference or models.is_lora(policy):
        return None
    if policy_is_initial and source is None:
        reference = copy.deepcopy(policy)  # on the meta device when `policy` is (then filled from its shards)
    else:
        reference = build_policy(cfg, tokenizer, device, load_from=source, lora=False, activation_checkpointing=False,
                                 empty=empty)
    models.cast_parameters(reference, precision(cfg).frozen)
    reference.eval()
    return reference.requires_grad_(False)


def use_fsdp(cfg: DictConfig, world_size: int) -> bool:
    """auto: FSDP2 with more than one process; true: FSDP2 even in one process (a one-GPU check of the sharded
    path); false: every process holds the whole model (gradients averaged by hand)."""
    if cfg.use_fsdp not in ("auto", True, False):
        raise ConfigError(f"use_fsdp={cfg.use_fsdp} is not one of auto, true, false")
    return cfg.use_fsdp is True or (world_size > 1 and cfg.use_fsdp == "auto")


def check_quantized_processes(cfg: DictConfig, world_size: int, sharded: bool) -> None:
    """QLoRA runs in one unsharded process: FSDP2 drops bitsandbytes' quant_state when it shards a 4-bit base,
    and a replicated 4-bit base per GPU is not a tested path."""
    if cfg.model.lora.enabled and cfg.model.lora.load_in_4bit and (world_size > 1 or sharded):
        raise ConfigError(
            f"model.lora.load_in_4bit=true (QLoRA) trains in one process, but this run has {world_size} processes"
            f"{' and use_fsdp=true' if sharded and world_size == 1 else ''}: FSDP2 does not keep bitsandbytes' "
            "quantization state when it shards a 4-bit base. Run one process on one GPU (CUDA_VISIBLE_DEVICES=0 "
            "python train.py ... use_fsdp=auto), or set model.lora.load_in_4bit=false to train LoRA on a bf16 base "
            "sharded over every GPU")


def build_models(cfg: DictConfig, tokenizer, device: torch.device, *, rank: int = 0, world_size: int = 1,
                 sharded: bool = False, caching: bool = False):
    """(policy, reference or None, reference cache identity or None): built, placed, sharded, in their dtypes.

    Rank-0 loading: rank 0 alone reads the weights (into host RAM when they will be sharded); every other rank
    builds the model with its parameters on the meta device and receives rank 0's."""
    policy = build_policy(cfg, tokenizer, torch.device("cpu") if sharded else device, empty=rank != 0)
    place = sharded_models if sharded else whole_models
    return place(cfg, tokenizer, policy, device, world_size=world_size, caching=caching)


def whole_models(cfg: DictConfig, tokenizer, policy, device: torch.device, *, world_size: int, caching: bool):
    """Every process holds the whole policy (rank 0's weights broadcast) and reference; both compute in
    compute_dtype through autocast."""
    compute = precision(cfg).compute
    if world_size > 1:  # (QLoRA runs in one process: check_quantized_processes)
        if next(policy.parameters()).is_meta:
            distributed.materialize(policy, device, distributed.buffers_of(policy))
        distributed.broadcast_parameters(policy)
    reference = build_reference(cfg, tokenizer, device, policy=policy, policy_is_initial=True)
    identity = ref_cache.reference_identity(reference if reference is not None else policy, world_size) \
        if caching else None
    if reference is not None:
        models.compute_in(reference, compute)
    return models.compute_in(policy, compute), reference, identity


def sharded_models(cfg: DictConfig, tokenizer, policy, device: torch.device, *, world_size: int, caching: bool):
    """FSDP2: every rank shards an empty copy of the policy and receives rank 0's tensors into its shards, one
    tensor at a time; the reference's shards are then copied on each rank from the policy's, cast to
    reference_dtype (no second read, broadcast or host copy). With model.reference_load_from the reference has
    weights of its own: rank 0 reads them and they reach its shards the way the policy's do."""
    p = precision(cfg)
    empty = next(policy.parameters()).is_meta
    if reference_source(cfg, policy) is not None:   # other weights than the policy's: read by rank 0 as well
        reference = build_reference(cfg, tokenizer, torch.device("cpu"), policy=policy, policy_is_initial=True,
                                    empty=empty)
        identity = ref_cache.reference_identity(reference, world_size) if caching else None
        reference_state = reference.state_dict() if not empty else {}
        models.to_meta(reference)
    else:
        # the reference is the policy's starting weights in reference_dtype (LoRA: its base, already stored so)
        identity = ref_cache.reference_identity(policy, world_size,
                                                dtype=None if models.is_lora(policy) else p.frozen) if caching else None
        reference, reference_state = None, None
    state = policy.state_dict() if not empty else {}  # rank 0's one full copy
    buffers = distributed.buffers_of(policy)
    models.to_meta(policy)
    if reference is None:
        reference = build_reference(cfg, tokenizer, device, policy=policy, policy_is_initial=True)
    distributed.shard(policy, device, cfg.model.block_name, p.compute)
    distributed.load_from_rank0(policy, state, device, buffers)
    del state
    if reference is not None:
        distributed.shard(reference, device, cfg.model.block_name, p.compute)
        if reference_state is not None:
            distributed.load_from_rank0(reference, reference_state, device, buffers)
        else:
            distributed.materialize(reference, device, buffers)
            reference.load_state_dict(policy.state_dict())  # this rank's policy shards -> its reference shards
    return policy, reference, identity


# ---------------------------------------------------------------- the run


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(run_dir, resume_from). Refuses to mix a new run into an existing directory; with overwrite=true, checks
    now (before anything is built) that the directory it will replace is a run directory and holds nothing
    else the run needs (`replace_run_dir` deletes it at the end of the build)."""
    validation.check_exp_name(cfg.exp_name)
    run_dir = Path(cfg.cache_dir) / str(cfg.exp_name)
    resume = cfg.resume
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        checkpoints.latest_dir(run_dir)  # fail now, not after loading models, when there is nothing to resume
        return run_dir, run_dir
    if resume:
        checkpoints.latest_dir(resume)
        return Path(resume), Path(resume)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file: pick another exp_name or cache_dir")
    if is_nonempty_dir(run_dir):
        if not cfg.overwrite:
            raise ConfigError(f"run directory {run_dir} already exists: pick another exp_name, resume=true to "
                              "continue it, or overwrite=true to replace it")
        check_replaceable(run_dir, cfg)
    return run_dir, None


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_replaceable(run_dir: Path, cfg: DictConfig) -> None:
    """overwrite=true deletes <cache_dir>/<exp_name> only: a real directory (not a link) that train.py made (it has
    config.yaml) and that does not hold the reference cache."""
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise ConfigError(f"overwrite=true: {run_dir} is not a directory train.py made (a link or a file); delete "
                          "or move it yourself, or pick another exp_name")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"overwrite=true would delete {run_dir}, which is not a run directory (no config.yaml): "
                          "delete it yourself if you mean it, or pick another exp_name / cache_dir")
    cache = Path(cfg.reference_cache_dir).resolve()
    if cache == run_dir.resolve() or run_dir.resolve() in cache.parents:
        raise ConfigError(f"overwrite=true would delete {run_dir}, which holds reference_cache_dir={cache}: move "
                          "reference_cache_dir out of the run directory, or pick another exp_name")


def replace_run_dir(run_dir: Path) -> None:
    """Delete the run directory that overwrite=true replaces (checked by `check_replaceable`)."""
    shutil.rmtree(run_dir)


def warn_if_random_start(cfg: DictConfig, trainer_cls: type) -> None:
    """Alignment losses start from an SFT model: say so when one would start from a random init (the tiny model
    or model.name_or_path=random without model.load_from; hub models start from their pretrained weights)."""
    if cfg.model.load_from or cfg.resume or issubclass(trainer_cls, trainers.SFTTrainer) or \
            cfg.model.name_or_path not in (models.TINY_NAME, models.RANDOM_NAME):
        return
    warnings.warn(f"loss={cfg.loss.name} aligns a model but starts from model={cfg.model.name}'s random init "
                  "(model.load_from is not set): train SFT first (python train.py loss=sft) and pass "
                  "model.load_from=<that run>/LATEST/policy.pt", SettingWarning, stacklevel=2)


def release_memory() -> None:
    """Return freed model memory (the reference after the cache pass) to the system / CUDA allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_trainer(cfg: DictConfig, rank: int = 0, world_size: int = 1,
                  device: torch.device = torch.device("cpu")) -> trainers.BasicTrainer:
    """Everything before the loop. Checks come first, in the order a user fixes them, so a run fails on the first
    thing to change and before anything is built or written: names (the loss's trainer and DataLoader), values
    (validation.py's ranges, processes, dtypes, checkpoint layout), the model and tokenizer being loadable here
    (every missing piece in one message), the data, model.load_from, then the run directory. Then: models (rank-0
    loading, sharding, dtypes), reference (live, or a cache pass then freed on the sharded reference), run dir,
    resume. overwrite=true deletes the old run directory only once everything else has been built."""
    trainer_cls = trainer_class(cfg)
    dataloader_class(cfg, trainer_cls)
    validation.validate(cfg, world_size)
    sharded = use_fsdp(cfg, world_size)
    check_quantized_processes(cfg, world_size, sharded)
    precision(cfg)
    checkpoints.check_consolidate(cfg.consolidate_checkpoints)
    models.check_available(cfg.model)
    if rank == 0:
        warn_on_low_precision_weights(cfg)
        warn_if_random_start(cfg, trainer_cls)
    seed_everything(cfg.seed, cfg.deterministic)
    tokenizer = build_tokenizer(cfg)
    if rank == 0:
        print(f"prompts: {chat_templates.describe(tokenizer, cfg.model.get('chat_template', 'tokenizer'))}",
              flush=True)
    train_loader = build_loader(cfg, tokenizer, split="train", train=True, rank=rank, world_size=world_size)
    eval_loader = build_loader(cfg, tokenizer, split="test", train=False, rank=rank, world_size=world_size) \
        if cfg.n_eval_examples else None
    if cfg.model.load_from:
        checkpoints.policy_file(cfg.model.load_from)
    run_dir, resume_from = resolve_run_dir(cfg)
    replace = resume_from is None and is_nonempty_dir(run_dir)  # overwrite=true, checked by resolve_run_dir
    if sharded:
        distributed.single_process_group(device)
    caching = bool(cfg.cache_reference_logprobs and trainer_cls.uses_reference)
    policy, reference, identity = build_models(cfg, tokenizer, device, rank=rank, world_size=world_size,
                                               sharded=sharded, caching=caching)
    heads = trainer_cls.make_heads(policy)
    for head in heads.values():
        distributed.broadcast_parameters(head)
    reference_cache = None
    if caching:
        reference_cache = ref_cache.build(cfg, tokenizer, reference if reference is not None else policy, identity,
                                          [train_loader, eval_loader], parts=trainer_cls.reference_parts, rank=rank,
                                          world_size=world_size, sharded=sharded)
        reference = None  # the cache serves every reference log-prob from here on
        release_memory()
    if rank == 0:
        if replace:
            replace_run_dir(run_dir)
        if resume_from is not None:
            checkpoints.remove_temporaries(run_dir)  # what saves killed mid-write left
        run_dir.mkdir(parents=True, exist_ok=True)
        if "chat_template" in cfg.model:  # a template path made absolute: eval.py runs from anywhere
            cfg.model.chat_template = chat_templates.resolved(cfg.model.chat_template)
        fileio.write_bytes_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode("utf-8"),
                                  what="run config")
    trainer = trainer_cls(cfg, tokenizer, policy, reference, train_loader, eval_loader, run_dir, rank=rank,
                          world_size=world_size, reference_cache=reference_cache, heads=heads)
    if resume_from is not None:
        trainer.resume_from(resume_from)
    return trainer
