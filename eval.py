"""Sample from a trained run, or compute its own loss metrics on a split (HALOs usage).

    python eval.py --config-path=<run_dir> ++mode=sample ++n_samples=512 ++model.eval_batch_size=32 ++samples_dir=samples/
    python eval.py --config-path=<run_dir> ++mode=eval ++n_eval_examples=256

The run's saved `config.yaml` is the configuration; every `key=value` / `++key=value` after it overrides it
(`--config-path` is relative to the working directory). Keys this script adds (plain `key=value` works too):

  mode            sample | eval
  n_samples       prompts to sample (null: all of the split)
  n_responses     responses sampled per prompt (K, default 1; > 1 needs temperature > 0), all in one batched pass
  split           the datasets' split to sample or evaluate (default test; train samples the training prompts)
  checkpoint      policy (LATEST/policy.pt: the plain weights, LoRA merged), hf (LATEST/hf, the save_pretrained
                  export: a model, or a peft adapter put back on the run's base), base (the config's own model:
                  model.name_or_path with model.load_from, what a run starts from) or a path to a policy.pt, a
                  directory holding one, or a save_pretrained directory
  backend         auto (default: vllm when it is installed, a GPU is visible and the checkpoint is a full
                  save_pretrained model, else hf) | hf (batched `generate`, left padding) | vllm (CUDA only; samples
                  a full save_pretrained model: LATEST/hf for checkpoint=policy)
  temperature     0 = greedy; top_p: nucleus mass (no top-k), used when temperature > 0
  max_new_tokens  null: model.max_length - the prompt's length, capped at MAX_NEW_TOKENS; sampling stops at EOS
  control_token   appended to every prompt; null: the run's loader's `chosen_control_token` if it has one (CSFT)
  alpaca_eval     also write <exp_name>.alpaca_eval.json in AlpacaEval's format (instruction, output, generator):
                  with ++datasets=[alpacaeval] ++n_samples=null, the `model_outputs` file `alpaca_eval evaluate`
                  reads (AlpacaEval's 805 prompts; offline: ++data_dir=<dir with alpaca_eval/alpaca_eval.json>)

HALOs' keys work too: ++saved_policy=<path> is checkpoint=<path>, ++mode=alpacaeval is mode=sample with
datasets=[alpacaeval], alpaca_eval=true and n_samples=null, top-level human_prefix= etc. are model.human_prefix=
...; HALOs keys with no equivalent here stop with one line naming what to use instead.

`mode=sample` writes `<samples_dir>/<exp_name>.json`: {"sampled_at", "exp_name", "checkpoint", "config", "samples":
[{"id", "prompt", "prompt_turns", "policy", "chosen", "dataset"}]}, the file compare.py reads; with n_responses = K > 1
each sample also has "responses" (the K texts; "policy" is the first), what label.py labels. `chosen` is the
dataset's reference output (the SFT target, as in HALOs), null where the prompt has none. The prompts are the
split's first `n_samples` in an order keyed by (seed, sample id) only, so every run of the same datasets samples the
same prompts; with the same seed, settings and batch size the outputs are identical.
`mode=eval` runs the run's own Trainer subclass and loss over the split's first `n_eval_examples`, with the run's
reference (the initial model, or the LoRA base) rebuilt (HALOs always used DPO's), and writes
`<samples_dir>/<exp_name>.eval.json`. Every failure a user can cause ends in one line and exit code 2.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm
from transformers import GenerationConfig

import dataloader
from feedbackalign import builders, checkpoints, models
from feedbackalign.configuration import check_overrides, compose, halos_overrides
from feedbackalign.errors import (CheckpointError, ConfigError, DataError, EnvError, UserError, one_line,
                                  report, warnings_as_lines)
from feedbackalign.feedback import last_user_turn
from feedbackalign.fileio import write_json_atomic

SPACE_HINT = "free space or point ++samples_dir= at a larger disk, then rerun"

DEFAULTS = {"mode": "sample", "n_samples": 128, "n_responses": 1, "samples_dir": "samples", "split": "test",
            "checkpoint": "policy", "backend": "auto", "temperature": 0.7, "top_p": 0.95, "max_new_tokens": None, "control_token": None,
            "alpaca_eval": False}
MODES, BACKENDS, SPLITS = ("sample", "eval"), ("auto", "hf", "vllm"), ("train", "test")
BASE_CHECKPOINT = "base"  # checkpoint=base: the config's own model (model.name_or_path + model.load_from)
MAX_NEW_TOKENS = 512  # cap of the default budget (model.max_length - prompt length)
USAGE = "usage: python eval.py --config-path=<run_dir> [++key=value ...]   (python eval.py --help for the keys)"


# ---------------------------------------------------------------- configuration


def parse_args(argv: list[str]) -> tuple[Path, str, list[str]]:
    """(run_dir, config_name, overrides) from Hydra-style arguments: --config-path/-cp, --config-name/-cn."""
    flags = {"--config-path": "path", "-cp": "path", "--config-name": "name", "-cn": "name"}
    found, overrides, args = {"name": "config"}, [], list(argv)
    while args:
        arg = args.pop(0)
        flag, eq, value = arg.partition("=")
        if flag in flags:
            if not eq:
                if not args:
                    raise ConfigError(f"{flag} needs a value: {USAGE}")
                value = args.pop(0)
            found[flags[flag]] = value
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}: {USAGE}")
        else:
            overrides.append(arg)
    if "path" not in found:
        raise ConfigError(f"no run directory given: {USAGE}")
    return Path(found["path"]).expanduser().resolve(), found["name"], overrides


def load_config(run_dir: Path, config_name: str, overrides: list[str]) -> DictConfig:
    """The run's saved config + this script's DEFAULTS (for keys it lacks) + the user's overrides."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = run_dir / f"{config_name}.yaml"
    if not run_dir.is_dir():
        raise CheckpointError(f"--config-path={run_dir}: no such run directory (give the directory train.py wrote, "
                        "e.g. runs/<exp_name>)")
    if not path.is_file():
        raise CheckpointError(f"--config-path={run_dir}: {path.name} is missing, so this is not a train.py run directory "
                        "(give runs/<exp_name>)")
    try:
        saved = OmegaConf.load(path)
        defaults = [f"++{k}={'null' if v is None else json.dumps(v)}" for k, v in DEFAULTS.items() if k not in saved]
        known = compose(defaults, config_dir=run_dir, config_name=config_name, check=False)
        check_overrides(overrides, known=known, hint=f"the keys are {path}'s and eval.py's own "
                                                     "(python eval.py --help)")
        return compose(defaults + list(overrides), config_dir=run_dir, config_name=config_name, check=False)
    except (HydraException, OmegaConfBaseException) as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[:2] if line.strip()) or type(e).__name__
        raise ConfigError(f"config of {run_dir} with overrides {' '.join(overrides) or '(none)'}: {why}") from None


