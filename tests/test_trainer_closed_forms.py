"""Every trainer's loss, away from zero margins, against the paper's formula evaluated independently.

At policy == reference every margin is 0 and every loss symmetric, so a swapped chosen/rejected, a sign, a
wrong beta or a reference part mixed up passes unseen. Here each trainer first takes an optimizer step (two for
KTO), so the policy moves away from its reference, then scores a batch it has not trained on, with non-default
hyper-parameters; the expected values come from plain-float formulas over log-probs computed by a separate,
unpacked, one-sequence-at-a-time forward of the real models (no logprobs.py, no losses.py): per-example losses,
the reported rewards, and KTO's reference point z0 over one and over two accumulated microbatches. PPO is
checked for its wiring into losses.ppo_loss (its formula is test_losses.py's); the reward model and GRPO from
their formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_trainer

TRAIN = ["n_examples=24", "++dataset_options.wordsort.n_prompts=24", "lr=1e-2", "model.batch_size=8",
         "n_eval_examples=0", "warmup_steps=0"]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def token_logps(model, sequence) -> list[float]:
    """log p(response token | everything before it), one plain forward of this sequence alone."""
    ids = list(sequence.prompt_ids) + list(sequence.response_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(sequence.prompt_ids)
    return [logp[t - 1, ids[t]].item() for t in range(start, len(ids))]


def total(model, sequence) -> float:
    return sum(token_logps(model, sequence))


def moved(tmp_path, loss: str, *overrides, steps: int = 1):
    """A trainer after `steps` optimizer steps of its own loss, and a batch it has not trained on."""
    trainer = make_trainer(tmp_path / loss, f"loss={loss}", *TRAIN, *overrides)
    batches = iter(trainer.train_loader)
    for _ in range(steps):
        trainer.train_step([next(batches)])
    trainer.policy.eval()
    return trainer, next(batches)


def loss_of(trainer, batch, microbatches=None):
    """The trainer's loss on `batch` exactly as its train step computes it (context over `microbatches`)."""
    with torch.no_grad():
        policy, reference = trainer.forward(batch)
        return trainer.loss(batch, policy, reference, trainer.step_context(microbatches or [batch]))


def approx(values):
    return pytest.approx(values, rel=1e-4, abs=1e-6)


def pairs(trainer, batch, reference=True):
    """[(pc, pr, rc, rr, |yc|, |yr|)] per pair, independently computed."""
    out = []
    for c, r in zip(batch.parts["chosen"], batch.parts["rejected"]):
        pc, pr = total(trainer.policy, c), total(trainer.policy, r)
        rc, rr = (total(trainer.reference, c), total(trainer.reference, r)) if reference else (0.0, 0.0)
        out.append((pc, pr, rc, rr, len(c.response_ids), len(r.response_ids)))
    return out


def check_pairs(trainer, batch, expected_loss, expected_chosen, expected_rejected, reference=True):
    value, metrics = loss_of(trainer, batch)
    rows = pairs(trainer, batch, reference)
    losses = [expected_loss(*row) for row in rows]
    assert metrics["loss"].tolist() == approx(losses)
    assert value.item() == approx(sum(losses) / len(losses))
    assert metrics["rewards/chosen"].tolist() == approx([expected_chosen(*row) for row in rows])
    assert metrics["rewards/rejected"].tolist() == approx([expected_rejected(*row) for row in rows])
    return rows


def assert_away_from_zero(margins):
    """Margins of both signs or at least well away from 0: a formula symmetric at 0 cannot hide here."""
    assert max(abs(m) for m in margins) > 0.1, margins


def test_dpo_and_cdpo(tmp_path):
    for loss, eps in (("dpo", 0.0), ("cdpo", 0.2)):
        beta = 0.3
        trainer, batch = moved(tmp_path, loss, f"loss.beta={beta}", f"loss.label_smoothing={eps}")
        rows = check_pairs(
            trainer, batch,
            lambda pc, pr, rc, rr, *_: -(1 - eps) * logsig(beta * ((pc - rc) - (pr - rr)))
            - eps * logsig(-beta * ((pc - rc) - (pr - rr))),
            lambda pc, pr, rc, rr, *_: beta * (pc - rc), lambda pc, pr, rc, rr, *_: beta * (pr - rr))
        assert_away_from_zero([beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr, *_ in rows])


