"""Pure loss math for aligning language models with offline feedback: tensors in, tensors out.

No model, no config object, no I/O. Conventions shared by every function:

- `*_logps` are per-sequence sums of completion-token log-probs, shape (B,), unless a docstring says otherwise;
  `*_token_logps` are (B, T) per-token log-probs with a (B, T) bool mask over label positions (already shifted).
- Functions return per-example `losses` (the caller takes the mean) unless they say they return a scalar.
- Reported rewards are detached. Work happens in the input dtype (float64 in, float64 out); only 16-bit
  logits are lifted to float32 before a log-softmax.
- Log-sigmoids use `F.logsigmoid`, never `log(sigmoid(.))`; `log(1 - p)` uses `_log1mexp`.
- A bad hyper-parameter (tau <= 0, label smoothing above 0.5) raises `errors.ConfigError`; bad tensors a user's
  data can cause (mismatched shapes, K < 2, an all-masked batch) raise `errors.DataError`; both name the function,
  the argument and what to do.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from feedbackalign.errors import ConfigError, DataError

IGNORE_INDEX = -100  # label value of prompt and padding positions (Hugging Face convention)


# ----------------------------------------------------------------------------------------------- helpers


def _check_same_shape(where: str, **tensors: torch.Tensor) -> None:
    """Raise DataError unless every named tensor has the same shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"losses.{where}: inputs must have one shape, got {shapes}; pass aligned tensors")


def _check_positive(where: str, name: str, value: float) -> None:
    """Raise ConfigError unless a hyper-parameter is > 0."""
    if not value > 0:
        raise ConfigError(f"losses.{where}: {name} must be > 0, got {value}; fix it in the loss config")


def _lengths(where: str, name: str, lengths, like: torch.Tensor) -> torch.Tensor:
    """Completion-token counts as a tensor of `like`'s dtype; every count must be >= 1."""
    lengths = torch.as_tensor(lengths, device=like.device).to(like.dtype)
    _check_same_shape(where, logps=like, **{name: lengths})
    if lengths.numel() and bool((lengths < 1).any()):
        raise DataError(f"losses.{where}: {name} has a count < 1 ({lengths.tolist()}); "
                        "every completion needs at least one label token (check truncation)")
    return lengths


def _log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp <= 0, stable at both ends (Maechler 2012, "Accurately computing log(1-exp(-|a|))").

    logp is clamped to <= -eps (eps = machine epsilon of the dtype) so that p = 1 gives a finite log(eps)
    instead of -inf; gradients stop at the clamp.
    """
    logp = logp.clamp(max=-torch.finfo(logp.dtype).eps)
    return torch.where(logp > -math.log(2.0), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    """16-bit logits lifted to float32 for a log-softmax; float32/float64 kept as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where the bool `mask` is True (masked garbage, even inf, is ignored)."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum()