def check_settings(cfg: DictConfig) -> None:
    """Reject settings this script cannot run, naming the key and its valid values."""
    rules = [
        ("mode", cfg.mode in MODES, f"one of {', '.join(MODES)}"),
        ("backend", cfg.backend in BACKENDS, f"one of {', '.join(BACKENDS)}"),
        ("split", cfg.split in SPLITS, f"one of {', '.join(SPLITS)}"),
        ("temperature", _number(cfg.temperature) and cfg.temperature >= 0, "a number >= 0 (0 = greedy)"),
        ("top_p", _number(cfg.top_p) and 0 < cfg.top_p <= 1, "a number in (0, 1]"),
        ("n_samples", cfg.n_samples is None or _positive_int(cfg.n_samples), "a positive integer or null"),
        ("n_responses", _positive_int(cfg.n_responses), "a positive integer (responses per prompt)"),
        ("n_responses", cfg.n_responses == 1 or not _number(cfg.temperature) or cfg.temperature > 0,
         "1 with temperature=0 (greedy decoding gives K identical responses), or set temperature > 0"),
        ("max_new_tokens", cfg.max_new_tokens is None or _positive_int(cfg.max_new_tokens),
         "a positive integer or null"),
        ("model.eval_batch_size", _positive_int(cfg.model.eval_batch_size), "a positive integer"),
    ]
    for key, ok, valid in rules:
        if not ok:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} is not valid for eval.py: use {valid}")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


# ---------------------------------------------------------------- checkpoints


