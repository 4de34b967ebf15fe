"""BasicTrainer (loop, accumulation, clipping, eval, metrics, checkpoints, reference log-probs) + one subclass per loss.

A subclass implements `loss(batch, policy, reference, context) -> (loss, metrics)` with tensors from logprobs.py
and a function from losses.py. Everything else (the one forward per microbatch, the reference live or cached,
backward, accumulation, FSDP, logging, checkpoints, resume) is BasicTrainer's. Layouts of `batch["sequences"]` are
the DataLoaders' (dataloader.py): pairs are [chosen..., rejected...], K-groups row-major, KTO [targets..., KL
partners...], CUT [judgment-conditioned..., plain...].
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import distributed
import losses
import throughput
from logprobs import TokenLogps, sequence_logps


TIMING_METRICS = ("tokens/s", "computed_tokens/s", "examples/s", "s/step", "mfu")  # wall-clock dependent


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and what to do."""


def _mean_metrics(per_example: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    return {k: torch.cat([v.reshape(-1).float() for v in vs]).mean().item() for k, vs in per_example.items() if vs}


class BasicTrainer:
    """The shared loop. Hyper-parameters come from `config.loss`; the model/optimizer settings from `config`."""

    def __init__(self, config, tokenizer, policy, reference, train_loader, eval_loader, run_dir, *, rank=0,
                 world_size=1, reference_cache=None, value_head=None):
        self.config, self.tokenizer, self.policy, self.reference = config, tokenizer, policy, reference
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.reference_cache = reference_cache
        self.value_head = value_head
        self.device = next(policy.parameters()).device
        self.peak_flops = throughput.peak_flops(config.peak_flops, self.device, next(policy.parameters()).dtype)
        self.layout = config.model.forward_layout
        self.row_tokens = config.model.pack_tokens
        # every trained module under one root, so checkpoints gather policy + value head with one state dict call
        self.trained_modules = torch.nn.ModuleDict({"policy": policy,
                                                    **({"value_head": value_head} if value_head else {})})
        # gradients FSDP does not reduce: the value head's, or every one when the policy is not sharded
        if distributed.is_sharded(policy):
            self.replicated = list(value_head.parameters()) if value_head is not None else []
        else:
            self.replicated = self.trainable_parameters()
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

    def loss(self, batch, policy: TokenLogps, reference: TokenLogps | None, context):
        raise NotImplementedError

    def loss_sequences(self, batch):
        """The sequences the loss scores with policy and reference (KTO, PPO: the targets, not the KL partners)."""
        return batch["sequences"]

    def step_context(self, microbatches):
        """Per-optimizer-step state computed over all microbatches of all ranks before any loss (KTO's z0)."""
        return None

    @property
    def uses_reference(self) -> bool:
        return bool(self.config.loss.use_reference_model)

    # ------------------------------------------------------------------ forward passes

    def policy_logps(self, sequences, with_hidden=False) -> TokenLogps:
        return sequence_logps(self.policy, sequences, self.tokenizer.pad_token_id, self.layout, self.row_tokens,
                              with_hidden=with_hidden)

    @torch.no_grad()
    def reference_logps(self, sequences) -> TokenLogps:
        """Reference token log-probs: from the content-keyed cache when enabled, else a live no-grad forward."""
        if self.reference_cache is not None:
            return self.reference_cache.lookup(sequences, device=self.device)
        model = self.reference if self.reference is not None else self.policy
        with self.reference_context():
            return sequence_logps(model, sequences, self.tokenizer.pad_token_id, self.layout, self.row_tokens)

    def reference_context(self):
        """LoRA runs use the base model with adapters disabled as the reference (no second model in memory)."""
        if self.reference is None and hasattr(self.policy, "disable_adapter"):
            return self.policy.disable_adapter()
        return nullcontext()

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
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return params

    def clip_gradients(self) -> tuple[torch.Tensor, bool]:
        """Clip the policy's gradients to max_grad_norm (and a value head's to v_head_max_grad_norm, apart: its
        tensors are not FSDP's DTensors); returns (policy grad norm, every norm finite)."""
        norm = distributed.local_value(torch.nn.utils.clip_grad_norm_(
            [p for p in self.policy.parameters() if p.requires_grad], self.config.model.max_grad_norm))
        finite = bool(torch.isfinite(norm))
        if self.value_head is not None:
            head = torch.nn.utils.clip_grad_norm_(self.value_head.parameters(), self.config.model.v_head_max_grad_norm)
            finite &= bool(torch.isfinite(head))
        return norm, finite

    def train_step(self, microbatches) -> dict[str, float]:
        """One optimizer step over this rank's microbatches: loss / accumulation, backward, clip, step.

        Each microbatch loss is a mean over its items, divided by the accumulation steps; FSDP (or
        `average_gradients`) averages over ranks. Loaders give every (ranks x accumulation) split of a global
        batch the same equal-sized microbatches, so 1 process x 2 steps and 2 processes x 1 step give one update."""
        self.policy.train()
        started = time.perf_counter()
        context = self.step_context(microbatches)
        per_example: dict[str, list[torch.Tensor]] = {}
        tokens = positions = sequence_tokens = flops = 0
        finite = True
        for batch in microbatches:
            sequences = self.loss_sequences(batch)
            reference = self.reference_logps(sequences) if self.uses_reference else None
            policy = self.policy_logps(sequences, with_hidden=self.value_head is not None)
            loss, metrics = self.loss(batch, policy, reference, context)
            finite &= bool(torch.isfinite(loss.detach()).all())
            (loss / len(microbatches)).backward()
            tokens, positions = tokens + policy.tokens, positions + policy.positions
            sequence_tokens += policy.sequence_tokens
            flops += self.model_flops(sequences, policy, reference)
            for k, v in metrics.items():
                per_example.setdefault(k, []).append(self.gather(v))
        distributed.average_gradients(self.replicated, self.world_size)
        grad_norm, grads_finite = self.clip_gradients()
        bad_ranks = self.all_reduce_sum(torch.tensor(0.0 if finite and grads_finite else 1.0, device=self.device))
        self.apply_or_skip(bool(bad_ranks == 0))
        elapsed = time.perf_counter() - started
        out = _mean_metrics(per_example)
        stats = self.all_reduce_sum(torch.tensor([float(tokens), float(positions), float(sequence_tokens), flops],
                                                 dtype=torch.float64, device=self.device)).tolist()
        out.update({"grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
                    "tokens/s": stats[2] / elapsed, "computed_tokens/s": stats[0] / elapsed,
                    "examples/s": self.config.model.batch_size / elapsed,
                    "padding_fraction": 1 - stats[0] / max(stats[1], 1), "s/step": elapsed,
                    "mfu": throughput.mfu(stats[3], elapsed, self.peak_flops * self.world_size),
                    "skipped_steps": self.nonfinite_total})
        return out

    def model_flops(self, sequences, policy: TokenLogps, reference: TokenLogps | None) -> float:
        """Model FLOPs of this microbatch's policy forward + backward and live reference forward (throughput.py);
        a cached reference costs none. tokens/s counts len(prompt) + len(response) per sequence (non-pad, as an
        unshared forward would), so it is comparable across layouts and with TRL."""
        context = throughput.causal_context(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
        flops = throughput.logps_flops(self.policy.config, policy, context, backward=True)
        if reference is not None:
            flops += throughput.logps_flops(self.policy.config, reference, context)
        return flops

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
        for batch in self.eval_loader:
            context = self.step_context([batch])
            sequences = self.loss_sequences(batch)
            reference = self.reference_logps(sequences) if self.uses_reference else None
            policy = self.policy_logps(sequences, with_hidden=self.value_head is not None)
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
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.config.wandb.enabled:
            import wandb

            wandb.log(metrics, step=self.examples_seen)

    def train(self) -> None:
        """Run until the loader is exhausted: eval every `eval_every` examples, checkpoint, final save."""
        accum = self.config.model.gradient_accumulation_steps
        next_eval = (self.examples_seen // self.config.eval_every + 1) * self.config.eval_every
        if self.step == 0 and self.config.do_first_eval and self.eval_loader is not None:
            self.log(self.evaluate())
        next_ckpt = self.next_checkpoint_at()
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
                if self.examples_seen >= next_eval:
                    metrics.update(self.evaluate())
                    next_eval += self.config.eval_every
                self.log(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
                if next_ckpt is not None and self.examples_seen >= next_ckpt:
                    if self.step < len(self.train_loader):  # the final save follows the last step
                        self.save(intermediate=True)
                    next_ckpt = self.next_checkpoint_at()
        self.save()

    def next_checkpoint_at(self):
        every = self.config.intermediate_checkpoints
        return None if not every else (self.examples_seen // every + 1) * every

    # ------------------------------------------------------------------ checkpoints

    def training_state(self) -> dict:
        return {"step": self.step, "examples_seen": self.examples_seen, "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_row": self.nonfinite_in_row, "data": self.train_loader.state_dict()}

    def save(self, intermediate: bool = False) -> None:
        checkpoints.save(self, intermediate=intermediate)

    def resume_from(self, run_dir) -> None:
        """Policy, optimizer, scheduler, RNG, step and data position from run_dir/LATEST; metrics logged after
        that checkpoint (by a run killed later) are dropped so the resumed run rewrites them."""
        state = checkpoints.load_resume_state(self, run_dir)
        self.step, self.examples_seen = state["step"], state["examples_seen"]
        self.nonfinite_total, self.nonfinite_in_row = state["nonfinite_total"], state["nonfinite_in_row"]
        self.train_loader.load_state_dict(state["data"])
        if self.rank == 0:
            checkpoints.truncate_metrics(self.metrics_path, self.step)


# ====================================================================== losses on one forward


def split_pairs(x: torch.Tensor):
    half = x.shape[0] // 2
    return x[:half], x[half:]


def preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict:
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": policy_chosen.detach(), "logps/rejected": policy_rejected.detach()}


class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning: token-mean NLL over every target token of the optimizer step (all microbatches,
    all ranks), so accumulation and data parallelism give the update of one big batch."""

    def step_context(self, microbatches):
        tokens = sum(len(s.response_ids) for batch in microbatches for s in self.loss_sequences(batch))
        return self.all_reduce_sum(torch.tensor(float(tokens), device=self.device)), len(microbatches)

    def loss(self, batch, policy, reference, context):
        step_tokens, n_micro = context
        token_mean = losses.sft_loss_from_token_logps(policy.token_logps, policy.mask)
        scale = policy.counts.sum() * n_micro * self.world_size / step_tokens
        return token_mean * scale, {"loss": token_mean.detach().reshape(1), "logps/target": policy.sums.detach()}


class CSFTTrainer(SFTTrainer):
    """Conditional SFT: SFT on targets prefixed with <|good|>/<|bad|> control tokens (HALOs' CSFT)."""


class PairedPreferenceTrainer(BasicTrainer):
    """Base for pairwise losses: calls `pair_loss(pc, pr, rc, rr)` and reports HALOs' paired metrics."""

    def pair_loss(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected, policy):
        raise NotImplementedError

    def loss(self, batch, policy, reference, context):
        pc, pr = split_pairs(policy.sums)
        rc, rr = split_pairs(reference.sums) if reference is not None else (None, None)
        per_example, chosen_rewards, rejected_rewards = self.pair_loss(pc, pr, rc, rr, policy)
        metrics = preference_metrics(chosen_rewards, rejected_rewards, pc, pr)
        metrics["loss"] = per_example.detach()
        return per_example.mean(), metrics


class DPOTrainer(PairedPreferenceTrainer):
    """DPO (Rafailov et al. 2023); `label_smoothing` > 0 is conservative DPO."""

    def pair_loss(self, pc, pr, rc, rr, policy):
        return losses.dpo_loss(pc, pr, rc, rr, self.config.loss.beta, self.config.loss.get("label_smoothing", 0.0))


class CDPOTrainer(DPOTrainer):
    """Conservative DPO (Mitchell 2023): DPO with label smoothing epsilon, set in config/loss/cdpo.yaml."""


class IPOTrainer(PairedPreferenceTrainer):
    """IPO (Azar et al. 2023), length-normalised log-ratios as in HALOs."""

    def pair_loss(self, pc, pr, rc, rr, policy):
        lc, lr = split_pairs(policy.counts)
        return losses.ipo_loss(pc, pr, rc, rr, self.config.loss.tau, lc, lr)


class NCAPairTrainer(PairedPreferenceTrainer):
    """NCA on pairs (Chen et al. 2024, the paired form)."""

    def pair_loss(self, pc, pr, rc, rr, policy):
        return losses.nca_pair_loss(pc, pr, rc, rr, self.config.loss.beta)


class SLiCTrainer(PairedPreferenceTrainer):
    """SLiC-HF (Zhao et al. 2023): rank calibration + lambda * SFT on the chosen; no reference."""

    def pair_loss(self, pc, pr, rc, rr, policy):
        return losses.slic_loss(pc, pr, self.config.loss.delta, self.config.loss.lambda_coef)


class SimPOTrainer(PairedPreferenceTrainer):
    """SimPO (Meng et al. 2024): length-normalised policy log-probs with a target margin; no reference."""

    def pair_loss(self, pc, pr, rc, rr, policy):
        lc, lr = split_pairs(policy.counts)
        return losses.simpo_loss(pc, pr, lc, lr, self.config.loss.beta, self.config.loss.gamma_beta_ratio)


class ORPOTrainer(PairedPreferenceTrainer):
    """ORPO (Hong et al. 2024): chosen NLL + alpha * odds-ratio term; no reference."""

    def pair_loss(self, pc, pr, rc, rr, policy):
        lc, lr = split_pairs(policy.counts)
        return losses.orpo_loss(pc, pr, lc, lr, self.config.loss.alpha)


class KTOTrainer(BasicTrainer):
    """KTO (Ethayarajh et al. 2024): z0 from mismatched (x_i, y_{i+1}) pairs over the whole step, all ranks."""

    def loss_sequences(self, batch):
        return batch["sequences"][: len(batch["desirable"])]

    def step_context(self, microbatches):
        """z0 = max(0, mean KL-partner log-ratio) over every microbatch of the step on every rank."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for batch in microbatches:
                partners = batch["sequences"][len(batch["desirable"]):]
                pieces = losses.kto_kl_sum_count(self.policy_logps(partners).sums, self.reference_logps(partners).sums)
                total += torch.stack([p.double().to(self.device) for p in pieces])
        total = self.all_reduce_sum(total)
        return losses.kto_kl_from_sum_count(total[0], total[1])

    def loss(self, batch, policy, reference, context):
        desirable = batch["desirable"].to(self.device)
        per_example, rewards = losses.kto_loss(
            policy.sums, reference.sums, desirable, context.to(policy.sums.dtype).reshape(()), self.config.loss.beta,
            self.config.loss.desirable_weight, self.config.loss.undesirable_weight)
        metrics = {"loss": per_example.detach(), "kl": context.detach().reshape(1).float()}
        for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
            if bool(self.all_reduce_sum(sel.sum().float()) > 0):
                metrics[f"rewards/{name}"] = rewards[sel] if sel.any() else rewards.new_zeros(0)
                metrics[f"logps/{name}"] = policy.sums.detach()[sel] if sel.any() else rewards.new_zeros(0)
        return per_example.mean(), metrics


class GroupTrainer(BasicTrainer):
    """Base for K-wise losses: policy/reference sums reshaped (B, K) with the loader's rewards (B, K)."""

    group_loss = None

    def loss(self, batch, policy, reference, context):
        rewards = batch["rewards"].to(self.device)
        b, k = rewards.shape
        pol, ref = policy.sums.view(b, k), reference.sums.view(b, k)
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

    def loss(self, batch, policy, reference, context):
        judged, plain = policy.rows(slice(0, len(batch["weight_unlike"]))), policy.rows(
            slice(len(batch["weight_unlike"]), None))
        loss, nll, ul = losses.cut_loss_from_token_logps(judged.token_logps, judged.mask, plain.token_logps,
                                                         plain.mask, batch["weight_unlike"].to(self.device),
                                                         self.config.loss.threshold)
        metrics = {"loss": loss.detach().reshape(1), "nll": nll.detach().reshape(1)}
        if ul is not None:
            metrics["unlikelihood"] = ul.detach().reshape(1)
        return loss, metrics


class PPOTrainer(BasicTrainer):
    """HALOs' offline one-step PPO: the reference is the old policy, dataset scores are the rewards."""

    @staticmethod
    def make_value_head(policy) -> torch.nn.Module:
        """A linear value head on the last hidden state (HALOs' critic), zero-initialised bias."""
        hidden = policy.config.hidden_size
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(head.weight, std=1 / (hidden + 1))
        torch.nn.init.zeros_(head.bias)
        return head.to(next(policy.parameters()).device)

    def loss_sequences(self, batch):
        return batch["sequences"][: len(batch["scores"])]

    def loss(self, batch, policy, reference, context):
        values = self.value_head(policy.hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        c = self.config.loss
        loss, policy_loss, critic_loss, kl = losses.ppo_loss(
            policy.token_logps, reference.token_logps.to(policy.token_logps.dtype), values, policy.mask,
            batch["scores"].to(self.device, policy.token_logps.dtype), c.gamma, c.lam, c.cliprange, c.critic_coef,
            c.kl_coef)
        return loss, {"loss": loss.detach().reshape(1), "loss/policy": policy_loss.detach().reshape(1),
                      "loss/critic": critic_loss.detach().reshape(1), "kl": kl.detach().reshape(1)}