def token_logps_from_logits(logits: torch.Tensor, labels: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) with the Hugging Face shift: logits[:, :-1] predict labels[:, 1:].

    Returns (token_logps (B, T-1), mask (B, T-1) bool); positions whose label is -100 hold 0 and mask False.
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise DataError(f"losses.token_logps_from_logits: logits (B, T, V) and labels (B, T) must align, got "
                        f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    logits, labels = _float_logits(logits[:, :-1]), labels[:, 1:]
    token_logps = -F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return token_logps, labels != IGNORE_INDEX


# ----------------------------------------------------------------------------------------------- paired


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, Eq. 7) and conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences").

    h = (pc - rc) - (pr - rr);  loss = -(1 - e) logσ(βh) - e logσ(-βh), e = label_smoothing in [0, 0.5].
    Returns (losses (B,), chosen_rewards β(pc - rc), rejected_rewards β(pr - rr)), rewards detached.
    Reference: HALOs DPOTrainer / CDPOTrainer.
    """
    _check_same_shape("dpo_loss", policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps, reference_chosen_logps=reference_chosen_logps,
                      reference_rejected_logps=reference_rejected_logps)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ConfigError(f"losses.dpo_loss: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_ratio = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             tau: float, chosen_lengths=None, rejected_lengths=None):
    """IPO (Azar et al. 2024, "A General Theoretical Paradigm to Understand Learning from Human Preferences").

    lc = (pc - rc) / |yc|, lr = (pr - rr) / |yr| (divided only when lengths are given, as in the IPO
    reference implementations that average log-probs over tokens);  loss = (lc - lr - 1/(2τ))².
    Rewards: τ·lc and τ·lr (detached) -- the quantities the loss compares, on DPO's β-scale with τ for β.
    """
    where = "ipo_loss"
    _check_same_shape(where, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      reference_chosen_logps=reference_chosen_logps,
                      reference_rejected_logps=reference_rejected_logps)
    _check_positive(where, "tau", tau)
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_ratio = policy_rejected_logps - reference_rejected_logps
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise DataError("losses.ipo_loss: pass both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        chosen_ratio = chosen_ratio / _lengths(where, "chosen_lengths", chosen_lengths, chosen_ratio)
        rejected_ratio = rejected_ratio / _lengths(where, "rejected_lengths", rejected_lengths, rejected_ratio)
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * tau)) ** 2
    return losses, (tau * chosen_ratio).detach(), (tau * rejected_ratio).detach()


def nca_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta: float):
    """Pairwise NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards").

    With r_c = β(pc - rc), r_r = β(pr - rr):  loss = -logσ(r_c) - ½ logσ(-r_c) - ½ logσ(-r_r).
    This is `nca_loss` with K = 2 and one-hot rewards. Returns (losses, r_c, r_r), rewards detached.
    """
    _check_same_shape("nca_pair_loss", policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps, reference_chosen_logps=reference_chosen_logps,
                      reference_rejected_logps=reference_rejected_logps)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    losses = (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
              - 0.5 * F.logsigmoid(-rejected_rewards))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def slic_loss(policy_chosen_logps, policy_rejected_logps, delta: float, lambda_coef: float):
    """SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback").

    loss = max(0, δ - pc + pr) + λ·(-pc): a rank-calibration hinge plus the chosen NLL as regulariser.
    No reference model. Rewards are the policy log-probs pc, pr (detached), as in HALOs SLiCTrainer.
    """
    _check_same_shape("slic_loss", policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps)
    hinge = torch.clamp(delta - policy_chosen_logps + policy_rejected_logps, min=0.0)
    losses = hinge + lambda_coef * (-policy_chosen_logps)
    return losses, policy_chosen_logps.detach(), policy_rejected_logps.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
               beta: float, gamma_beta_ratio: float):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward").

    loss = -logσ(β/|yw|·log π(yw) - β/|yl|·log π(yl) - γ) with the target margin γ = gamma_beta_ratio·β
    (the parametrisation of the SimPO repository's config). Rewards: β·log π(y)/|y| (detached).
    """
    where = "simpo_loss"
    _check_same_shape(where, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    chosen_rewards = beta * policy_chosen_logps / _lengths(where, "chosen_lengths", chosen_lengths,
                                                            policy_chosen_logps)
    rejected_rewards = beta * policy_rejected_logps / _lengths(where, "rejected_lengths", rejected_lengths,
                                                                policy_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma_beta_ratio * beta)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, alpha: float,
              chosen_nll: Optional[torch.Tensor] = None):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model").

    On length-averaged log-probs a = log π(y)/|y|:  log odds(y) = a - log(1 - exp(a));
    L_OR = -logσ(log odds(yw) - log odds(yl));  loss = L_SFT + α·L_OR.
    The SFT term IS INCLUDED: by default L_SFT = -a(yw), the chosen response's per-token NLL; pass
    `chosen_nll` (scalar or (B,)) to use another value, e.g. a batch token-mean NLL, or 0.0 to drop it.
    Rewards: the log odds of yw and yl (detached), the quantities L_OR compares.
    """
    where = "orpo_loss"
    _check_same_shape(where, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    chosen_avg = policy_chosen_logps / _lengths(where, "chosen_lengths", chosen_lengths, policy_chosen_logps)
    rejected_avg = policy_rejected_logps / _lengths(where, "rejected_lengths", rejected_lengths,
                                                    policy_rejected_logps)
    chosen_odds = chosen_avg - _log1mexp(chosen_avg)
    rejected_odds = rejected_avg - _log1mexp(rejected_avg)
    odds_ratio_losses = -F.logsigmoid(chosen_odds - rejected_odds)
    sft = -chosen_avg if chosen_nll is None else torch.as_tensor(chosen_nll, dtype=chosen_avg.dtype,
                                                                 device=chosen_avg.device)
    return sft + alpha * odds_ratio_losses, chosen_odds.detach(), rejected_odds.detach()


# ----------------------------------------------------------------------------------------------- unpaired (KTO)


def kto_kl_sum_count(kl_policy_logps, kl_reference_logps) -> tuple[torch.Tensor, torch.Tensor]:
    """The un-clamped pieces of KTO's reference point: (Σ (policy - reference), count), both detached.

    For several ranks: all-reduce (sum) both tensors, then call `kto_kl_from_sum_count`; this gives the
    world mean before the clamp, as HALOs does by gathering the KL rewards of every rank.
    """
    _check_same_shape("kto_kl_sum_count", kl_policy_logps=kl_policy_logps, kl_reference_logps=kl_reference_logps)
    diff = (kl_policy_logps - kl_reference_logps).detach()
    return diff.sum(), torch.tensor(float(diff.numel()), dtype=diff.dtype, device=diff.device)


def kto_kl_from_sum_count(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, total / count), detached (Ethayarajh et al. 2024, KTO's reference point)."""
    if float(count) <= 0:
        raise DataError("losses.kto_kl_from_sum_count: no mismatched KL pairs in the batch; the KTO data loader "
                        "must give every item a KL partner")
    return torch.clamp(total.detach() / count, min=0.0)