def checkpoint_path(checkpoint: str, run_dir: Path) -> Path:
    """The weights `checkpoint` names: LATEST/policy.pt (`policy`), the LATEST/hf export (`hf`), or a path to a
    policy.pt, a directory holding one, or a save_pretrained directory (a model, or a peft adapter)."""
    if checkpoint == BASE_CHECKPOINT:
        raise CheckpointError("checkpoint=base is the config's own model, for mode=sample; mode=eval evaluates a "
                              "trained checkpoint: policy, hf or a path to a policy.pt")
    if checkpoint in ("policy", "hf"):
        latest = run_dir / "LATEST"
        if not (latest / "policy.pt").is_file():
            raise CheckpointError(f"{run_dir} has no checkpoint: {latest}/policy.pt does not exist (let the run finish "
                            "its first save, or pass ++checkpoint=<path to a policy.pt>)")
        if checkpoint == "policy":
            return latest.resolve() / "policy.pt"
        if not is_export(latest / "hf"):
            raise CheckpointError(f"checkpoint=hf: {latest}/hf holds no save_pretrained export (the run had export_hf="
                            "false, or LATEST is an intermediate checkpoint); use checkpoint=policy and backend=hf")
        return latest.resolve() / "hf"
    path = Path(str(checkpoint)).expanduser()
    if path.is_dir() and not is_export(path):
        path = path / "policy.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint={checkpoint} is neither policy, hf, nor an existing policy.pt, directory "
                        "holding one, or save_pretrained directory")
    return path


