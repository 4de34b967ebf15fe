"""BasicTrainer (loop, accumulation, clipping, eval, metrics, checkpoints, reference log-probs) + one subclass per loss.

A subclass declares what it needs as class attributes: `batch_kind` (the named Batch layout it trains on,
batches.KINDS), `default_dataloader`, `uses_reference`, and which batch parts its loss forward covers; and
implements `loss(batch, policy, reference, context) -> (loss, metrics)`, where `policy` and `reference` map each
part name to its response-aligned TokenLogps (logprobs.py), and a function from losses.py does the math.
Everything else (the one forward per microbatch, the reference live or cached, backward, accumulation, FSDP,
metering, logging, checkpoints, resume) is BasicTrainer's. Extra trained modules (PPO's value head) come from
`make_heads` and are trained, clipped and checkpointed beside the policy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import losses
from dataloader import PromptFormat
from feedbackalign import chat_templates, checkpoints, distributed, fileio, logprobs, run_summary, throughput
from feedbackalign.batches import Batch
from feedbackalign.errors import ConfigError, TrainingError
from feedbackalign.logprobs import TokenLogps, forward_options, sequence_logps
from feedbackalign.models import compute_dtype, is_lora, is_quantized
from feedbackalign.progress import progress

GRADIENT_SYNC = ("last_microbatch", "every_microbatch")  # model.gradient_sync (FSDP2 reduce-scatter in accumulation)
Logps = dict[str, TokenLogps]  # batch part name -> its rows' log-probs


def _mean_metrics(per_example: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    return {k: torch.cat([v.reshape(-1).float() for v in vs]).mean().item() for k, vs in per_example.items() if vs}


class BasicTrainer:
    """The shared loop. Hyper-parameters come from `config.loss`; the model/optimizer settings from `config`."""

    batch_kind: str = ""                        # the Batch layout the loss reads (batches.KINDS)
    default_dataloader: str = ""                # the DataLoader class used unless the loss yaml names another
    uses_reference: bool = False                # the loss needs reference log-probs (live or cached)
    loss_parts: tuple[str, ...] | None = None   # batch parts the loss forward scores (None: every part)
    reference_parts: tuple[str, ...] | None = None  # parts ever scored by the reference (the cache pass's share)
    needs_hidden: bool = False                  # the loss reads the last hidden state (a head on the policy)
    score_head: str | None = None               # a head that scores sequences: the export is a sequence classifier

    @classmethod
    def make_heads(cls, policy) -> dict[str, torch.nn.Module]:
        """Extra modules trained beside the policy (e.g. PPO's value head), by name; none by default."""
        return {}

    def __init__(self, config, tokenizer, policy, reference, train_loader, eval_loader, run_dir, *, rank=0,
                 world_size=1, reference_cache=None, heads=None):
        self.config, self.tokenizer, self.policy, self.reference = config, tokenizer, policy, reference
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.reference_cache = reference_cache
        self.heads = torch.nn.ModuleDict(heads or {})
        self.device = next(policy.parameters()).device
        self.peak_flops = throughput.peak_flops(config.peak_flops, self.device, compute_dtype(config.model))
        self.meter = throughput.Meter(policy.config)
        self.forward_options = forward_options(config.model)  # layout, token budget, packed attention
        # every trained module under one root, so checkpoints gather policy + heads with one state dict call
        self.trained_modules = torch.nn.ModuleDict({checkpoints.POLICY: policy, **self.heads})
        # gradients FSDP does not reduce: the heads', or every one when the policy is not sharded
        self.sharded = distributed.is_sharded(policy)
        self.replicated = list(self.heads.parameters()) if self.sharded else self.trainable_parameters()
        if config.model.gradient_sync not in GRADIENT_SYNC:
            raise ConfigError(f"model.gradient_sync={config.model.gradient_sync} is unknown: use "
                              f"{' or '.join(GRADIENT_SYNC)}")
        self.sync_every_microbatch = config.model.gradient_sync == "every_microbatch"
        self.optimizer = getattr(torch.optim, config.optimizer)(self.trainable_parameters(), lr=config.lr,
                                                                **self.optimizer_kwargs())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        self.step = 0
        self.examples_seen = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.eval_start = eval_loader.state_dict() if eval_loader is not None else None

    # ------------------------------------------------------------------ hooks for subclasses

    def loss(self, batch: Batch, policy: Logps, reference: Logps | None, context):
        raise NotImplementedError

    def step_context(self, microbatches: list[Batch]):
        """Per-optimizer-step state computed over all microbatches of all ranks before any loss (KTO's z0)."""
        return None

    # ------------------------------------------------------------------ forward passes (all metered here)

    def policy_logps(self, batch: Batch, parts=None, *, grad: bool = True) -> Logps:
        """The policy's log-probs of the batch's `parts` in one forward (with the graph unless grad=False)."""
        sequences = batch.sequences(parts)
        with nullcontext() if grad else torch.no_grad():
            values = self.sequence_logps(self.policy, sequences, with_hidden=self.needs_hidden and grad)
        self.meter.record(values, sequences, backward=grad)
        return batch.split(values, parts)

    @torch.no_grad()
    def reference_logps(self, batch: Batch, parts=None) -> Logps:
        """Reference log-probs of the batch's `parts`: from the content-keyed cache when enabled, else a live
        no-grad forward (LoRA: the policy with adapters disabled, no second model in memory)."""
        sequences = batch.sequences(parts)
        if self.reference_cache is not None:
            values = self.reference_cache.lookup(sequences, device=self.device)
        else:
            model = self.reference if self.reference is not None else self.policy
            with self.policy.disable_adapter() if self.reference is None and is_lora(self.policy) else nullcontext():
                values = self.sequence_logps(model, sequences)
            self.meter.record(values, sequences, backward=False, policy=False)
        return batch.split(values, parts)

    def sequence_logps(self, model, sequences, with_hidden: bool = False) -> TokenLogps:
        """logprobs.sequence_logps with the run's forward options; a sharded model's ranks first agree on the
        number of packed forwards (the token budget splits each rank's microbatch its own way)."""
        forwards = logprobs.forward_count(sequences, **self.forward_options)
        if distributed.is_sharded(model) and self.world_size > 1 and self.forward_options["max_tokens"]:
            count = torch.tensor([forwards], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            forwards = int(count.item())
        return sequence_logps(model, sequences, self.tokenizer.pad_token_id, with_hidden=with_hidden,
                              forwards=forwards, **self.forward_options)

    def forward(self, batch: Batch, *, grad: bool = True) -> tuple[Logps, Logps | None]:
        """(policy, reference) log-probs of the parts the loss scores."""
        reference = self.reference_logps(batch, self.loss_parts) if self.uses_reference else None
        return self.policy_logps(batch, self.loss_parts, grad=grad), reference

    # ------------------------------------------------------------------ distributed helpers

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-example tensor from every rank, in rank order (sizes may differ: KTO's sides)."""
        tensor = tensor.detach().reshape(-1).float()
        if self.world_size == 1:
            return tensor.cpu()
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([tensor.numel()], device=self.device))
        width = max(int(n) for n in sizes)
        padded = torch.cat([tensor, tensor.new_zeros(width - tensor.numel())])
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)]).cpu()

    # ------------------------------------------------------------------ optimisation

    def optimizer_kwargs(self) -> dict:
        return {"weight_decay": self.config.weight_decay} if self.config.optimizer in ("AdamW", "Adam") else {}

    def lr_lambda(self, step: int) -> float:
        """Linear warmup over `warmup_steps`, then constant (HALOs) or linear/cosine decay to 0."""
        warm = self.config.warmup_steps
        if step < warm:
            return (step + 1) / (warm + 1)
        total = max(len(self.train_loader), warm + 1)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return {"constant": 1.0, "linear": 1.0 - progress,
                "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[self.config.lr_schedule]

    def trainable_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad] + list(self.heads.parameters())

    def clip_gradients(self) -> tuple[torch.Tensor, bool]:
        """Clip the policy's gradients to max_grad_norm (and the heads' to head_max_grad_norm, apart: their
        tensors are not FSDP's DTensors); returns (policy grad norm, every norm finite)."""
        norm = distributed.local_value(torch.nn.utils.clip_grad_norm_(
            [p for p in self.policy.parameters() if p.requires_grad], self.config.model.max_grad_norm))
        finite = bool(torch.isfinite(norm))
        if len(self.heads):
            heads = torch.nn.utils.clip_grad_norm_(self.heads.parameters(), self.config.model.head_max_grad_norm)
            finite &= bool(torch.isfinite(heads))
        return norm, finite

    def train_step(self, microbatches: list[Batch]) -> dict[str, float]:
        """One optimizer step over this rank's microbatches: loss / accumulation, backward, clip, step.

        Each microbatch loss is a mean over its items, divided by the accumulation steps; FSDP (or
        `average_gradients`) averages over ranks. Loaders give every (ranks x accumulation) split of a global
        batch the same equal-sized microbatches, so 1 process x 2 steps and 2 processes x 1 step give one update.
        Under FSDP2 with model.gradient_sync=last_microbatch, gradients accumulate unsharded on each rank and are
        reduce-scattered once, after the last microbatch's backward (one reduction per step instead of one per
        microbatch, at the memory of one unsharded fp32 gradient: feedbackalign/memory.py)."""
        self.policy.train()
        self.meter.take()  # forwards since the last step (an evaluation) are not this step's work
        started = time.perf_counter()
        context = self.step_context(microbatches)
        per_example: dict[str, list[torch.Tensor]] = {}
        finite = True
        for i, batch in enumerate(microbatches):
            if self.sharded:
                self.policy.set_requires_gradient_sync(self.sync_every_microbatch or i == len(microbatches) - 1)
            policy, reference = self.forward(batch)
            loss, metrics = self.loss(batch, policy, reference, context)
            finite &= bool(torch.isfinite(loss.detach()).all())
            (loss / len(microbatches)).backward()
            for k, v in metrics.items():
                per_example.setdefault(k, []).append(self.gather(v))
        distributed.average_gradients(self.replicated, self.world_size)
        grad_norm, grads_finite = self.clip_gradients()
        bad_ranks = self.all_reduce_sum(torch.tensor(0.0 if finite and grads_finite else 1.0, device=self.device))
        self.apply_or_skip(bool(bad_ranks == 0))
        elapsed = time.perf_counter() - started
        out = _mean_metrics(per_example)
        out.update({"grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
                    "examples/s": self.config.model.batch_size / elapsed, "s/step": elapsed,
                    "skipped_steps": self.nonfinite_total, **self.throughput_metrics(elapsed)})
        return out

    def throughput_metrics(self, elapsed: float) -> dict[str, float]:
        """tokens/s (len(prompt) + len(response) of every sequence a policy forward scored, KL partners included:
        comparable across layouts and with TRL), computed_tokens/s (positions every forward really computed,
        live reference included), padding_fraction and MFU, summed over ranks (throughput.Meter)."""
        work = self.meter.take()
        names = ("sequence_tokens", "tokens", "positions", "flops")
        totals = dict(zip(names, self.all_reduce_sum(torch.tensor([float(work[n]) for n in names],
                                                                  dtype=torch.float64, device=self.device)).tolist()))
        out = {"tokens/s": totals["sequence_tokens"] / elapsed, "computed_tokens/s": totals["tokens"] / elapsed,
               "padding_fraction": 1 - totals["tokens"] / max(totals["positions"], 1)}
        if self.peak_flops is not None:
            out["mfu"] = throughput.mfu(totals["flops"], elapsed, self.peak_flops * self.world_size)
        return out

    def apply_or_skip(self, finite: bool) -> None:
        """Take the step, or skip a non-finite one (no update, counted in `skipped_steps`); max_nonfinite_steps
        in a row stop the run with TrainingError before anything is saved, so the last good checkpoint stays."""
        if finite:
            self.optimizer.step()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_row >= self.config.max_nonfinite_steps:
                latest = self.run_dir / "LATEST"
                kept = f"the last good checkpoint {latest.resolve()} was kept" if latest.exists() else \
                    "no checkpoint was written"
                raise TrainingError(
                    f"{self.nonfinite_in_row} non-finite steps in a row (loss or gradient NaN/inf) up to step "
                    f"{self.step + 1}, max_nonfinite_steps={self.config.max_nonfinite_steps}: lower lr, check the "
                    f"data or use float32; {kept}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss metrics over the eval split with the run's own loss (never a stand-in)."""
        if self.eval_loader is None:
            return {}
        self.policy.eval()
        per_example: dict[str, list[torch.Tensor]] = {}
        self.eval_loader.load_state_dict(self.eval_start)
        batches = progress(self.eval_loader, desc="eval", total=len(self.eval_loader), unit="batch", rank=self.rank,
                           leave=False)
        for batch in batches:
            context = self.step_context([batch])
            policy, reference = self.forward(batch)
            loss, metrics = self.loss(batch, policy, reference, context)
            metrics = {"loss": loss.detach().reshape(1), **metrics}
            for k, v in metrics.items():
                per_example.setdefault(k, []).append(self.gather(v))
        return {f"eval/{k}": v for k, v in _mean_metrics(per_example).items()}

    # ------------------------------------------------------------------ the loop

    def log(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        record = {"step": self.step, "examples": self.examples_seen, **metrics}
        fileio.append_line(self.metrics_path, json.dumps(record), what="metrics",  # flushed and fsync'd
                           hint="free space, then resume=true (the last checkpoint is kept)")
        if self.config.wandb.enabled:
            import wandb

            wandb.log({**metrics, "examples": self.examples_seen})  # the x axis (train.start_wandb)

    def train(self) -> dict:
        """Run until the loader is exhausted: eval every `eval_every` examples and after the last step, checkpoint,
        final save; returns the run's summary (run_summary.py), which rank 0 also writes to summary.json. The
        final evaluation (skipped when the last step was evaluated) costs one pass over n_eval_examples: forwards
        only, e.g. 64 pairs at 7B on 8 GPUs take seconds, and the held-out numbers are those of the saved weights."""
        started = time.perf_counter()
        accum = self.config.model.gradient_accumulation_steps
        next_eval = (self.examples_seen // self.config.eval_every + 1) * self.config.eval_every
        evaluated, evaluated_at = {}, None   # the last held-out metrics and their step
        if self.step == 0 and self.config.do_first_eval and self.eval_loader is not None:
            evaluated, evaluated_at = self.evaluate(), 0
            self.log(evaluated)
        next_ckpt = self.next_checkpoint_at()
        window = run_summary.Window()
        microbatches = []
        with tqdm(total=len(self.train_loader), initial=self.step, disable=self.rank != 0, desc="train",
                  dynamic_ncols=True) as bar:  # closed on errors too, so an error message is the last line
            for batch in self.train_loader:
                microbatches.append(batch)
                if len(microbatches) < accum:
                    continue
                metrics = self.train_step(microbatches)
                microbatches = []
                self.step += 1
                self.examples_seen += self.config.model.batch_size
                window.add(metrics)
                if self.examples_seen >= next_eval:
                    evaluated, evaluated_at = self.evaluate(), self.step
                    metrics.update(evaluated)
                    next_eval += self.config.eval_every
                self.log(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
                if next_ckpt is not None and self.examples_seen >= next_ckpt:
                    if self.step < len(self.train_loader):  # the final save follows the last step
                        self.save(intermediate=True)
                    next_ckpt = self.next_checkpoint_at()
        if self.eval_loader is not None and evaluated_at != self.step:
            evaluated = self.evaluate()   # held-out metrics of the final weights, for the log and the summary
            self.log(evaluated)
        self.save()
        return self.finish(window, evaluated, time.perf_counter() - started)

    def finish(self, window, evaluated: dict, seconds: float) -> dict:
        """The run's summary (run_summary.summarize), written to <run_dir>/summary.json by rank 0."""
        eval_examples = 0 if self.eval_loader is None else self.eval_loader.items_per_epoch
        summary = run_summary.summarize(self.config, self.run_dir, steps=self.step, examples=self.examples_seen,
                                        window=window, evaluated=evaluated, eval_examples=eval_examples,
                                        seconds=seconds, skipped_steps=self.nonfinite_total)
        if self.rank == 0:
            fileio.write_json_atomic(self.run_dir / run_summary.FILE, summary)
        return summary

    def next_checkpoint_at(self):
        every = self.config.intermediate_checkpoints
        return None if not every else (self.examples_seen // every + 1) * every

    # ------------------------------------------------------------------ checkpoints

    def train_state(self) -> checkpoints.TrainState:
        """What a checkpoint saves and a resume restores (checkpoints.py reads nothing else of the trainer)."""
        progress = {"step": self.step, "examples_seen": self.examples_seen, "nonfinite_total": self.nonfinite_total,
                    "nonfinite_in_row": self.nonfinite_in_row, "data": self.train_loader.state_dict()}
        return checkpoints.TrainState(self.trained_modules, self.optimizer, self.scheduler, progress)

    def save(self, intermediate: bool = False) -> None:
        """Sharded state every time; policy.pt (gathered) in the final checkpoint, or in every one with
        consolidate_checkpoints=all; the hf/ export with the final one (export_hf). A checkpoint that cannot fit
        on the disk is refused before anything is written (every rank agrees); one that runs out of space while
        writing is removed. Either way LATEST still points at the last complete checkpoint and the run stops with
        one line naming the directory and the bytes needed."""
        cfg = self.config
        state, export = self.train_state(), cfg.export_hf and not intermediate
        consolidate = not intermediate or cfg.consolidate_checkpoints == "all"
        where = self.run_dir / "checkpoints"
        needed = checkpoints.checkpoint_bytes(state, consolidate=consolidate, export=export)
        what = f"checkpoint of step {self.step}"
        hint = "free space (or lower keep_checkpoints), then resume=true to continue from the last checkpoint"
        if self.all_reduce_sum(torch.tensor(float(not fileio.has_space(where, needed)), device=self.device)) > 0:
            raise fileio.out_of_space(where, needed, what, hint)
        template = chat_templates.export_template(self.tokenizer, PromptFormat.from_config(cfg.model))
        cleanup = (lambda: checkpoints.remove_temporaries(self.run_dir)) if self.rank == 0 else None
        with fileio.reporting_full_disk(where, needed=needed, what=what, hint=hint, cleanup=cleanup):
            checkpoints.save(self.run_dir, state, tokenizer=self.tokenizer, rank=self.rank,
                             world_size=self.world_size, keep=cfg.keep_checkpoints, consolidate=consolidate,
                             export=export, merge_lora=cfg.model.lora.merge_on_export, chat_template=template,
                             score_head=self.score_head)

    def resume_from(self, run_dir) -> None:
        """Policy, heads, optimizer, scheduler, RNG, step and data position from run_dir/LATEST; metrics logged
        after that checkpoint (by a run killed later) are dropped so the resumed run rewrites them."""
        progress = checkpoints.load_resume_state(run_dir, self.train_state(), rank=self.rank,
                                                 world_size=self.world_size)
        self.step, self.examples_seen = progress["step"], progress["examples_seen"]
        self.nonfinite_total, self.nonfinite_in_row = progress["nonfinite_total"], progress["nonfinite_in_row"]
        self.train_loader.load_state_dict(progress["data"])
        if self.rank == 0:
            checkpoints.truncate_metrics(self.metrics_path, self.step)


# ====================================================================== losses on one forward


def preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict:
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": policy_chosen.detach(), "logps/rejected": policy_rejected.detach()}


class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning: token-mean NLL over every target token of the optimizer step (all microbatches,
    all ranks), so accumulation and data parallelism give the update of one big batch."""

    batch_kind = "sft"
    default_dataloader = "SFTDataLoader"

    def step_context(self, microbatches):
        tokens = sum(len(s.response_ids) for batch in microbatches for s in batch.sequences(self.loss_parts))
        return self.all_reduce_sum(torch.tensor(float(tokens), device=self.device)), len(microbatches)

    def loss(self, batch, policy, reference, context):
        step_tokens, n_micro = context
        targets = policy["targets"]
        token_mean = losses.sft_loss_from_token_logps(targets.token_logps, targets.mask)
        scale = targets.counts.sum() * n_micro * self.world_size / step_tokens
        return token_mean * scale, {"loss": token_mean.detach().reshape(1), "logps/target": targets.sums.detach()}


class CSFTTrainer(SFTTrainer):
    """Conditional SFT: SFT on targets prefixed with <|good|>/<|bad|> control tokens (HALOs' CSFT)."""

    batch_kind = "conditional_sft"
    default_dataloader = "ConditionalSFTDataLoader"


class PairedPreferenceTrainer(BasicTrainer):
    """Base for pairwise losses: calls `pair_loss(chosen, rejected, reference_chosen, reference_rejected)` on the
    parts' TokenLogps (references None without a reference) and reports HALOs' paired metrics."""

    batch_kind = "pairs"
    default_dataloader = "PairedPreferenceDataLoader"

    def pair_loss(self, chosen: TokenLogps, rejected: TokenLogps, reference_chosen: TokenLogps | None,
                  reference_rejected: TokenLogps | None):
        raise NotImplementedError

    def loss(self, batch, policy, reference, context):
        reference = reference or {"chosen": None, "rejected": None}
        per_example, chosen_rewards, rejected_rewards = self.pair_loss(policy["chosen"], policy["rejected"],
                                                                       reference["chosen"], reference["rejected"])
        metrics = preference_metrics(chosen_rewards, rejected_rewards, policy["chosen"].sums,
                                     policy["rejected"].sums)
        metrics["loss"] = per_example.detach()
        return per_example.mean(), metrics


class DPOTrainer(PairedPreferenceTrainer):
    """DPO (Rafailov et al. 2023); `label_smoothing` > 0 is conservative DPO."""

    uses_reference = True

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        return losses.dpo_loss(chosen.sums, rejected.sums, ref_chosen.sums, ref_rejected.sums, self.config.loss.beta,
                               self.config.loss.label_smoothing)


class CDPOTrainer(DPOTrainer):
    """Conservative DPO (Mitchell 2023): DPO with label smoothing epsilon, set in config/loss/cdpo.yaml."""


class IPOTrainer(PairedPreferenceTrainer):
    """IPO (Azar et al. 2023), length-normalised log-ratios as in HALOs."""

    uses_reference = True

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        return losses.ipo_loss(chosen.sums, rejected.sums, ref_chosen.sums, ref_rejected.sums, self.config.loss.tau,
                               chosen.counts, rejected.counts)


class NCAPairTrainer(PairedPreferenceTrainer):
    """NCA on pairs (Chen et al. 2024, the paired form)."""

    uses_reference = True

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        return losses.nca_pair_loss(chosen.sums, rejected.sums, ref_chosen.sums, ref_rejected.sums,
                                    self.config.loss.beta)


class SLiCTrainer(PairedPreferenceTrainer):
    """SLiC-HF (Zhao et al. 2023): rank calibration + lambda * SFT on the chosen; no reference."""

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        return losses.slic_loss(chosen.sums, rejected.sums, self.config.loss.delta, self.config.loss.lambda_coef)


class SimPOTrainer(PairedPreferenceTrainer):
    """SimPO (Meng et al. 2024): length-normalised policy log-probs with a target margin; no reference."""

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        return losses.simpo_loss(chosen.sums, rejected.sums, chosen.counts, rejected.counts, self.config.loss.beta,
                                 self.config.loss.gamma_beta_ratio)


class ORPOTrainer(PairedPreferenceTrainer):
    """ORPO (Hong et al. 2024): chosen NLL + alpha * odds-ratio term; no reference."""

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        return losses.orpo_loss(chosen.sums, rejected.sums, chosen.counts, rejected.counts, self.config.loss.alpha)


class KTOTrainer(BasicTrainer):
    """KTO (Ethayarajh et al. 2024): z0 from mismatched (x_i, y_{i+1}) pairs over the whole step, all ranks."""

    batch_kind = "unpaired"
    default_dataloader = "UnpairedPreferenceDataLoader"
    uses_reference = True
    loss_parts = ("targets",)

    def step_context(self, microbatches):
        """z0 = max(0, mean KL-partner log-ratio) over every microbatch of the step on every rank."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in microbatches:
            policy = self.policy_logps(batch, ("kl_partners",), grad=False)["kl_partners"]
            reference = self.reference_logps(batch, ("kl_partners",))["kl_partners"]
            pieces = losses.kto_kl_sum_count(policy.sums, reference.sums)
            total += torch.stack([p.double().to(self.device) for p in pieces])
        total = self.all_reduce_sum(total)
        return losses.kto_kl_from_sum_count(total[0], total[1])

    def loss(self, batch, policy, reference, context):
        desirable = batch.values["desirable"].to(self.device)
        targets = policy["targets"]
        per_example, rewards = losses.kto_loss(
            targets.sums, reference["targets"].sums, desirable, context.to(targets.sums.dtype).reshape(()),
            self.config.loss.beta, self.config.loss.desirable_weight, self.config.loss.undesirable_weight)
        metrics = {"loss": per_example.detach(), "kl": context.detach().reshape(1).float()}
        for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
            if bool(self.all_reduce_sum(sel.sum().float()) > 0):
                metrics[f"rewards/{name}"] = rewards[sel] if sel.any() else rewards.new_zeros(0)
                metrics[f"logps/{name}"] = targets.sums.detach()[sel] if sel.any() else rewards.new_zeros(0)
        return per_example.mean(), metrics


class GroupTrainer(BasicTrainer):
    """Base for K-wise losses: policy/reference sums reshaped (B, K) with the batch's rewards (B, K)."""

    batch_kind = "groups"
    default_dataloader = "RewardDataLoader"
    uses_reference = True
    group_loss = None

    def loss(self, batch, policy, reference, context):
        rewards = batch.values["rewards"].to(self.device)
        b, k = rewards.shape
        pol, ref = policy["responses"].sums.view(b, k), reference["responses"].sums.view(b, k)
        per_example, model_rewards = type(self).group_loss(pol, ref, rewards.to(pol.dtype), self.config.loss.beta,
                                                           self.config.loss.alpha)
        best = rewards.argmax(-1, keepdim=True)
        worst = rewards.argmin(-1, keepdim=True)
        metrics = preference_metrics(model_rewards.gather(1, best).squeeze(1),
                                     model_rewards.gather(1, worst).squeeze(1),
                                     pol.detach().gather(1, best).squeeze(1), pol.detach().gather(1, worst).squeeze(1))
        metrics["loss"] = per_example.detach()
        return per_example.mean(), metrics


class NCATrainer(GroupTrainer):
    """NCA (Chen et al. 2024): each response's own reward-weighted binary classification; K from the data."""

    group_loss = staticmethod(losses.nca_loss)


class InfoNCATrainer(GroupTrainer):
    """InfoNCA (Chen et al. 2024): K-way softmax over model rewards; DPO is its K=2 one-hot case."""

    group_loss = staticmethod(losses.infonca_loss)


class CUTTrainer(BasicTrainer):
    """CUT (Xu et al. 2023): MLE on judgment-conditioned rows + unlikelihood on tokens the judgment flags."""

    batch_kind = "judged"
    default_dataloader = "JudgmentDataLoader"

    def loss(self, batch, policy, reference, context):
        judged, plain = policy["judged"], policy["plain"]
        loss, nll, ul = losses.cut_loss_from_token_logps(judged.token_logps, judged.mask, plain.token_logps,
                                                         plain.mask, batch.values["weight_unlike"].to(self.device),
                                                         self.config.loss.threshold)
        metrics = {"loss": loss.detach().reshape(1), "nll": nll.detach().reshape(1)}
        if ul is not None:
            metrics["unlikelihood"] = ul.detach().reshape(1)
        return loss, metrics


class PPOTrainer(BasicTrainer):
    """HALOs' offline one-step PPO: the reference is the old policy, dataset scores are the rewards, and a value
    head on the last hidden state is the critic."""

    batch_kind = "unpaired"
    default_dataloader = "UnpairedPreferenceDataLoader"
    uses_reference = True
    loss_parts = ("targets",)
    reference_parts = ("targets",)
    needs_hidden = True

    @classmethod
    def make_heads(cls, policy) -> dict[str, torch.nn.Module]:
        """A linear value head on the last hidden state (HALOs' critic), zero-initialised bias."""
        hidden = policy.config.hidden_size
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(head.weight, std=1 / (hidden + 1))
        torch.nn.init.zeros_(head.bias)
        return {"value_head": head.to(next(policy.parameters()).device)}

    def loss(self, batch, policy, reference, context):
        targets, head = policy["targets"], self.heads["value_head"]
        values = head(targets.hidden.to(head.weight.dtype)).squeeze(-1)
        c = self.config.loss
        loss, policy_loss, critic_loss, kl = losses.ppo_loss(
            targets.token_logps, reference["targets"].token_logps.to(targets.token_logps.dtype), values, targets.mask,
            batch.values["scores"].to(self.device, targets.token_logps.dtype), c.gamma, c.lam, c.cliprange,
            c.critic_coef, c.kl_coef)
        return loss, {"loss": loss.detach().reshape(1), "loss/policy": policy_loss.detach().reshape(1),
                      "loss/critic": critic_loss.detach().reshape(1), "kl": kl.detach().reshape(1)}


class RewardModelTrainer(PairedPreferenceTrainer):
    """Bradley-Terry reward model (Ouyang et al. 2022, Eq. 1; HALOs' BradleyTerryTrainer): a linear `score` head
    on the policy's last hidden state, trained on pairs with -logσ(s_c - s_r); reports accuracy and margin.

    A sequence's score is read at the last position that predicts one of its response tokens: the response's
    final text token when it ends with EOS, which is what AutoModelForSequenceClassification reads given the
    prompt and the response without EOS (HALOs' reward model reads there too: its pad token is EOS). The final
    export (LATEST/hf) is that sequence classifier: the backbone and this head (checkpoints.save's score_head),
    with the prompt format and lengths in its config (`feedbackalign_reward_input`, read by the rm labeler).
    At 7B the LM head's logits at response positions are still computed by the shared forward (about 2% of the
    FLOPs at a 32k vocabulary) and unused."""

    needs_hidden = True
    score_head = "score"

    @classmethod
    def make_heads(cls, policy) -> dict[str, torch.nn.Module]:
        """The scalar score head, as a sequence classifier's (no bias), initialised small."""
        if is_quantized(policy):
            raise ConfigError("loss=rm exports a sequence classifier with the adapters merged, which a 4-bit base "
                              "cannot hold: set model.lora.load_in_4bit=false")
        hidden = policy.config.hidden_size
        head = torch.nn.Linear(hidden, 1, bias=False)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
        return {cls.score_head: head.to(next(policy.parameters()).device)}

    def __init__(self, config, tokenizer, policy, *args, **kwargs):
        super().__init__(config, tokenizer, policy, *args, **kwargs)
        model = policy.get_base_model() if is_lora(policy) else policy
        model.config.feedbackalign_reward_input = {
            "score_position": "last response text token (input: prompt + response, no EOS)",
            "max_length": config.model.max_length, "max_prompt_length": config.model.max_prompt_length,
            "prompt_format": dataclasses.asdict(PromptFormat.from_config(config.model))}

    def sequence_scores(self, logps: TokenLogps) -> torch.Tensor:
        """(N,) scores: the head on the hidden state that predicts each row's last response token."""
        head = self.heads[self.score_head]
        rows = torch.arange(logps.mask.shape[0], device=logps.mask.device)
        hidden = logps.hidden[rows, logps.counts - 1]
        return head(hidden.to(head.weight.dtype)).squeeze(-1)

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        return losses.bradley_terry_loss(self.sequence_scores(chosen), self.sequence_scores(rejected))


class GRPOTrainer(BasicTrainer):
    """GRPO (Shao et al. 2024) as in HALOs' main branch: K responses per prompt with rewards (the K-response
    loader keeps a prompt's group in one microbatch), group-relative advantages, a clipped token ratio to the
    reference as the old policy, and a KL penalty to it. In loop.py with `reference=round` the reference is the
    round's sampling policy, so the ratio is GRPO's pi / pi_old. Logged: HALOs' KL, clip fraction, mean reward and
    |advantage|, and the best and worst response's log-ratio log pi/pi_ref as rewards/chosen and rewards/rejected
    (with their margin and accuracy, as the K-wise losses report)."""

    batch_kind = "groups"
    default_dataloader = "RewardDataLoader"
    uses_reference = True

    def loss(self, batch, policy, reference, context):
        rewards = batch.values["rewards"].to(self.device)
        responses = policy["responses"]
        advantages = losses.grpo_advantages(rewards).reshape(-1).to(responses.token_logps.dtype)
        c = self.config.loss
        loss, kl, clipped = losses.grpo_loss(responses.token_logps,
                                             reference["responses"].token_logps.to(responses.token_logps.dtype),
                                             responses.mask, advantages, c.beta, c.epsilon)
        b, k = rewards.shape
        log_ratios = (responses.sums - reference["responses"].sums.to(responses.sums.dtype)).detach().view(b, k)
        best, worst = rewards.argmax(-1, keepdim=True), rewards.argmin(-1, keepdim=True)
        sums = responses.sums.detach().view(b, k)
        metrics = preference_metrics(log_ratios.gather(1, best).squeeze(1), log_ratios.gather(1, worst).squeeze(1),
                                     sums.gather(1, best).squeeze(1), sums.gather(1, worst).squeeze(1))
        return loss, {**metrics, "loss": loss.detach().reshape(1), "kl": kl.reshape(1),
                      "clip_fraction": clipped.reshape(1), "rewards/mean": rewards.mean(-1),
                      "advantages/abs": advantages.detach().abs()}