def kto_kl_estimate(kl_policy_logps, kl_reference_logps) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(policy - reference)) over mismatched (x, y') pairs, detached.

    (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"; HALOs KTOTrainer.)
    Single-process shortcut for `kto_kl_from_sum_count(*kto_kl_sum_count(...))`.
    """
    return kto_kl_from_sum_count(*kto_kl_sum_count(kl_policy_logps, kl_reference_logps))


def kto_loss(policy_logps, reference_logps, desirable, kl, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"; HALOs KTOTrainer).

    lr = policy - reference;  desirable: w_D·(1 - σ(β(lr - z0)));  undesirable: w_U·(1 - σ(β(z0 - lr))),
    with z0 = `kl` (from `kto_kl_estimate`, treated as a constant). `desirable` is a bool tensor (B,);
    losses stay in input order. Returns (losses (B,), rewards β·lr detached). 1 - σ(x) is computed as σ(-x).
    """
    _check_same_shape("kto_loss", policy_logps=policy_logps, reference_logps=reference_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise DataError(f"losses.kto_loss: desirable must be a bool tensor, got {desirable.dtype}")
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    log_ratio = policy_logps - reference_logps
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (log_ratio - kl))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (kl - log_ratio))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, (beta * log_ratio).detach()


# ----------------------------------------------------------------------------------------------- K-wise (NCA)


def _kwise_margins(where: str, policy_logps, reference_logps, rewards, beta: float, alpha: float):
    """Check (B, K) inputs; return m = β(policy - reference) and w = softmax(rewards / α) over K."""
    _check_same_shape(where, policy_logps=policy_logps, reference_logps=reference_logps, rewards=rewards)
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise DataError(f"losses.{where}: inputs must be (B, K) with K >= 2 responses per prompt, got "
                        f"{tuple(policy_logps.shape)}")
    _check_positive(where, "alpha", alpha)
    margins = beta * (policy_logps - reference_logps)
    rewards = torch.as_tensor(rewards, dtype=margins.dtype, device=margins.device)
    weights = torch.softmax(rewards / alpha, dim=-1).detach()
    return margins, weights


def nca_loss(policy_logps, reference_logps, rewards, beta: float, alpha: float):
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", NeurIPS).

    Inputs (B, K). m = β(policy - reference), w = softmax(rewards/α) over K;
    loss = -Σ_k w_k logσ(m_k) - (1/K) Σ_k logσ(-m_k). Returns (losses (B,), model_rewards m detached (B, K)).
    """
    margins, weights = _kwise_margins("nca_loss", policy_logps, reference_logps, rewards, beta, alpha)
    losses = -(weights * F.logsigmoid(margins)).sum(-1) - F.logsigmoid(-margins).mean(-1)
    return losses, margins.detach()


def infonca_loss(policy_logps, reference_logps, rewards, beta: float, alpha: float):
    """InfoNCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", NeurIPS).

    Inputs (B, K). m = β(policy - reference), w = softmax(rewards/α) over K;
    loss = -Σ_k w_k log softmax(m)_k (cross-entropy to the reward-softmax target; K = 2 one-hot is DPO).
    Returns (losses (B,), model_rewards m detached (B, K)).
    """
    margins, weights = _kwise_margins("infonca_loss", policy_logps, reference_logps, rewards, beta, alpha)
    losses = -(weights * torch.log_softmax(margins, dim=-1)).sum(-1)
    return losses, margins.detach()


# ----------------------------------------------------------------------------------------------- token-level


def sft_loss_from_token_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar SFT loss: token-mean NLL over every completion token of the batch, -Σ mask·logp / Σ mask.

    `token_logps` (B, T) are gathered log p(label); `mask` (B, T) bool marks completion tokens.
    """
    _check_same_shape("sft_loss_from_token_logps", token_logps=token_logps, mask=mask)
    mask = mask.bool()
    if not bool(mask.any()):
        raise DataError("losses (SFT/CUT NLL): the batch has no completion tokens (every label is -100); check prompt "
                        "masking and max_length truncation in the data loader")
    return -_masked_mean(token_logps, mask)


def sft_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Scalar SFT loss (token-mean NLL, Hugging Face shift, labels -100 ignored); see `sft_loss_from_token_logps`."""
    return sft_loss_from_token_logps(*token_logps_from_logits(logits, labels))


def _row_counts_match(mask_judgment: torch.Tensor, mask_plain: torch.Tensor, rows: torch.Tensor) -> None:
    """CUT aligns the k-th label token of a judgment row with the k-th of its plain row: counts must agree."""
    counts_j, counts_p = mask_judgment[rows].sum(-1), mask_plain[rows].sum(-1)
    if not torch.equal(counts_j, counts_p):
        raise DataError(f"losses.cut_loss: negative rows {rows.nonzero().flatten().tolist()} have label-token "
                        f"counts {counts_j.tolist()} (with judgment) vs {counts_p.tolist()} (plain); the two "
                        "sequences of a pair must hold the same response tokens")


def cut_loss_from_token_logps(token_logps_judgment, mask_judgment, token_logps_plain, mask_plain,
                              weight_unlike, threshold: float):
    """CUT (Xu et al. 2024, "Reasons to Reject? Aligning Language Models with Judgments"; wwxu21/CUT,
    modeling_llama_unlikelihood.py) on gathered per-token log-probs with bool masks over label positions:
    judgment tensors (B, Tj), plain tensors (B, Tp); Tj and Tp may differ (the judgment sits in the prompt).

    nll = token-mean NLL of the judgment sequences over the whole batch. Rows with weight_unlike != -1 are
    negatives; on their response tokens (k-th judgment token aligned with k-th plain token)
    ratio_t = p_judgment(y_t) / p_plain(y_t) (no gradient); flagged when ratio_t > threshold;
    term_t = -w·log(1 - p_plain(y_t)) if flagged else -log p_plain(y_t), w = weight of the first negative row;
    ul = mean of term_t over all those tokens. Returns (loss, nll, ul): loss = (nll + ul)/2 when a negative
    row exists, else (nll, nll, None). log(1 - p) is `_log1mexp` (CUT adds 1e-5 where 1 - p == 0 instead).
    """
    where = "cut_loss"
    _check_same_shape(where, token_logps_judgment=token_logps_judgment, mask_judgment=mask_judgment)
    _check_same_shape(where, token_logps_plain=token_logps_plain, mask_plain=mask_plain)
    if token_logps_plain.shape[0] != token_logps_judgment.shape[0]:
        raise DataError(f"losses.{where}: judgment and plain sequences need the same number of rows, got "
                        f"{token_logps_judgment.shape[0]} and {token_logps_plain.shape[0]}")
    mask_judgment, mask_plain = mask_judgment.bool(), mask_plain.bool()
    nll = sft_loss_from_token_logps(token_logps_judgment, mask_judgment)
    weight_unlike = torch.as_tensor(weight_unlike, device=token_logps_judgment.device).reshape(-1)
    if weight_unlike.numel() != token_logps_judgment.shape[0]:
        raise DataError(f"losses.{where}: weight_unlike needs one value per row ({token_logps_judgment.shape[0]}), "
                        f"got {weight_unlike.numel()}")
    negative = weight_unlike != -1
    if not bool(negative.any()):
        return nll, nll, None
    _row_counts_match(mask_judgment, mask_plain, negative)
    logp_judgment = token_logps_judgment[negative][mask_judgment[negative]].detach()
    logp_plain = token_logps_plain[negative][mask_plain[negative]]
    flagged = torch.exp(logp_judgment - logp_plain.detach()) > threshold
    weight = weight_unlike[negative][0].to(logp_plain.dtype)
    terms = torch.where(flagged, -weight * _log1mexp(logp_plain), -logp_plain)
    ul = terms.mean()
    return (nll + ul) / 2, nll, ul


def cut_loss(logits_judgment, labels_judgment, logits_plain, labels_plain, weight_unlike, threshold: float):
    """CUT on full logits (HF shift, labels -100 ignored); see `cut_loss_from_token_logps` for the formula."""
    token_logps_judgment, mask_judgment = token_logps_from_logits(logits_judgment, labels_judgment)
    token_logps_plain, mask_plain = token_logps_from_logits(logits_plain, labels_plain)
    return cut_loss_from_token_logps(token_logps_judgment, mask_judgment, token_logps_plain, mask_plain,
                                     weight_unlike, threshold)


# ----------------------------------------------------------------------------------------------- offline PPO


def _last_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) rewards: scores[b] on row b's last masked position, 0 elsewhere (HALOs PPOTrainer)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = scores
    return rewards


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", Eq. 16) over masked tokens.

    Per row, walking the masked positions backwards (unmasked ones are skipped, V after the last is 0):
    δ_t = r_t + γV_{t+1} - V_t;  A_t = δ_t + γλA_{t+1};  returns G_t = r_t + γG_{t+1}.
    Returns (advantages, returns), both (B, T), 0 off the mask, no gradient.
    """
    rewards, values = rewards.detach(), values.detach()
    zero = torch.zeros_like(rewards[:, 0])
    next_value, advantage, ret = zero, zero, zero
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        on = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(on, delta + gamma * lam * advantage, advantage)
        ret = torch.where(on, rewards[:, t] + gamma * ret, ret)
        next_value = torch.where(on, values[:, t], next_value)
        advantages[:, t] = torch.where(on, advantage, zero)
        returns[:, t] = torch.where(on, ret, zero)
    return advantages, returns


def _whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - masked mean) / sqrt(masked population variance + eps), 0 off the mask (HALOs' masked_var)."""
    mean = _masked_mean(values, mask)
    var = _masked_mean((values - mean) ** 2, mask)
    return torch.where(mask, (values - mean) * torch.rsqrt(var + eps), torch.zeros_like(values))


def ppo_loss(policy_token_logps, reference_token_logps, values, masks, scores, gamma: float, lam: float,
             cliprange: float, critic_coef: float, kl_coef: float):
    """One-step offline PPO with the reference as the old policy (HALOs PPOTrainer; Schulman et al. 2017, Eq. 7).

    All token tensors (B, T) with a (B, T) mask; scores (B,) placed on each row's last masked token.
    A = whiten(GAE(γ, λ)) over the mask (no gradient); G_t = r_t + γG_{t+1};
    critic = ½·mean_mask (v - G)²;  ratio = exp(p - q), clipped to [1 - c, 1 + c];
    policy = mean_mask max(-A·ratio, -A·clip(ratio));  kl = mean_mask (p - q);
    loss = policy + critic_coef·critic + kl_coef·kl.
    Returns (loss with gradient, policy_loss, critic_loss, kl_penalty), the three parts detached for logging.
    Differences from HALOs: clip range [1-c, 1+c] (HALOs clamps to [c, 1/c]), kl sign p - q (HALOs q - p),
    and G_t includes r_t (HALOs' critic target is the reward-to-go after t).
    """
    where = "ppo_loss"
    _check_same_shape(where, policy_token_logps=policy_token_logps, reference_token_logps=reference_token_logps,
                      values=values, masks=masks)
    mask = masks.bool()
    if policy_token_logps.dim() != 2 or tuple(scores.shape) != (mask.shape[0],):
        raise DataError(f"losses.{where}: token tensors must be (B, T) and scores (B,), got "
                        f"{tuple(policy_token_logps.shape)} and {tuple(scores.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise DataError(f"losses.{where}: rows {(~mask.any(dim=1)).nonzero().flatten().tolist()} have no response "
                        "token in the mask; drop empty responses in the data loader")
    _check_positive(where, "cliprange", cliprange)
    rewards = _last_token_rewards(scores.to(values.dtype), mask)
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    advantages = _whiten(advantages, mask)
    critic_loss = 0.5 * _masked_mean((values - returns) ** 2, mask)
    log_ratio = torch.where(mask, policy_token_logps - reference_token_logps.detach(),
                            torch.zeros_like(policy_token_logps))
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = _masked_mean(torch.max(-advantages * ratio, -advantages * clipped), mask)
    kl_penalty = _masked_mean(log_ratio, mask)
    loss = policy_loss + critic_coef * critic_loss + kl_coef * kl_penalty
    return loss, policy_loss.detach(), critic_loss.detach(), kl_penalty.detach()


# ----------------------------------------------------------------------------------------------- reward model


def bradley_terry_loss(chosen_scores, rejected_scores):
    """Bradley-Terry reward model (Bradley & Terry 1952; the RLHF reward model of Ouyang et al. 2022, Eq. 1;
    HALOs BradleyTerryTrainer): P(y_c ≻ y_r) = σ(s_c - s_r), loss = -logσ(s_c - s_r) on scalar scores (B,).
    Returns (losses (B,), chosen scores, rejected scores), scores detached."""
    _check_same_shape("bradley_terry_loss", chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    losses = -F.logsigmoid(chosen_scores - rejected_scores)
    return losses, chosen_scores.detach(), rejected_scores.detach()


# ----------------------------------------------------------------------------------------------- GRPO


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2; HALOs GRPOTrainer):
    A_k = (r_k - mean(r)) / (std(r) + eps) over each row's K responses, std the population one (HALOs'
    np.std), eps = 0.01 as HALOs. Equal rewards give A = 0. rewards (B, K) -> (B, K), no gradient."""
    rewards = rewards.detach()
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise DataError(f"losses.grpo_advantages: rewards must be (B, K) with K >= 2 responses per prompt, got "
                        f"{tuple(rewards.shape)}; GRPO needs several scored responses per prompt")
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(policy_token_logps, reference_token_logps, masks, advantages, beta: float, epsilon: float):
    """GRPO (Shao et al. 2024, "DeepSeekMath", Eq. 3) as HALOs' main branch computes it, with the reference as
    the old policy: token tensors (N, T), a bool mask, one advantage per sequence (N,);
    r_t = exp(p_t - q_t);  surrogate_t = min(A r_t, A clip(r_t, 1 - ε, 1 + ε));
    kl_t = exp(q_t - p_t) - (q_t - p_t) - 1 (the unbiased, non-negative estimator of KL(π ‖ π_ref), DeepSeekMath
    Eq. 4);  loss = mean over every masked token of the batch of (-surrogate_t + β kl_t) (HALOs' token mean;
    DeepSeekMath averages per sequence first).
    Returns (loss with gradient, kl mean, clip fraction: tokens whose clipped term is the active one), the last
    two detached."""
    where = "grpo_loss"
    _check_same_shape(where, policy_token_logps=policy_token_logps, reference_token_logps=reference_token_logps,
                      masks=masks)
    mask = masks.bool()
    if policy_token_logps.dim() != 2 or tuple(advantages.shape) != (mask.shape[0],):
        raise DataError(f"losses.{where}: token tensors must be (N, T) and advantages (N,), got "
                        f"{tuple(policy_token_logps.shape)} and {tuple(advantages.shape)}")
    if not bool(mask.any()):
        raise DataError(f"losses.{where}: no response token in the mask; check max_length truncation")
    _check_positive(where, "epsilon", epsilon)
    log_ratio = torch.where(mask, policy_token_logps - reference_token_logps.detach(),
                            torch.zeros_like(policy_token_logps))
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype).unsqueeze(-1)
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    surrogate = torch.min(adv * ratio, adv * clipped)
    kl = torch.exp(-log_ratio) + log_ratio - 1.0
    loss = _masked_mean(-surrogate + beta * kl, mask)
    clip_active = ((ratio > 1.0 + epsilon) & (adv > 0)) | ((ratio < 1.0 - epsilon) & (adv < 0))
    return loss, _masked_mean(kl, mask).detach(), _masked_mean(clip_active.to(ratio.dtype), mask).detach()