def test_ipo(tmp_path):
    tau = 0.05
    trainer, batch = moved(tmp_path, "ipo", f"loss.tau={tau}")
    rows = check_pairs(trainer, batch,
                       lambda pc, pr, rc, rr, nc, nr: ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * tau)) ** 2,
                       lambda pc, pr, rc, rr, nc, nr: tau * (pc - rc) / nc,
                       lambda pc, pr, rc, rr, nc, nr: tau * (pr - rr) / nr)
    assert_away_from_zero([(pc - rc) / nc - (pr - rr) / nr for pc, pr, rc, rr, nc, nr in rows])


def test_ncapair(tmp_path):
    beta = 0.3
    trainer, batch = moved(tmp_path, "ncapair", f"loss.beta={beta}")
    rows = check_pairs(trainer, batch,
                       lambda pc, pr, rc, rr, *_: -logsig(beta * (pc - rc)) - 0.5 * logsig(-beta * (pc - rc))
                       - 0.5 * logsig(-beta * (pr - rr)),
                       lambda pc, pr, rc, rr, *_: beta * (pc - rc), lambda pc, pr, rc, rr, *_: beta * (pr - rr))
    assert_away_from_zero([beta * (pc - rc) for pc, pr, rc, *_ in rows])


def test_slic_simpo_orpo_without_reference(tmp_path):
    delta, lam = 0.7, 0.3
    trainer, batch = moved(tmp_path, "slic", f"loss.delta={delta}", f"loss.lambda_coef={lam}")
    rows = check_pairs(trainer, batch, lambda pc, pr, *_: max(0.0, delta - pc + pr) + lam * -pc,
                       lambda pc, *_: pc, lambda pc, pr, *_: pr, reference=False)
    assert any(delta - pc + pr > 0 for pc, pr, *_ in rows)   # the hinge is active somewhere

    beta, ratio = 2.5, 0.3
    trainer, batch = moved(tmp_path, "simpo", f"loss.beta={beta}", f"loss.gamma_beta_ratio={ratio}")
    check_pairs(trainer, batch, lambda pc, pr, rc, rr, nc, nr: -logsig(beta * pc / nc - beta * pr / nr - ratio * beta),
                lambda pc, pr, rc, rr, nc, nr: beta * pc / nc, lambda pc, pr, rc, rr, nc, nr: beta * pr / nr,
                reference=False)

    alpha = 0.4

    def odds(logp, n):
        a = logp / n
        return a - math.log(-math.expm1(a))

    trainer, batch = moved(tmp_path, "orpo", f"loss.alpha={alpha}")
    check_pairs(trainer, batch,
                lambda pc, pr, rc, rr, nc, nr: -pc / nc - alpha * logsig(odds(pc, nc) - odds(pr, nr)),
                lambda pc, pr, rc, rr, nc, nr: odds(pc, nc), lambda pc, pr, rc, rr, nc, nr: odds(pr, nr),
                reference=False)


def kto_expected(trainer, batch, z0, beta, w_d, w_u):
    losses, rewards = [], []
    for target, desirable in zip(batch.parts["targets"], batch.values["desirable"].tolist()):
        ratio = total(trainer.policy, target) - total(trainer.reference, target)
        sigmoid = 1 / (1 + math.exp(-beta * ((ratio - z0) if desirable else (z0 - ratio))))
        losses.append((w_d if desirable else w_u) * (1 - sigmoid))
        rewards.append(beta * ratio)
    return losses, rewards


def kto_z0(trainer, microbatches):
    """z0 = max(0, mean over every KL partner of the step of log pi(y'|x) - log pi_ref(y'|x))."""
    ratios = [total(trainer.policy, s) - total(trainer.reference, s)
              for batch in microbatches for s in batch.parts["kl_partners"]]
    return max(0.0, sum(ratios) / len(ratios))


def test_kto_reference_point_and_loss(tmp_path):
    """Trained two steps with the undesirable term off (every likelihood rises, so z0 > 0 and the clamp is not
    what is tested), then scored with lambda_D != lambda_U and beta = 0.25, on one microbatch and with z0 over two
    accumulated microbatches."""
    trainer, batch = moved(tmp_path, "kto", "loss.undesirable_weight=0.0", steps=2)
    beta, w_d, w_u = 0.25, 0.7, 1.3
    trainer.config.loss.beta, trainer.config.loss.desirable_weight = beta, w_d
    trainer.config.loss.undesirable_weight = w_u
    assert 0 < int(batch.values["desirable"].sum()) < len(batch.parts["targets"])   # both sides present

    z0 = kto_z0(trainer, [batch])
    assert z0 > 0.05
    value, metrics = loss_of(trainer, batch)
    losses, rewards = kto_expected(trainer, batch, z0, beta, w_d, w_u)
    assert metrics["kl"].item() == approx(z0)
    assert metrics["loss"].tolist() == approx(losses) and value.item() == approx(sum(losses) / len(losses))
    desirable = batch.values["desirable"]
    assert metrics["rewards/chosen"].tolist() == approx([r for r, d in zip(rewards, desirable) if d])
    assert metrics["rewards/rejected"].tolist() == approx([r for r, d in zip(rewards, desirable) if not d])

    other = next(iter(trainer.train_loader))
    z0_both = kto_z0(trainer, [batch, other])
    assert abs(z0_both - z0) > 1e-3                                   # the second microbatch matters
    _, metrics = loss_of(trainer, batch, [batch, other])
    assert metrics["kl"].item() == approx(z0_both)
    assert metrics["loss"].tolist() == approx(kto_expected(trainer, batch, z0_both, beta, w_d, w_u)[0])


