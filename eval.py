"""Sample from a trained run, or compute its own loss metrics on a split (HALOs usage).

    python eval.py --config-path=<run_dir> ++mode=sample ++n_samples=512 ++model.eval_batch_size=32 ++samples_dir=samples/
    python eval.py --config-path=<run_dir> ++mode=eval ++n_eval_examples=256

`mode=sample` writes `<samples_dir>/<exp_name>.json`: {"sampled_at", "exp_name", "config", "samples": [{"id",
"prompt", "prompt_turns", "policy", "chosen", "dataset"}]} (and `<exp_name>.alpaca_eval.json` in AlpacaEval's
format with `++alpaca_eval=true`). The prompts are the run's datasets' test split, drawn with `seed` only, so runs
compare prompt for prompt. `checkpoint` picks the weights: `policy` (LATEST/policy.pt, the default), `hf` (the
save_pretrained export) or a path to a policy.pt. `backend=vllm` samples with vLLM where it is installed (GPU).
`mode=eval` runs the run's own Trainer subclass over the split (HALOs always used DPO's).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

import checkpoints
import dataloader
import models
import train
import trainers
from feedback import DataError

DEFAULTS = {"mode": "sample", "n_samples": 128, "samples_dir": "samples", "temperature": 0.7, "top_p": 0.95,
            "max_new_tokens": None, "checkpoint": "policy", "backend": "hf", "alpaca_eval": False,
            "sample_split": "test", "control_token": None, "run_dir": None}


def run_dir_of(cfg) -> Path:
    """The run directory: `++run_dir`, else the directory given as --config-path."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "main":
            return Path(source.path.replace("file://", ""))
    return Path(cfg.cache_dir) / cfg.exp_name


