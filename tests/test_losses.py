"""Closed-form checks of losses.py: every expected value is recomputed here from the written formula in plain
Python floats (math module), never copied from the code's output; plus identities, gradients and edge cases."""

import math

import pytest
import torch

import losses
from feedbackalign.errors import ConfigError, DataError

F64 = torch.float64


def t(values, dtype=F64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def logsig(x):
    """log σ(x) in plain floats."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def log_softmax_row(row):
    top = max(row)
    norm = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - norm for v in row]


def flat(values):
    values = values.tolist() if isinstance(values, torch.Tensor) else values
    if isinstance(values, (list, tuple)):
        return [x for v in values for x in flat(v)]
    return [values]


def close(actual, expected, rel=1e-9, abs_=1e-12):
    assert flat(actual) == pytest.approx(flat(expected), rel=rel, abs=abs_)


# Four-way paired inputs used by several tests: (pc, pr, rc, rr) per example.
PC, PR, RC, RR = [-4.0, -10.0, -2.5], [-6.0, -9.0, -2.0], [-5.0, -9.5, -3.0], [-5.5, -9.2, -1.0]


def paired(dtype=F64, grad=False):
    return t(PC, dtype, grad), t(PR, dtype, grad), t(RC, dtype), t(RR, dtype)


# ----------------------------------------------------------------------------------------------- DPO / cDPO


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_dpo_matches_formula(eps):
    beta = 0.3
    out, chosen, rejected = losses.dpo_loss(*paired(), beta=beta, label_smoothing=eps)
    h = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    close(out, [-(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x) for x in h])
    close(chosen, [beta * (pc - rc) for pc, rc in zip(PC, RC)])
    close(rejected, [beta * (pr - rr) for pr, rr in zip(PR, RR)])


def test_cdpo_with_zero_smoothing_is_dpo():
    plain = losses.dpo_loss(*paired(), beta=0.7)[0]
    smoothed = losses.dpo_loss(*paired(), beta=0.7, label_smoothing=0.0)[0]
    assert torch.equal(plain, smoothed)


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_dpo_policy_equal_reference_is_ln2(eps):
    logps = t([-3.0, -40.0, -0.5])
    out = losses.dpo_loss(logps, logps - 1, logps, logps - 1, beta=2.0, label_smoothing=eps)[0]
    close(out, [math.log(2)] * 3)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("beta_h", [60.0, -60.0, 200.0, -200.0])
def test_dpo_extreme_margins_are_finite_and_right(dtype, beta_h):
    zero = torch.zeros(1, dtype=dtype)
    pc = torch.full((1,), beta_h, dtype=dtype, requires_grad=True)  # beta = 1, h = beta_h
    out = losses.dpo_loss(pc, zero, zero, zero, beta=1.0)[0]
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pc.grad).all()
    expected = -logsig(beta_h)  # 60 -> 8.8e-27, -60 -> 60, -200 -> 200 (log(sigmoid) would give inf in float32)
    assert out.item() == pytest.approx(expected, rel=1e-6, abs=1e-30)
    assert pc.grad.item() == pytest.approx(-sig(-beta_h), rel=1e-6, abs=1e-30)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_gradient_matches_closed_form(eps):
    beta = 0.5
    pc, pr, rc, rr = paired(grad=True)
    out = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0]
    out.mean().backward()
    b = len(PC)
    h = [(a - c) - (p - r) for a, p, c, r in zip(PC, PR, RC, RR)]
    # d/dpc [-(1-e) logσ(βh) - e logσ(-βh)] = -β(1-e)σ(-βh) + βeσ(βh); d/dpr is its negative
    grad_pc = [(-beta * (1 - eps) * sig(-beta * x) + beta * eps * sig(beta * x)) / b for x in h]
    close(pc.grad, grad_pc)
    close(pr.grad, [-g for g in grad_pc])


def test_dpo_rejects_bad_inputs():
    pc, pr, rc, rr = paired()
    with pytest.raises(DataError, match="dpo_loss.*shape"):
        losses.dpo_loss(pc, pr[:2], rc, rr, beta=0.1)
    with pytest.raises(ConfigError, match="label_smoothing"):
        losses.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.7)


# ----------------------------------------------------------------------------------------------- IPO


def test_ipo_matches_formula_without_lengths():
    tau = 0.25
    out, chosen, rejected = losses.ipo_loss(*paired(), tau=tau)
    lc = [pc - rc for pc, rc in zip(PC, RC)]
    lr = [pr - rr for pr, rr in zip(PR, RR)]
    close(out, [(c - r - 1 / (2 * tau)) ** 2 for c, r in zip(lc, lr)])
    close(chosen, [tau * c for c in lc])
    close(rejected, [tau * r for r in lr])


def test_ipo_ragged_lengths_normalise_each_response():
    tau, nc, nr = 0.1, [3, 7, 1], [5, 2, 4]
    pc, pr, rc, rr = paired(grad=True)
    out, chosen, _ = losses.ipo_loss(pc, pr, rc, rr, tau=tau, chosen_lengths=torch.tensor(nc),
                                     rejected_lengths=torch.tensor(nr))
    lc = [(a - c) / n for a, c, n in zip(PC, RC, nc)]
    lr = [(p - r) / n for p, r, n in zip(PR, RR, nr)]
    close(out, [(c - r - 1 / (2 * tau)) ** 2 for c, r in zip(lc, lr)])
    close(chosen, [tau * c for c in lc])
    out.sum().backward()
    close(pc.grad, [2 * (c - r - 1 / (2 * tau)) / n for c, r, n in zip(lc, lr, nc)])


def test_ipo_zero_at_target_margin():
    tau = 0.5  # target lc - lr = 1 / (2 tau) = 1
    zero = t([0.0])
    assert losses.ipo_loss(t([-1.0]), t([-2.0]), zero, zero, tau=tau)[0].item() == 0.0


def test_ipo_rejects_bad_inputs():
    args = paired()
    with pytest.raises(ConfigError, match="tau"):
        losses.ipo_loss(*args, tau=0.0)
    with pytest.raises(DataError, match="both"):
        losses.ipo_loss(*args, tau=0.1, chosen_lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(DataError, match="at least one label token"):
        losses.ipo_loss(*args, tau=0.1, chosen_lengths=torch.tensor([1, 0, 3]),
                        rejected_lengths=torch.tensor([1, 1, 1]))


# ----------------------------------------------------------------------------------------------- NCA pair, SLiC


def test_nca_pair_matches_formula():
    beta = 0.4
    out, chosen, rejected = losses.nca_pair_loss(*paired(), beta=beta)
    expected = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        c, r = beta * (pc - rc), beta * (pr - rr)
        expected.append(-logsig(c) - 0.5 * logsig(-c) - 0.5 * logsig(-r))
    close(out, expected)
    close(chosen, [beta * (pc - rc) for pc, rc in zip(PC, RC)])
    close(rejected, [beta * (pr - rr) for pr, rr in zip(PR, RR)])


def test_nca_pair_policy_equal_reference():
    # -logσ(0) - ½logσ(0) - ½logσ(0) = ln2 + ½ln2 + ½ln2 = 2 ln 2
    logps = t([-3.0, -7.0])
    out = losses.nca_pair_loss(logps, logps - 2, logps, logps - 2, beta=1.0)[0]
    close(out, [2 * math.log(2)] * 2)


def test_slic_hinge_and_regulariser():
    delta, lam = 1.0, 0.1
    pc, pr = t([-2.0, -5.0], grad=True), t([-2.5, -1.0], grad=True)
    out, chosen, rejected = losses.slic_loss(pc, pr, delta=delta, lambda_coef=lam)
    # row 0: δ - pc + pr = 1 + 2 - 2.5 = 0.5 > 0; row 1: 1 + 5 - 1 = 5
    close(out, [0.5 + lam * 2.0, 5.0 + lam * 5.0])
    out.sum().backward()
    close(pc.grad, [-1 - lam, -1 - lam])
    close(pr.grad, [1.0, 1.0])
    close(chosen, [-2.0, -5.0])
    close(rejected, [-2.5, -1.0])


def test_slic_hinge_inactive_leaves_only_regulariser():
    pc, pr = t([-1.0], grad=True), t([-9.0], grad=True)
    out = losses.slic_loss(pc, pr, delta=2.0, lambda_coef=0.5)[0]  # 2 + 1 - 9 < 0
    close(out, [0.5])
    out.sum().backward()
    close(pc.grad, [-0.5])
    close(pr.grad, [0.0])


# ----------------------------------------------------------------------------------------------- SimPO, ORPO


def test_simpo_ragged_lengths():
    beta, ratio = 2.0, 0.5
    pc, pr, nc, nr = [-6.0, -20.0], [-4.0, -9.0], [3, 10], [1, 3]
    out, chosen, rejected = losses.simpo_loss(t(pc), t(pr), torch.tensor(nc), torch.tensor(nr), beta=beta,
                                              gamma_beta_ratio=ratio)
    gamma = ratio * beta
    expected = [-logsig(beta * a / m - beta * b / n - gamma) for a, b, m, n in zip(pc, pr, nc, nr)]
    close(out, expected)
    close(chosen, [beta * a / m for a, m in zip(pc, nc)])
    close(rejected, [beta * b / n for b, n in zip(pr, nr)])


def _log_odds(avg):
    return avg - math.log(-math.expm1(avg))


def test_orpo_includes_chosen_nll_by_default():
    alpha = 0.25
    pc, pr, nc, nr = [-3.0, -8.0], [-6.0, -1.5], [4, 2], [3, 5]
    out, chosen, rejected = losses.orpo_loss(t(pc), t(pr), torch.tensor(nc), torch.tensor(nr), alpha=alpha)
    expected = []
    for a, b, m, n in zip(pc, pr, nc, nr):
        expected.append(-a / m + alpha * -logsig(_log_odds(a / m) - _log_odds(b / n)))
    close(out, expected)
    close(chosen, [_log_odds(a / m) for a, m in zip(pc, nc)])
    close(rejected, [_log_odds(b / n) for b, n in zip(pr, nr)])


def test_orpo_chosen_nll_override():
    pc, pr, nc, nr = t([-3.0]), t([-6.0]), torch.tensor([4]), torch.tensor([3])
    pure = losses.orpo_loss(pc, pr, nc, nr, alpha=1.0, chosen_nll=0.0)[0]
    close(pure, [-logsig(_log_odds(-0.75) - _log_odds(-2.0))])
    shifted = losses.orpo_loss(pc, pr, nc, nr, alpha=1.0, chosen_nll=t(0.5))[0]
    close(shifted, [0.5 + pure.item()])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_orpo_stable_when_probability_near_one_or_tiny(dtype):
    # avg log-prob -1e-9 (p ≈ 1, log(1-p) ≈ log 1e-9) and -60 (p ≈ 1e-26, log(1-p) ≈ -1e-26)
    pc, pr = torch.tensor([-1e-9], dtype=dtype, requires_grad=True), torch.tensor([-60.0], dtype=dtype)
    out, chosen, rejected = losses.orpo_loss(pc, pr, torch.tensor([1]), torch.tensor([1]), alpha=1.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pc.grad).all()
    close(rejected, [-60.0], rel=1e-6)
    if dtype == F64:
        close(chosen, [_log_odds(-1e-9)], rel=1e-9)


@pytest.mark.parametrize("x", [-1e-12, -1e-5, -0.3, -math.log(2), -0.7, -5.0, -40.0, -700.0])
def test_log1mexp_matches_math(x):
    expected = math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))
    close(losses._log1mexp(t([x])), [expected], rel=1e-12)


# ----------------------------------------------------------------------------------------------- KTO


def test_kto_kl_estimate_mean_and_clamp():
    z0 = losses.kto_kl_estimate(t([-3.0, -1.0, -4.0]), t([-4.0, -3.0, -3.5]))
    close(z0, (1.0 + 2.0 - 0.5) / 3)
    assert losses.kto_kl_estimate(t([-5.0, -6.0]), t([-4.0, -4.0])).item() == 0.0  # mean -1.5 clamps to 0


def test_kto_kl_world_mean_before_clamp():
    # rank 0 mean is -2 (alone it would clamp to 0), rank 1 mean +1; world mean (-4 + 3)/(2 + 3) = -0.2 -> 0;
    # with rank 1 larger the world mean is positive and differs from the mean of per-rank clamped values.
    p0, r0 = t([-3.0, -3.0], grad=True), t([-1.0, -1.0])
    p1, r1 = t([-1.0, -1.0, -1.0]), t([-3.0, -3.0, -3.0])
    s0, n0 = losses.kto_kl_sum_count(p0, r0)
    s1, n1 = losses.kto_kl_sum_count(p1, r1)
    assert not s0.requires_grad
    close([s0.item(), n0.item(), s1.item(), n1.item()], [-4.0, 2.0, 6.0, 3.0])
    z0 = losses.kto_kl_from_sum_count(s0 + s1, n0 + n1)
    close(z0, (-4.0 + 6.0) / 5)
    close(losses.kto_kl_estimate(torch.cat([p0, p1]), torch.cat([r0, r1])), z0.item())
    with pytest.raises(DataError, match="KL partner"):
        losses.kto_kl_estimate(t([]), t([]))


def _kto_expected(lr, desirable, z0, beta, wd, wu):
    if desirable:
        return wd * (1 - sig(beta * (lr - z0)))
    return wu * (1 - sig(beta * (z0 - lr)))


@pytest.mark.parametrize("flags", [[True, False, True, False], [True] * 4, [False] * 4])
def test_kto_matches_formula_in_input_order(flags):
    beta, z0, wd, wu = 0.5, 0.3, 1.0, 1.33
    policy, reference = [-2.0, -6.0, -9.0, -1.0], [-3.0, -5.0, -8.5, -1.5]
    out, rewards = losses.kto_loss(t(policy), t(reference), torch.tensor(flags), t(z0), beta=beta,
                                   desirable_weight=wd, undesirable_weight=wu)
    lrs = [p - r for p, r in zip(policy, reference)]
    close(out, [_kto_expected(x, d, z0, beta, wd, wu) for x, d in zip(lrs, flags)])
    close(rewards, [beta * x for x in lrs])
    assert not rewards.requires_grad


def test_kto_treats_kl_as_constant_and_has_closed_form_gradient():
    beta, z0 = 2.0, t(0.1, grad=True)
    policy = t([-1.0, -1.0], grad=True)
    out = losses.kto_loss(policy, t([-1.2, -1.2]), torch.tensor([True, False]), z0, beta=beta)[0]
    out.sum().backward()
    assert z0.grad is None
    x = -1.0 + 1.2
    # d/dlr (1 - σ(β(lr - z))) = -βσ'(.) ; d/dlr (1 - σ(β(z - lr))) = +βσ'(.)
    close(policy.grad, [-beta * sig(beta * (x - 0.1)) * (1 - sig(beta * (x - 0.1))),
                        beta * sig(beta * (0.1 - x)) * (1 - sig(beta * (0.1 - x)))])


def test_kto_rejects_non_bool_flags():
    with pytest.raises(DataError, match="bool"):
        losses.kto_loss(t([-1.0]), t([-1.0]), torch.tensor([1]), 0.0, beta=0.1)


# ----------------------------------------------------------------------------------------------- NCA / InfoNCA


def _kwise_expected(policy, reference, rewards, beta, alpha, info):
    out = []
    for prow, rrow, wrow in zip(policy, reference, rewards):
        m = [beta * (p - r) for p, r in zip(prow, rrow)]
        top = max(w / alpha for w in wrow)
        e = [math.exp(w / alpha - top) for w in wrow]
        w = [v / sum(e) for v in e]
        if info:
            out.append(-sum(wk * lk for wk, lk in zip(w, log_softmax_row(m))))
        else:
            out.append(-sum(wk * logsig(mk) for wk, mk in zip(w, m)) - sum(logsig(-mk) for mk in m) / len(m))
    return out


KPOL = [[-3.0, -5.0, -4.0, -8.0], [-10.0, -9.0, -12.0, -11.0]]
KREF = [[-4.0, -4.5, -4.2, -7.0], [-9.0, -9.5, -11.0, -13.0]]
KREW = [[7.0, 2.0, 5.5, 1.0], [0.2, 0.9, 0.4, 0.1]]


@pytest.mark.parametrize("fn,info", [(losses.nca_loss, False), (losses.infonca_loss, True)])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_kwise_losses_match_formula(fn, info, k):
    beta, alpha = 0.3, 0.8
    pol, ref, rew = [r[:k] for r in KPOL], [r[:k] for r in KREF], [r[:k] for r in KREW]
    out, margins = fn(t(pol), t(ref), t(rew), beta=beta, alpha=alpha)
    close(out, _kwise_expected(pol, ref, rew, beta, alpha, info))
    assert margins.shape == (2, k) and not margins.requires_grad
    close(margins, [[beta * (p - r) for p, r in zip(pr, rr)] for pr, rr in zip(pol, ref)])


@pytest.mark.parametrize("fn,info", [(losses.nca_loss, False), (losses.infonca_loss, True)])
def test_kwise_tied_rewards_weigh_uniformly(fn, info):
    beta, alpha = 1.0, 0.5
    tied = [[3.0] * 4, [-1.0] * 4]
    out = fn(t(KPOL), t(KREF), t(tied), beta=beta, alpha=alpha)[0]
    # uniform weights: any constant reward row gives the same loss as rewards of 0
    close(out, _kwise_expected(KPOL, KREF, [[0.0] * 4] * 2, beta, alpha, info))


@pytest.mark.parametrize("k", [2, 3, 7])
def test_infonca_policy_equal_reference_is_ln_k(k):
    logps = torch.linspace(-9, -2, k, dtype=F64).repeat(3, 1)
    rewards = torch.randn(3, k, dtype=F64, generator=torch.Generator().manual_seed(k))
    close(losses.infonca_loss(logps, logps, rewards, beta=0.2, alpha=0.3)[0], [math.log(k)] * 3)
    close(losses.nca_loss(logps, logps, rewards, beta=0.2, alpha=0.3)[0], [2 * math.log(2)] * 3)


def test_infonca_k2_one_hot_is_dpo():
    beta = 0.6
    pc, pr, rc, rr = paired()
    dpo = losses.dpo_loss(pc, pr, rc, rr, beta=beta)[0]
    rewards = t([[1.0, 0.0]] * 3)
    info = losses.infonca_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), rewards, beta=beta,
                               alpha=1e-4)[0]
    close(info, dpo.tolist(), rel=1e-12)


def test_nca_k2_one_hot_is_nca_pair():
    beta = 0.6
    pc, pr, rc, rr = paired()
    pair = losses.nca_pair_loss(pc, pr, rc, rr, beta=beta)[0]
    rewards = t([[1.0, 0.0]] * 3)
    kwise = losses.nca_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), rewards, beta=beta, alpha=1e-4)[0]
    close(kwise, pair.tolist(), rel=1e-12)


def test_kwise_rejects_bad_shapes_and_alpha():
    one = t([[-1.0], [-2.0]])
    with pytest.raises(DataError, match="K >= 2"):
        losses.nca_loss(one, one, one, beta=0.1, alpha=1.0)
    two = t([[-1.0, -2.0]])
    with pytest.raises(ConfigError, match="alpha"):
        losses.infonca_loss(two, two, two, beta=0.1, alpha=0.0)


# ----------------------------------------------------------------------------------------------- SFT


LOGITS = [  # (B=2, T=4, V=3)
    [[0.1, 0.2, -0.3], [1.0, -1.0, 0.5], [0.0, 2.0, 0.3], [0.7, 0.7, -2.0]],
    [[-0.4, 0.9, 0.0], [0.3, 0.3, 0.3], [2.5, -0.5, 1.0], [0.2, -1.3, 0.6]],
]
LABELS = [[-100, 2, 1, 0], [-100, -100, 0, -100]]


def _expected_sft(logits, labels):
    nll = []
    for row_logits, row_labels in zip(logits, labels):
        for pos in range(1, len(row_labels)):
            if row_labels[pos] != -100:
                nll.append(-log_softmax_row(row_logits[pos - 1])[row_labels[pos]])
    return sum(nll) / len(nll)


def test_sft_loss_token_mean_with_shift_and_ignore():
    logits = t(LOGITS, grad=True)
    loss = losses.sft_loss(logits, torch.tensor(LABELS))
    assert loss.dim() == 0
    close(loss, _expected_sft(LOGITS, LABELS))
    loss.backward()
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_sft_twin_on_gathered_logps():
    token_logps = t([[-1.0, -2.0, 99.0], [-0.5, float("-inf"), 0.0]])  # masked positions may hold garbage
    mask = torch.tensor([[True, True, False], [True, False, False]])
    close(losses.sft_loss_from_token_logps(token_logps, mask), (1.0 + 2.0 + 0.5) / 3)


def test_sft_uniform_logits_give_log_vocab():
    logits = torch.zeros(2, 5, 11, dtype=F64)
    labels = torch.tensor([[-100, 3, 4, 5, 6], [-100, -100, 1, 2, -100]])
    close(losses.sft_loss(logits, labels), math.log(11))


def test_sft_errors_name_the_problem():
    with pytest.raises(DataError, match="no completion tokens"):
        losses.sft_loss(t(LOGITS), torch.full((2, 4), -100))
    with pytest.raises(DataError, match="must align"):
        losses.sft_loss(t(LOGITS), torch.tensor(LABELS)[:, :3])


# ----------------------------------------------------------------------------------------------- CUT


def _probs(logits_row, pos, label):
    return math.exp(log_softmax_row(logits_row[pos - 1])[label])


def _expected_cut(lj, yj, lp, yp, weights, threshold):
    nll = _expected_sft(lj, yj)
    negative = [b for b, w in enumerate(weights) if w != -1]
    if not negative:
        return nll, nll, None, 0
    w = weights[negative[0]]
    terms, flagged_count = [], 0
    for b in negative:
        pos_j = [p for p in range(1, len(yj[b])) if yj[b][p] != -100]
        pos_p = [p for p in range(1, len(yp[b])) if yp[b][p] != -100]
        for a, c in zip(pos_j, pos_p):
            p_j, p_p = _probs(lj[b], a, yj[b][a]), _probs(lp[b], c, yp[b][c])
            if p_j / p_p > threshold:
                flagged_count += 1
                terms.append(-w * math.log(1 - p_p))
            else:
                terms.append(-math.log(p_p))
    ul = sum(terms) / len(terms)
    return (nll + ul) / 2, nll, ul, flagged_count


def _cut_batch(seed=0):
    """Three rows; judgment sequences are longer than plain ones; responses of 2, 3 and 1 tokens, padded."""
    gen = torch.Generator().manual_seed(seed)
    lj = (torch.randn(3, 7, 5, generator=gen, dtype=F64) * 2).tolist()
    lp = (torch.randn(3, 5, 5, generator=gen, dtype=F64) * 2).tolist()
    yj = [[-100, -100, -100, 1, 4, -100, -100],
          [-100, -100, -100, -100, 2, 0, 3],
          [-100, -100, 3, -100, -100, -100, -100]]
    yp = [[-100, 1, 4, -100, -100], [-100, 2, 0, 3, -100], [-100, -100, 3, -100, -100]]
    return lj, yj, lp, yp


def test_cut_positive_only_batch_is_nll():
    lj, yj, lp, yp = _cut_batch()
    loss, nll, ul = losses.cut_loss(t(lj), torch.tensor(yj), t(lp), torch.tensor(yp), t([-1.0, -1.0, -1.0]), 1.1)
    assert ul is None and torch.equal(loss, nll)
    close(nll, _expected_sft(lj, yj))


@pytest.mark.parametrize("threshold", [0.0, 1.2, 1e9])
def test_cut_ragged_matches_formula(threshold):
    lj, yj, lp, yp = _cut_batch()
    weights = [-1.0, 0.8, 0.3]  # row 0 positive; the first negative row's weight (0.8) is used for all
    loss, nll, ul = losses.cut_loss(t(lj), torch.tensor(yj), t(lp), torch.tensor(yp), t(weights), threshold)
    expected_loss, expected_nll, expected_ul, flagged = _expected_cut(lj, yj, lp, yp, weights, threshold)
    close([loss.item(), nll.item(), ul.item()], [expected_loss, expected_nll, expected_ul])
    assert flagged == {0.0: 4, 1e9: 0}.get(threshold, flagged)


def test_cut_mixed_flags_case_exists():
    """Guard that the threshold 1.2 case above really mixes flagged and unflagged tokens for this seed."""
    lj, yj, lp, yp = _cut_batch()
    assert 0 < _expected_cut(lj, yj, lp, yp, [-1.0, 0.8, 0.3], 1.2)[3] < 4


def test_cut_unlikelihood_has_no_gradient_through_the_judgment_side():
    lj, yj, lp, yp = _cut_batch()
    logits_j, logits_p = t(lj, grad=True), t(lp, grad=True)
    _, _, ul = losses.cut_loss(logits_j, torch.tensor(yj), logits_p, torch.tensor(yp), t([1.0, 1.0, 1.0]), 1.0)
    grad_j, grad_p = torch.autograd.grad(ul, [logits_j, logits_p], allow_unused=True)
    assert grad_j is None or grad_j.abs().sum() == 0
    assert grad_p.abs().sum() > 0


def test_cut_stable_when_plain_probability_is_one():
    token_logps = t([[0.0, -1e-30]], grad=True)
    mask = torch.tensor([[True, True]])
    judged = t([[0.0, 0.0]])
    loss, _, ul = losses.cut_loss_from_token_logps(judged, mask, token_logps, mask, t([1.0]), threshold=0.5)
    ul.backward()
    assert torch.isfinite(loss) and torch.isfinite(token_logps.grad).all()
    close(ul, -math.log(torch.finfo(F64).eps), rel=1e-9)  # log(1 - p) is floored at log(machine eps)


def test_cut_mismatched_response_counts_raise():
    mask_j = torch.tensor([[True, True, False]])
    mask_p = torch.tensor([[True, False, False]])
    logps = t([[-1.0, -1.0, -1.0]])
    with pytest.raises(DataError, match="same response tokens"):
        losses.cut_loss_from_token_logps(logps, mask_j, logps, mask_p, t([1.0]), 1.0)


# ----------------------------------------------------------------------------------------------- PPO


def test_gae_hand_worked_three_tokens():
    # one prompt position (mask 0) then 3 response tokens; score 1 on the last; γ = 0.9, λ = 0.8
    # t=3: δ = 1 + 0.9·0 - (-0.1) = 1.1            A = 1.1                      G = 1
    # t=2: δ = 0 + 0.9·(-0.1) - 0.2 = -0.29        A = -0.29 + 0.72·1.1 = 0.502  G = 0.9
    # t=1: δ = 0 + 0.9·0.2 - 0.5 = -0.32           A = -0.32 + 0.72·0.502 = 0.04144   G = 0.81
    mask = torch.tensor([[False, True, True, True]])
    values = t([[7.0, 0.5, 0.2, -0.1]])  # the prompt position's value must not matter
    rewards = losses._last_token_rewards(t([1.0]), mask)
    close(rewards, [[0.0, 0.0, 0.0, 1.0]])
    adv, ret = losses.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.0, 0.04144, 0.502, 1.1]])
    close(ret, [[0.0, 0.81, 0.9, 1.0]])


def test_gae_skips_unmasked_positions_inside_a_row():
    values = t([[0.5, 9.0, 0.2, -0.1, 3.0]])
    holes = torch.tensor([[True, False, True, True, False]])
    adv, ret = losses.gae_advantages(losses._last_token_rewards(t([1.0]), holes), values, holes, 0.9, 0.8)
    close(adv, [[0.04144, 0.0, 0.502, 1.1, 0.0]])
    close(ret, [[0.81, 0.0, 0.9, 1.0, 0.0]])


def test_ppo_score_on_each_rows_last_token():
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    close(losses._last_token_rewards(t([2.0, -3.0]), mask), [[0, 0, 0, 2.0], [0, -3.0, 0, 0]])


def test_ppo_loss_matches_formula():
    gamma, lam, c, critic_coef, kl_coef = 0.9, 0.8, 0.2, 0.1, 0.05
    mask = [[0, 1, 1, 1], [1, 1, 0, 0]]
    values = [[7.0, 0.5, 0.2, -0.1], [0.3, -0.4, 5.0, 5.0]]
    p = [[-9.0, -1.0, -0.5, -2.0], [-0.2, -3.0, -7.0, -7.0]]
    q = [[-1.0, -1.3, -0.4, -2.1], [-0.1, -3.5, -1.0, -1.0]]
    scores = [1.0, -2.0]
    pol = t(p, grad=True)
    vals = t(values, grad=True)
    loss, policy_loss, critic_loss, kl = losses.ppo_loss(pol, t(q), vals, torch.tensor(mask).bool(), t(scores),
                                                         gamma, lam, c, critic_coef, kl_coef)
    # expected: per-row GAE and returns over the masked tokens
    cells, adv, ret = [], {}, {}
    for b, row in enumerate(mask):
        idx = [i for i, m in enumerate(row) if m]
        a = g = next_v = 0.0
        for k, i in enumerate(reversed(idx)):
            r = scores[b] if k == 0 else 0.0
            a = r + gamma * next_v - values[b][i] + gamma * lam * a
            g = r + gamma * g
            next_v = values[b][i]
            adv[b, i], ret[b, i] = a, g
        cells += [(b, i) for i in idx]
    n = len(cells)
    mean = sum(adv[x] for x in cells) / n
    std = math.sqrt(sum((adv[x] - mean) ** 2 for x in cells) / n + 1e-8)
    white = {x: (adv[x] - mean) / std for x in cells}
    ratio = {(b, i): math.exp(p[b][i] - q[b][i]) for b, i in cells}
    clip = {x: min(max(ratio[x], 1 - c), 1 + c) for x in cells}
    exp_policy = sum(max(-white[x] * ratio[x], -white[x] * clip[x]) for x in cells) / n
    exp_critic = 0.5 * sum((values[b][i] - ret[b, i]) ** 2 for b, i in cells) / n
    exp_kl = sum(p[b][i] - q[b][i] for b, i in cells) / n
    close([policy_loss.item(), critic_loss.item(), kl.item()], [exp_policy, exp_critic, exp_kl])
    close(loss, exp_policy + critic_coef * exp_critic + kl_coef * exp_kl)
    assert any(ratio[x] != clip[x] for x in cells) and any(ratio[x] == clip[x] for x in cells)
    assert not (policy_loss.requires_grad or critic_loss.requires_grad or kl.requires_grad)
    loss.backward()
    expected_vgrad = [[critic_coef * (values[b][i] - ret[b, i]) / n if mask[b][i] else 0.0 for i in range(4)]
                      for b in range(2)]
    close(vals.grad, expected_vgrad)


def test_ppo_gradient_at_ratio_one():
    # p == q: ratio 1 is inside the clip range, so d loss / d p_t = (-A_t + kl_coef) / N on masked tokens
    mask = torch.tensor([[True, True, True]])
    logps = t([[-1.0, -2.0, -0.5]], grad=True)
    values = t([[0.0, 0.0, 0.0]])
    kl_coef = 0.3
    loss = losses.ppo_loss(logps, logps.detach().clone(), values, mask, t([1.0]), 1.0, 1.0, 0.2, 0.0, kl_coef)[0]
    loss.backward()
    # γ = λ = 1, V = 0: A = (1, 1, 1), whitened (0, 0, 0) up to eps; the gradient is kl_coef / 3 everywhere
    close(logps.grad, [[kl_coef / 3] * 3], rel=1e-6)


def test_ppo_rejects_empty_rows():
    mask = torch.tensor([[True, False], [False, False]])
    x = t([[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(DataError, match=r"rows \[1\]"):
        losses.ppo_loss(x, x, x, mask, t([1.0, 1.0]), 1.0, 1.0, 0.2, 0.1, 0.1)


# ----------------------------------------------------------------------------------------------- reward model


def test_bradley_terry_matches_formula_and_gradient():
    chosen, rejected = t([2.0, -1.0, 0.5], grad=True), t([1.0, 3.0, 0.5], grad=True)
    out, c, r = losses.bradley_terry_loss(chosen, rejected)
    close(out, [-logsig(2.0 - 1.0), -logsig(-1.0 - 3.0), math.log(2.0)])
    close(c, [2.0, -1.0, 0.5])
    out.sum().backward()   # d/ds_c -log σ(s_c - s_r) = -(1 - σ(s_c - s_r)) = -σ(s_r - s_c)
    close(chosen.grad, [-sig(-1.0), -sig(4.0), -0.5])
    close(rejected.grad, [sig(-1.0), sig(4.0), 0.5])


# ----------------------------------------------------------------------------------------------- GRPO


def test_grpo_advantages_are_group_relative_with_population_std():
    out = losses.grpo_advantages(t([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]]))
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4)   # population std (HALOs' np.std)
    close(out[0], [(r - 3.0) / (std + 0.01) for r in (1.0, 2.0, 3.0, 6.0)])
    close(out[1], [0.0] * 4)                       # equal rewards: no advantage
    with pytest.raises(DataError, match="K >= 2"):
        losses.grpo_advantages(t([[1.0], [2.0]]))


def test_grpo_equal_rewards_give_no_gradient_at_the_reference():
    """Policy = reference (ratio 1, KL 0 with zero gradient) and equal rewards (A = 0): loss 0, gradient 0."""
    logps = t([[-1.0, -2.0, -0.5], [-0.3, -4.0, 0.0]], grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages = losses.grpo_advantages(t([[2.0, 2.0]])).reshape(-1)
    loss, kl, clipped = losses.grpo_loss(logps, logps.detach().clone(), mask, advantages, beta=0.1, epsilon=0.2)
    loss.backward()
    assert loss.item() == 0.0 and kl.item() == 0.0 and clipped.item() == 0.0
    close(logps.grad, [[0.0] * 3] * 2)


def test_grpo_one_step_by_hand():
    """Loss, metrics and gradient from the formula in plain floats, then one SGD step on the token log-probs."""
    beta, eps, lr = 0.05, 0.2, 0.5
    p = [[-1.0, -0.5, -2.0], [-0.2, -3.0, -9.0]]
    q = [[-1.3, -0.4, -2.5], [-0.1, -2.0, -1.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    adv = [1.5, -0.7]
    pol = t(p, grad=True)
    loss, kl, clipped = losses.grpo_loss(pol, t(q), torch.tensor(mask).bool(), t(adv), beta, eps)
    cells = [(b, i) for b in range(2) for i in range(3) if mask[b][i]]
    n = len(cells)
    ratio = {(b, i): math.exp(p[b][i] - q[b][i]) for b, i in cells}
    clip = {x: min(max(ratio[x], 1 - eps), 1 + eps) for x in cells}
    surrogate = {(b, i): min(adv[b] * ratio[b, i], adv[b] * clip[b, i]) for b, i in cells}
    k3 = {(b, i): math.exp(q[b][i] - p[b][i]) - (q[b][i] - p[b][i]) - 1 for b, i in cells}
    close(loss, sum(-surrogate[x] + beta * k3[x] for x in cells) / n)
    close(kl, sum(k3.values()) / n)
    active = [x for x in cells if (ratio[x] > 1 + eps and adv[x[0]] > 0) or (ratio[x] < 1 - eps and adv[x[0]] < 0)]
    close(clipped, len(active) / n)
    assert active and len(active) < n              # both branches of the min are exercised
    loss.backward()
    # d/dp_t: -A r_t where the unclipped term is the min (0 where the clipped one is), + β (1 - exp(q_t - p_t))
    grad = [[0.0] * 3 for _ in range(2)]
    for b, i in cells:
        unclipped = 0.0 if (b, i) in active else -adv[b] * ratio[b, i]
        grad[b][i] = (unclipped + beta * (1 - math.exp(q[b][i] - p[b][i]))) / n
    close(pol.grad, grad)
    with torch.no_grad():
        pol -= lr * pol.grad
    close(pol, [[p[b][i] - lr * grad[b][i] for i in range(3)] for b in range(2)])


def test_grpo_rejects_bad_inputs():
    x = t([[0.0, 0.0]])
    with pytest.raises(DataError, match="advantages"):
        losses.grpo_loss(x, x, torch.tensor([[True, True]]), t([1.0, 2.0]), 0.1, 0.2)
    with pytest.raises(ConfigError, match="epsilon"):
        losses.grpo_loss(x, x, torch.tensor([[True, True]]), t([1.0]), 0.1, 0.0)


# ----------------------------------------------------------------------------------------------- dtype, detach


def _all_calls(dtype):
    pc, pr, rc, rr = paired(dtype, grad=True)
    n = torch.tensor([2, 3, 4])
    kp = torch.tensor(KPOL, dtype=dtype, requires_grad=True)
    kr, kw = torch.tensor(KREF, dtype=dtype), torch.tensor(KREW, dtype=dtype)
    lj, yj, lp, yp = _cut_batch()
    mask = torch.tensor([[False, True, True]])
    tok = torch.tensor([[-1.0, -2.0, -0.5]], dtype=dtype, requires_grad=True)
    return {
        "dpo": lambda: losses.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1),
        "ipo": lambda: losses.ipo_loss(pc, pr, rc, rr, tau=0.1, chosen_lengths=n, rejected_lengths=n),
        "nca_pair": lambda: losses.nca_pair_loss(pc, pr, rc, rr, beta=0.1),
        "slic": lambda: losses.slic_loss(pc, pr, delta=1.0, lambda_coef=0.1),
        "simpo": lambda: losses.simpo_loss(pc, pr, n, n, beta=2.0, gamma_beta_ratio=0.5),
        "orpo": lambda: losses.orpo_loss(pc, pr, n, n, alpha=0.1),
        "kto": lambda: losses.kto_loss(pc, rc, torch.tensor([True, False, True]),
                                       losses.kto_kl_estimate(pr, rr), beta=0.1),
        "nca": lambda: losses.nca_loss(kp, kr, kw, beta=0.1, alpha=1.0),
        "infonca": lambda: losses.infonca_loss(kp, kr, kw, beta=0.1, alpha=1.0),
        "sft": lambda: (losses.sft_loss(torch.tensor(LOGITS, dtype=dtype, requires_grad=True),
                                        torch.tensor(LABELS)),),
        "cut": lambda: losses.cut_loss(torch.tensor(lj, dtype=dtype), torch.tensor(yj),
                                       torch.tensor(lp, dtype=dtype, requires_grad=True), torch.tensor(yp),
                                       torch.tensor([-1.0, 1.0, 1.0]), 1.0),
        "ppo": lambda: losses.ppo_loss(tok, tok.detach() - 0.1, tok.detach() * 0, mask,
                                       torch.tensor([1.0], dtype=dtype), 1.0, 0.95, 0.2, 0.1, 0.1),
        "rm": lambda: losses.bradley_terry_loss(pc, pr),
        "grpo": lambda: losses.grpo_loss(tok, tok.detach() - 0.1, mask, torch.tensor([1.0], dtype=dtype), 0.1, 0.2),
    }


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", ["dpo", "ipo", "nca_pair", "slic", "simpo", "orpo", "kto", "nca", "infonca",
                                  "sft", "cut", "ppo", "rm", "grpo"])
def test_dtype_is_kept_loss_has_grad_and_rewards_are_detached(dtype, name):
    out = _all_calls(dtype)[name]()
    assert out[0].dtype == dtype and out[0].requires_grad
    for extra in out[1:]:
        assert extra.dtype == dtype
        if name not in ("cut",):  # CUT's extras are loss parts (nll, ul) that carry gradient
            assert not extra.requires_grad