def is_export(path: Path) -> bool:
    """A save_pretrained directory: a model (config.json) or a peft adapter (adapter_config.json)."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def load_policy(cfg, tokenizer, path: Path | None, device, merge_lora: bool):
    """The trained policy in eval mode, from a model export; a peft adapter export on the run's base (LoRA); or
    the run's model with the weights of a HALOs-style policy.pt (plain, LoRA merged; peft-named weights get the
    adapters back); path None (checkpoint=base): the config's own model with its model.load_from. `merge_lora`
    folds adapters in (sampling; never mode=eval: its LoRA reference is the policy with adapters disabled)."""
    if path is None:
        policy = builders.build_policy(cfg, tokenizer, device, lora=False, in_4bit=False,
                                       activation_checkpointing=False)
    elif (path / "config.json").is_file():
        policy = models.build_model(str(path), models.torch_dtype(cfg.model.policy_dtype),
                                    attn_implementation=cfg.model.attn_implementation).to(device)
    elif path.is_dir():
        from peft import PeftModel

        base = builders.build_policy(cfg, tokenizer, device, lora=False, activation_checkpointing=False)
        # trainable only because mode=eval's Trainer builds an optimizer, which needs a parameter to hold
        policy = PeftModel.from_pretrained(base, str(path), is_trainable=True).to(device)
    else:
        state = read_weights(path)
        lora = any(k.startswith("base_model.model.") for k in state)
        policy = builders.build_policy(cfg, tokenizer, device, load_from="", lora=lora, in_4bit=False,
                                       activation_checkpointing=False)
        try:
            missing, unexpected = policy.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatch: another model's checkpoint
            raise CheckpointError(f"checkpoint {path} does not fit model={cfg.model.name}: "
                            f"{str(e).splitlines()[-1].strip()}") from None
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise CheckpointError(f"checkpoint {path} does not fit model={cfg.model.name}: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
    if merge_lora and models.is_lora(policy):
        policy = policy.merge_and_unload()
    return models.compute_in(policy.eval(), models.compute_dtype(cfg.model))


def read_weights(path: Path) -> dict:
    """The state dict of a policy.pt (checkpoints.load_policy_weights), its errors worded for `checkpoint`."""
    try:
        return checkpoints.load_policy_weights(path)
    except CheckpointError as e:
        why = str(e).splitlines()[0].removeprefix("model.load_from: ")
        raise CheckpointError(f"checkpoint {path} is unreadable ({why})") from None


# ---------------------------------------------------------------- prompts


def sample_id(dataset: str, turns: list[dict]) -> str:
    """A prompt's id: a hash of its dataset and chat turns (the same in every run; compare.py matches on it)."""
    text = dataset + "\x1e" + json.dumps(turns, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def eval_examples(cfg, split: str, n: int | None) -> list[tuple[str, object]]:
    """(id, Example) of the split's first n prompts, ordered by hash(seed, id): a prompt's place depends on the
    seed and its own content only, so runs over the same datasets get the same prompts in the same order."""
    by_id = {}
    for ds in builders.load_datasets(cfg, split):
        for ex in ds.examples:
            by_id.setdefault(sample_id(ex.dataset_name or ds.name, ex.prompt), ex)
    order = sorted(by_id, key=lambda i: hashlib.sha256(f"{cfg.seed}\x1e{i}".encode()).hexdigest())
    if not order:
        raise DataError(f"datasets={list(cfg.datasets)} have no {split} prompts to sample: pick another split")
    return [(i, by_id[i]) for i in order[:n]]


def control_token(cfg) -> str:
    """`control_token`, else the run's loader's `chosen_control_token` option (CSFT conditions on <|good|>)."""
    if cfg.control_token is not None:
        return str(cfg.control_token)
    return builders.loader_options(cfg).get("chosen_control_token") or ""


def prompt_texts(cfg, tokenizer, examples) -> list[str]:
    """Each prompt as the model saw it in training: chat template or HALOs markers, then the control token."""
    fmt = dataloader.PromptFormat.from_config(cfg.model)
    token = control_token(cfg)
    return [dataloader.format_prompt(ex.prompt, tokenizer, fmt, ex.source or "prompt") + token for _, ex in examples]


def encode(tokenizer, prompts: list[str], max_prompt_length: int) -> list[list[int]]:
    """Prompt ids as the DataLoaders make them, keeping the last `max_prompt_length` tokens (HALOs' rule)."""
    special = not dataloader.uses_chat_template(tokenizer)
    return [list(dataloader.encode_prompt(tokenizer, p, special))[-max_prompt_length:] for p in prompts]


def token_budgets(cfg, prompt_ids: list[list[int]]) -> list[int]:
    """New tokens per prompt: `max_new_tokens`, else model.max_length - prompt length (as in training, where
    prompt + response <= max_length), capped at MAX_NEW_TOKENS, at least 1."""
    if cfg.max_new_tokens is not None:
        return [int(cfg.max_new_tokens)] * len(prompt_ids)
    return [max(1, min(MAX_NEW_TOKENS, cfg.model.max_length - len(ids))) for ids in prompt_ids]


# ---------------------------------------------------------------- generation


def stop_ids(tokenizer, policy=None) -> list[int]:
    """EOS ids: the tokenizer's, plus the model's generation_config's (chat models end turns with their own)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    return sorted({int(i) for i in ids if i is not None})


def cut(ids: list[int], budget: int, stops: list[int]) -> list[int]:
    """Generated ids up to the budget and before the first stop token (the EOS itself is not output)."""
    ids = ids[:budget]
    return ids[: next((k for k, t in enumerate(ids) if t in stops), len(ids))]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generation_config(cfg, max_new: int, stops: list[int], pad_id: int):
    """Greedy at temperature 0, else pure temperature + nucleus sampling (top_k off, as vLLM's default)."""
    sampling = dict(do_sample=True, temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=0) \
        if cfg.temperature > 0 else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new, eos_token_id=stops, pad_token_id=pad_id, **sampling)


@torch.no_grad()
def generate_hf(policy, tokenizer, prompt_ids: list[list[int]], budgets: list[int], cfg) -> list[list[int]]:
    """Output ids per prompt from batched `generate` with left padding: a row ends at EOS, the batch when all
    rows have; each output is cut to its own budget. Deterministic given `seed` and `model.eval_batch_size`."""
    device = next(policy.parameters()).device
    pad, stops, bs = tokenizer.pad_token_id, stop_ids(tokenizer, policy), cfg.model.eval_batch_size
    torch.manual_seed(cfg.seed)
    outputs = []
    with tqdm(total=len(prompt_ids), desc="sample", unit="sample", dynamic_ncols=True) as bar:
        for start in range(0, len(prompt_ids), bs):
            chunk, limits = prompt_ids[start: start + bs], budgets[start: start + bs]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)
            attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
            out = policy.generate(input_ids=input_ids, attention_mask=attention,
                                  generation_config=generation_config(cfg, max(limits), stops, pad))
            outputs += [cut(row, limit, stops) for row, limit in zip(out[:, width:].tolist(), limits)]
            bar.update(len(chunk))
    return outputs