def sample_id(dataset: str, turns: list[dict]) -> str:
    text = dataset + "\x1e" + json.dumps(turns, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def eval_prompts(cfg, split: str, n: int) -> list:
    """The first n test prompts in an order drawn from `seed` only (the same for every model)."""
    examples = [ex for ds in train.load_datasets(cfg, split) for ex in ds.examples]
    examples.sort(key=lambda ex: (ex.dataset_name, ex.prompt_key()))
    random.Random(cfg.seed).shuffle(examples)
    return examples[:n]


def load_policy(cfg, run_dir: Path, device):
    """The trained policy from LATEST/policy.pt (LoRA runs: adapters re-attached), the HF export, or a path."""
    if cfg.checkpoint == "hf":
        path = checkpoints.latest_dir(run_dir) / "hf"
        if not path.is_dir():
            raise DataError(f"checkpoint=hf: {path} does not exist (the run saved no HF export; use checkpoint=policy)")
        return models.build_model(str(path), train.model_dtype(cfg.model.policy_dtype, device),
                                  attn_implementation=cfg.model.attn_implementation).to(device)
    path = checkpoints.latest_dir(run_dir) / "policy.pt" if cfg.checkpoint == "policy" else Path(cfg.checkpoint)
    tokenizer = models.load_tokenizer(cfg.model.tokenizer_name_or_path)
    with open_dict(cfg):
        cfg.model.load_from = None
        cfg.model.activation_checkpointing = False
    policy = train.build_policy(cfg, tokenizer, device)
    state = checkpoints.load_policy_weights(path)
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise DataError(f"checkpoint {path} does not fit model={cfg.model.name}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return policy.eval()


def prompt_format(cfg) -> dataloader.PromptFormat:
    m = cfg.model
    return dataloader.PromptFormat(m.human_prefix, m.human_suffix, m.assistant_prefix, m.assistant_suffix,
                                   m.system_prefix)


@torch.no_grad()
def generate_hf(policy, tokenizer, prompts: list[str], cfg) -> list[str]:
    """Batched sampling with left padding, stopping at EOS; deterministic given `seed`."""
    tokenizer.padding_side = "left"
    outputs = []
    device = next(policy.parameters()).device
    max_new = cfg.max_new_tokens or cfg.model.max_length - cfg.model.max_prompt_length
    bs = cfg.model.eval_batch_size
    torch.manual_seed(cfg.seed)
    for i in tqdm(range(0, len(prompts), bs), desc="sample", dynamic_ncols=True):
        ids = [list(dataloader.encode_prompt(tokenizer, p, not dataloader.uses_chat_template(tokenizer)))
               [-cfg.model.max_prompt_length:] for p in prompts[i: i + bs]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.temperature > 0 \
            else {"do_sample": False}
        out = policy.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [o.strip() for o in outputs]


def generate_vllm(run_dir: Path, prompts: list[str], cfg) -> list[str]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise DataError("backend=vllm needs the vllm package and a GPU (pip install '.[gpu]'); use backend=hf") from None
    llm = LLM(model=str(checkpoints.latest_dir(run_dir) / "hf"), seed=cfg.seed)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_new_tokens or cfg.model.max_length - cfg.model.max_prompt_length)
    return [o.outputs[0].text.strip() for o in llm.generate(prompts, params)]


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def sample(cfg, run_dir: Path) -> Path:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = models.load_tokenizer(cfg.model.tokenizer_name_or_path)
    examples = eval_prompts(cfg, cfg.sample_split, cfg.n_samples)
    fmt = prompt_format(cfg)
    prompts = [dataloader.format_prompt(ex.prompt, tokenizer, fmt) + (cfg.control_token or "") for ex in examples]
    if cfg.backend == "vllm":
        outputs = generate_vllm(run_dir, prompts, cfg)
    else:
        outputs = generate_hf(load_policy(cfg, run_dir, device), tokenizer, prompts, cfg)
    samples = []
    for ex, prompt, output in zip(examples, prompts, outputs):
        ref = dataloader.sft_target(ex)
        samples.append({"id": sample_id(ex.dataset_name, ex.prompt), "prompt": prompt, "prompt_turns": ex.prompt,
                        "policy": output, "chosen": ex.generations[ref] if ref is not None else None,
                        "dataset": ex.dataset_name})
    out = Path(cfg.samples_dir) / f"{cfg.exp_name}.json"
    write_json_atomic(out, {"sampled_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "exp_name": cfg.exp_name, "config": OmegaConf.to_container(cfg, resolve=True),
                            "samples": samples})
    if cfg.alpaca_eval:
        write_json_atomic(out.with_suffix(".alpaca_eval.json"), [
            {"instruction": s["prompt_turns"][-1]["content"], "output": s["policy"], "generator": cfg.exp_name,
             "dataset": s["dataset"]} for s in samples])
    print(f"wrote {len(samples)} samples to {out}", flush=True)
    return out


def evaluate(cfg, run_dir: Path) -> dict:
    """The run's own loss and metrics on a split, with its Trainer subclass and reference."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = models.load_tokenizer(cfg.model.tokenizer_name_or_path)
    trainer_class = train.class_by_name(trainers, cfg.loss.trainer, trainers.BasicTrainer, "loss.trainer")
    loader = train.make_loader(cfg, tokenizer, train.load_datasets(cfg, cfg.sample_split), split=cfg.sample_split,
                               rank=0, world_size=1, train=False)
    initial = train.build_policy(cfg, tokenizer, device)
    reference = train.build_reference(cfg, initial, device)
    policy = load_policy(cfg, run_dir, device)
    value_head = trainer_class.make_value_head(policy) if hasattr(trainer_class, "make_value_head") else None
    trainer = trainer_class(cfg, tokenizer, policy, reference, loader, loader, run_dir, value_head=value_head)
    metrics = trainer.evaluate()
    out = Path(cfg.samples_dir) / f"{cfg.exp_name}.eval.json"
    write_json_atomic(out, metrics)
    print(json.dumps(metrics, indent=2), flush=True)
    return metrics


@hydra.main(version_base=None, config_path=None, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        with open_dict(cfg):
            for key, value in DEFAULTS.items():
                if key not in cfg:
                    cfg[key] = value
        run_dir = run_dir_of(cfg)
        if cfg.mode == "sample":
            sample(cfg, run_dir)
        elif cfg.mode == "eval":
            evaluate(cfg, run_dir)
        else:
            raise DataError(f"mode={cfg.mode} is unknown for eval.py: use sample or eval")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