@pytest.mark.parametrize("loss", ["nca", "infonca"])
def test_k_wise(tmp_path, loss):
    beta, alpha = 0.3, 0.5
    trainer, batch = moved(tmp_path, loss, f"loss.beta={beta}", f"loss.alpha={alpha}")
    rewards = batch.values["rewards"].tolist()
    k = len(rewards[0])
    responses = batch.parts["responses"]
    expected, margins_all = [], []
    for b, row in enumerate(rewards):
        group = responses[b * k:(b + 1) * k]
        m = [beta * (total(trainer.policy, s) - total(trainer.reference, s)) for s in group]
        top = max(r / alpha for r in row)
        w = [math.exp(r / alpha - top) for r in row]
        w = [x / sum(w) for x in w]
        if loss == "nca":
            expected.append(-sum(wi * logsig(mi) for wi, mi in zip(w, m)) - sum(logsig(-mi) for mi in m) / k)
        else:
            top_m = max(m)
            log_z = top_m + math.log(sum(math.exp(mi - top_m) for mi in m))
            expected.append(-sum(wi * (mi - log_z) for wi, mi in zip(w, m)))
        margins_all += m
    value, metrics = loss_of(trainer, batch)
    assert metrics["loss"].tolist() == approx(expected) and value.item() == approx(sum(expected) / len(expected))
    assert_away_from_zero(margins_all)


@pytest.mark.parametrize("loss", ["sft", "csft"])
def test_sft_token_mean(tmp_path, loss):
    trainer, batch = moved(tmp_path, loss)
    tokens = [lp for s in batch.parts["targets"] for lp in token_logps(trainer.policy, s)]
    value, metrics = loss_of(trainer, batch)
    assert value.item() == approx(-sum(tokens) / len(tokens))
    assert metrics["logps/target"].tolist() == approx([total(trainer.policy, s) for s in batch.parts["targets"]])