def generate_vllm(model_dir: Path, tokenizer, prompt_ids: list[list[int]], budgets: list[int], cfg,
                  n_responses: int = 1) -> list[list[int]]:
    """vLLM over a save_pretrained export, fed the same token ids as the hf backend; needs CUDA and vllm. Returns
    `n_responses` outputs per prompt, a prompt's consecutively (vLLM's `n`)."""
    missing = [] if torch.cuda.is_available() else ["a CUDA GPU (none is visible)"]
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        missing.append("the vllm package (pip install '.[gpu]')")
    if missing:
        raise EnvError(f"backend=vllm needs {' and '.join(missing)}: use backend=hf")
    greedy, stops = cfg.temperature == 0, stop_ids(tokenizer)
    llm = LLM(model=str(model_dir), seed=cfg.seed, dtype=str(models.compute_dtype(cfg.model)).removeprefix("torch."))
    params = [SamplingParams(n=n_responses, temperature=float(cfg.temperature), top_p=1.0 if greedy else
                             float(cfg.top_p), max_tokens=b, stop_token_ids=stops, seed=cfg.seed + k)
              for k, b in enumerate(budgets)]
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=True)
    return [cut(list(o.token_ids), b, stops) for r, b in zip(results, budgets) for o in r.outputs]


def vllm_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def full_model_dir(cfg, run_dir: Path, path: Path | None):
    """The full save_pretrained model (or hub name) vLLM can load for this checkpoint, else None: LATEST/hf for
    checkpoint=policy, the checkpoint's own directory, or model.name_or_path for checkpoint=base without
    model.load_from."""
    if cfg.checkpoint == BASE_CHECKPOINT:
        name = str(cfg.model.name_or_path)
        return None if cfg.model.load_from or name in (models.TINY_NAME, models.RANDOM_NAME) else Path(name)
    if cfg.checkpoint == "policy":
        path = run_dir / "LATEST" / "hf"
    return path.resolve() if (path / "config.json").is_file() else None


def sampling_plan(cfg, run_dir: Path | None) -> tuple[str, Path | None, Path | None]:
    """(backend, the weights' path (None for checkpoint=base), the full model directory vLLM loads or None)."""
    path = None if cfg.checkpoint == BASE_CHECKPOINT else checkpoint_path(cfg.checkpoint, run_dir)
    full = full_model_dir(cfg, run_dir, path)
    backend = cfg.backend if cfg.backend != "auto" else "vllm" if full is not None and vllm_available() else "hf"
    if backend == "vllm" and full is None:
        raise ConfigError(f"backend=vllm loads a full save_pretrained model, and checkpoint={cfg.checkpoint} is a "
                          f"policy.pt, a peft adapter or model.load_from weights ({path or cfg.model.load_from}): "
                          "use backend=hf")
    return backend, path, full


# ---------------------------------------------------------------- the two modes


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def device_of() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sample(cfg, run_dir: Path | None, out: Path | None = None) -> Path:
    """Sample the policy on the split's prompts, `n_responses` each, and write the samples file (default
    <samples_dir>/<exp_name>.json) and the AlpacaEval file."""
    backend, path, full = sampling_plan(cfg, run_dir)
    k = int(cfg.n_responses)
    tokenizer = builders.build_tokenizer(cfg)
    examples = eval_examples(cfg, cfg.split, cfg.n_samples)
    if cfg.alpaca_eval and "alpacaeval" in cfg.datasets:
        warn_partial_alpacaeval(cfg, len(examples))
    prompts = prompt_texts(cfg, tokenizer, examples)
    ids = encode(tokenizer, prompts, cfg.model.max_prompt_length)
    budgets = token_budgets(cfg, ids)
    if backend == "vllm":
        output_ids = generate_vllm(full, tokenizer, ids, budgets, cfg, n_responses=k)
    else:
        policy = load_policy(cfg, tokenizer, path, device_of(), merge_lora=True)
        output_ids = generate_hf(policy, tokenizer, [x for x in ids for _ in range(k)],
                                 [b for b in budgets for _ in range(k)], cfg)
    outputs = [decode(tokenizer, x) for x in output_ids]
    samples = []
    for n, ((sid, ex), prompt) in enumerate(zip(examples, prompts)):
        target = dataloader.sft_target(ex)
        responses = outputs[n * k: (n + 1) * k]
        samples.append({"id": sid, "prompt": prompt, "prompt_turns": ex.prompt, "policy": responses[0],
                        **({"responses": responses} if k > 1 else {}),
                        "chosen": ex.generations[target] if target is not None else None,
                        "dataset": ex.dataset_name})
    out = Path(out) if out is not None else Path(cfg.samples_dir) / f"{cfg.exp_name}.json"
    source = str(path) if path is not None else f"base: {cfg.model.name_or_path}" + \
        (f" + {cfg.model.load_from}" if cfg.model.load_from else "")
    write_json_atomic(out, {"sampled_at": now(), "exp_name": cfg.exp_name, "checkpoint": source,
                            "config": OmegaConf.to_container(cfg, resolve=True), "samples": samples},
                      what="samples", hint=SPACE_HINT)
    if cfg.alpaca_eval:
        write_json_atomic(out.with_name(f"{cfg.exp_name}.alpaca_eval.json"), [
            {"instruction": last_user_turn(s["prompt_turns"]), "output": s["policy"], "generator": cfg.exp_name,
             "dataset": s["dataset"]} for s in samples], what="AlpacaEval samples", hint=SPACE_HINT)
    print(f"wrote {len(samples)} samples to {out}", flush=True)
    return out


def warn_partial_alpacaeval(cfg, n_sampled: int) -> None:
    """`alpaca_eval evaluate` scores a model on all of AlpacaEval's prompts: say so when fewer are sampled."""
    total = len(eval_examples(cfg, cfg.split, None))
    if n_sampled < total:
        print(f"eval.py: warning: n_samples={cfg.n_samples} samples {n_sampled} of the {total} prompts; a leaderboard "
              "number from alpaca_eval needs all of AlpacaEval's: set ++n_samples=null", file=sys.stderr, flush=True)


def evaluate(cfg, run_dir: Path) -> dict:
    """The run's own loss and metrics on the split, with its Trainer subclass, loader and reference."""
    path = checkpoint_path(cfg.checkpoint, run_dir)
    device = device_of()
    tokenizer = builders.build_tokenizer(cfg)
    trainer_class = builders.trainer_class(cfg)
    loader = builders.build_loader(cfg, tokenizer, split=cfg.split, train=False)
    policy = load_policy(cfg, tokenizer, path, device, merge_lora=False)
    reference = builders.build_reference(cfg, tokenizer, device, policy=policy, policy_is_initial=False)
    if reference is not None:
        models.compute_in(reference, models.compute_dtype(cfg.model))
    heads = trainer_class.make_heads(policy)
    checkpoints.load_heads(path.parent, heads)
    trainer = trainer_class(cfg, tokenizer, policy, reference, loader, loader, run_dir, heads=heads)
    metrics = trainer.evaluate()
    out = Path(cfg.samples_dir) / f"{cfg.exp_name}.eval.json"
    write_json_atomic(out, {"evaluated_at": now(), "exp_name": cfg.exp_name, "checkpoint": str(path),
                            "split": cfg.split, "trainer": cfg.loss.trainer, "metrics": metrics},
                      what="evaluation", hint=SPACE_HINT)
    print(json.dumps(metrics, indent=2), flush=True)
    print(f"wrote {out}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with one `eval.py: error:` line for anything the user can fix)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        run_dir, name, overrides = parse_args(argv)
        cfg = load_config(run_dir, name, halos_overrides(overrides, "eval.py"))
        check_settings(cfg)
        models.check_available(cfg.model)
        builders.seed_everything(cfg.seed, False)
        (sample if cfg.mode == "sample" else evaluate)(cfg, run_dir)
    except UserError as e:
        return report("eval.py", one_line(e))
    except KeyboardInterrupt:
        print("eval.py: interrupted (a file is written whole or not at all)", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    warnings_as_lines("eval.py")
    sys.exit(main())