def test_cut(tmp_path):
    """NLL over the judged rows + unlikelihood on negatives, with the threshold at the median token ratio so the
    batch mixes flagged and unflagged tokens."""
    trainer, batch = moved(tmp_path, "cut", "loss.weight_unlike=0.6")
    judged, plain = batch.parts["judged"], batch.parts["plain"]
    weights = batch.values["weight_unlike"].tolist()
    assert any(w == -1 for w in weights) and any(w != -1 for w in weights)
    nll_tokens = [lp for s in judged for lp in token_logps(trainer.policy, s)]
    pairs_ = []
    for j, p, w in zip(judged, plain, weights):
        if w != -1:
            pairs_ += list(zip(token_logps(trainer.policy, j), token_logps(trainer.policy, p)))
    ratios = sorted(math.exp(lj - lp) for lj, lp in pairs_)
    # the threshold halfway across the widest gap near the median: no ratio sits within float noise of it
    gap = max(range(len(ratios) // 4 + 1, 3 * len(ratios) // 4 + 1), key=lambda i: ratios[i] - ratios[i - 1])
    threshold = (ratios[gap - 1] + ratios[gap]) / 2
    assert ratios[gap] - ratios[gap - 1] > 1e-4
    trainer.config.loss.threshold = threshold
    w = next(x for x in weights if x != -1)
    terms = [-w * math.log(-math.expm1(lp)) if math.exp(lj - lp) > threshold else -lp for lj, lp in pairs_]
    flagged = sum(math.exp(lj - lp) > threshold for lj, lp in pairs_)
    assert 0 < flagged < len(pairs_)
    nll, ul = -sum(nll_tokens) / len(nll_tokens), sum(terms) / len(terms)
    value, metrics = loss_of(trainer, batch)
    assert (metrics["nll"].item(), metrics["unlikelihood"].item(), value.item()) == approx((nll, ul, (nll + ul) / 2))


def test_ppo_wiring(tmp_path):
    """PPO's formula is checked in test_losses.py; here the trainer must feed it the policy's and the reference's
    own token log-probs, the value head on the policy's last hidden state, the scores and each hyper-parameter
    under its own name (every one non-default and distinct)."""
    import losses

    hp = {"gamma": 0.9, "lam": 0.8, "cliprange": 0.3, "critic_coef": 0.05, "kl_coef": 0.02}
    trainer, batch = moved(tmp_path, "ppo", *[f"loss.{k}={v}" for k, v in hp.items()])
    targets = batch.parts["targets"]
    width = max(len(s.response_ids) for s in targets)
    pol = torch.zeros(len(targets), width, dtype=torch.float64)
    ref, values = torch.zeros_like(pol), torch.zeros_like(pol)
    mask = torch.zeros_like(pol, dtype=torch.bool)
    head = trainer.heads["value_head"]
    for b, s in enumerate(targets):
        ids = list(s.prompt_ids) + list(s.response_ids)
        n, start = len(s.response_ids), len(s.prompt_ids)
        pol[b, :n] = torch.tensor(token_logps(trainer.policy, s), dtype=torch.float64)
        ref[b, :n] = torch.tensor(token_logps(trainer.reference, s), dtype=torch.float64)
        with torch.no_grad():
            hidden = trainer.policy(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            values[b, :n] = head(hidden[start - 1: start - 1 + n]).squeeze(-1).double()
        mask[b, :n] = True
    assert (pol - ref)[mask].abs().max() > 0.01
    expected = losses.ppo_loss(pol, ref, values, mask, batch.values["scores"].double(), **hp)
    value, metrics = loss_of(trainer, batch)
    assert [value.item(), metrics["loss/policy"].item(), metrics["loss/critic"].item(), metrics["kl"].item()] == \
        pytest.approx([e.item() for e in expected], rel=1e-3, abs=1e-5)


def test_reward_model_bradley_terry(tmp_path):
    """-log σ(s_c - s_r), s = the score head on the last hidden state at the position predicting a sequence's last
    response token (what a sequence classifier reads)."""
    trainer, batch = moved(tmp_path, "rm")
    head = trainer.heads["score"]

    def score(sequence) -> float:
        ids = list(sequence.prompt_ids) + list(sequence.response_ids)
        with torch.no_grad():
            hidden = trainer.policy(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            return head(hidden[len(ids) - 2]).item()

    scores = [(score(c), score(r)) for c, r in zip(batch.parts["chosen"], batch.parts["rejected"])]
    value, metrics = loss_of(trainer, batch)
    expected = [-logsig(sc - sr) for sc, sr in scores]
    assert metrics["loss"].tolist() == approx(expected) and value.item() == approx(sum(expected) / len(expected))
    assert metrics["rewards/chosen"].tolist() == approx([sc for sc, _ in scores])
    assert metrics["rewards/rejected"].tolist() == approx([sr for _, sr in scores])
    assert_away_from_zero([sc - sr for sc, sr in scores])


def test_grpo(tmp_path):
    """Token mean of -min(A r, A clip(r, 1 - ε, 1 + ε)) + β (exp(q - p) - (q - p) - 1), r = exp(p - q), A the
    group's standardised reward (population std + 0.01); ε small enough that some tokens clip."""
    beta, epsilon = 0.05, 0.02
    trainer, batch = moved(tmp_path, "grpo", f"loss.beta={beta}", f"loss.epsilon={epsilon}")
    rewards = batch.values["rewards"].tolist()
    k = len(rewards[0])
    terms, kls, clipped = [], [], 0
    for b, row in enumerate(rewards):
        mean = sum(row) / k
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / k)
        for j, sequence in enumerate(batch.parts["responses"][b * k:(b + 1) * k]):
            advantage = (row[j] - mean) / (std + 0.01)
            for p, q in zip(token_logps(trainer.policy, sequence), token_logps(trainer.reference, sequence)):
                ratio = math.exp(p - q)
                bounded = min(max(ratio, 1 - epsilon), 1 + epsilon)
                kl = math.exp(q - p) - (q - p) - 1
                terms.append(-min(advantage * ratio, advantage * bounded) + beta * kl)
                kls.append(kl)
                clipped += advantage * bounded < advantage * ratio
    value, metrics = loss_of(trainer, batch)
    assert 0 < clipped < len(terms)
    assert value.item() == approx(sum(terms) / len(terms))
    assert metrics["kl"].item() == approx(sum(kls) / len(kls))
