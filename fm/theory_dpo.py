"""Numerical checks of the DPO theory problem (a)-(g) on a reply set small enough to enumerate.

A "language model" here is a distribution over every reply of L tokens from a vocabulary of V (V^L replies, listed
by `all_replies`), so sums over replies that are intractable for a real LM (Z(x), the KL) are exact. Each function
returns `common.checks.Check` rows; deterministic checks in float64 with a round-off tolerance.

(a) argmin_p KL(p || q) = q; (b) the KL-regularised optimum pi* = pi_ref exp(r / beta) / Z, found by numerical
maximisation and compared with the closed form; (c) Z sums V^L terms; (d) r = beta log(pi* / pi_ref) + beta log Z;
(e) Bradley-Terry with the reparameterised reward does not need Z, and the DPO loss's minimiser is pi*; (f) the DPO
gradient, autograd against the closed form with its weight sigma(r_hat_l - r_hat_w); (g) Plackett-Luce rankings
do not need Z either.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from common.checks import DTYPE, Check, seeded_generator

PROBLEM = "DPO"


def all_replies(vocab: int, length: int) -> Tensor:
    """(vocab**length, length) every token sequence of `length` tokens: the whole reply set Y of the toy LM."""
    if vocab < 1 or length < 1:
        raise ValueError(f"vocab and length must be >= 1, got {vocab}, {length}")
    return torch.tensor(list(itertools.product(range(vocab), repeat=length)))


def autoregressive_logprobs(logits: Tensor, replies: Tensor) -> Tensor:
    """log pi(y) of each reply (N,) under a position-wise autoregressive toy LM whose next-token logits depend on
    the previous token: `logits` (L, V, V) [position, previous token (0 at the start), next token]."""
    logp = F.log_softmax(logits, dim=-1)
    prev = torch.cat([torch.zeros_like(replies[:, :1]), replies[:, :-1]], dim=1)
    pos = torch.arange(replies.shape[1]).expand_as(replies)
    return logp[pos, prev, replies].sum(dim=1)


def kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) of two distributions over the same finite set (N,)."""
    return (p * (p.log() - q.log())).sum()


def rlhf_objective(pi: Tensor, pi_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    """E_{y ~ pi} r(y) - beta KL(pi || pi_ref) for one prompt, exactly (sums over all replies)."""
    return (pi * reward).sum() - beta * kl(pi, pi_ref)


def optimal_policy(pi_ref: Tensor, reward: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(pi*, log Z): pi* = pi_ref exp(r / beta) / Z with Z = sum_y pi_ref(y) exp(r(y) / beta), via logsumexp."""
    scores = pi_ref.log() + reward / beta
    log_z = torch.logsumexp(scores, dim=0)
    return (scores - log_z).exp(), log_z


def _maximise(objective, n: int, seed: int) -> Tensor:
    """The softmax(theta) over n outcomes that maximises `objective(pi)`, by L-BFGS from a random start."""
    theta = torch.randn(n, generator=seeded_generator(seed), dtype=DTYPE).requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -objective(theta.softmax(0))
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach().softmax(0)


def toy_problem(vocab: int = 3, length: int = 3, seed: int = 0):
    """(replies (N, L), pi_ref (N,), reward (N,)): a random autoregressive reference LM over all V^L replies and a
    random reward r(x, y) for one prompt x."""
    g = seeded_generator(seed)
    replies = all_replies(vocab, length)
    pi_ref = autoregressive_logprobs(torch.randn(length, vocab, vocab, generator=g, dtype=DTYPE), replies).exp()
    reward = torch.randn(len(replies), generator=g, dtype=DTYPE)
    return replies, pi_ref, reward


def kl_minimiser_check(n: int = 10, seed: int = 0) -> list[Check]:
    """(a) argmin_p KL(p || q) found numerically over the simplex equals q, and KL(q || q) = 0 < KL(p || q)."""
    q = torch.randn(n, generator=seeded_generator(seed), dtype=DTYPE).softmax(0)
    p = _maximise(lambda p: -kl(p, q), n, seed + 1)
    others = torch.randn(1000, n, generator=seeded_generator(seed + 2), dtype=DTYPE).softmax(1)
    min_other = min(kl(o, q).item() for o in others)
    return [Check(PROBLEM, "(a) max |argmin_p KL(p||q) - q| (L-BFGS over the simplex)", 0.0,
                  (p - q).abs().max().item(), tol=1e-6),
            Check(PROBLEM, "(a) min KL(p||q) over 1000 random p is > 0", 1.0, float(min_other > 0))]


def optimal_policy_checks(vocab: int = 3, length: int = 3, beta: float = 0.5, seed: int = 0) -> list[Check]:
    """(b) the maximiser of the RLHF objective over all distributions on the V^L replies is pi_ref exp(r/beta)/Z,
    its value is beta log Z, and 1000 random policies score lower; (c) Z has V^L terms; (d) the reward is
    recovered from pi*, pi_ref and Z."""
    replies, pi_ref, reward = toy_problem(vocab, length, seed)
    pi_star, log_z = optimal_policy(pi_ref, reward, beta)
    numeric = _maximise(lambda pi: rlhf_objective(pi, pi_ref, reward, beta), len(replies), seed + 1)
    best = rlhf_objective(pi_star, pi_ref, reward, beta).item()
    rivals = torch.randn(1000, len(replies), generator=seeded_generator(seed + 2), dtype=DTYPE).softmax(1)
    beaten = all(rlhf_objective(p, pi_ref, reward, beta).item() < best for p in rivals)
    recovered = beta * (pi_star.log() - pi_ref.log()) + beta * log_z
    label = f"V={vocab}, L={length}, beta={beta}"
    return [
        Check(PROBLEM, f"(b) max |numerical argmax of E r - beta KL - pi_ref e^(r/beta)/Z|, {label}", 0.0,
              (numeric - pi_star).abs().max().item(), tol=1e-6),
        Check(PROBLEM, "(b) objective at pi* = beta log Z", beta * log_z.item(), best, tol=1e-12),
        Check(PROBLEM, "(b) pi* beats 1000 random policies", 1.0, float(beaten)),
        Check(PROBLEM, f"(c) terms in Z(x) = |V|^L = {vocab}^{length}", vocab**length, len(replies)),
        Check(PROBLEM, "(d) max |beta log(pi*/pi_ref) + beta log Z - r|", 0.0, (recovered - reward).abs().max().item(),
              tol=1e-12),
    ]


def log10_reply_count(vocab: int, length: int) -> float:
    """(c) log10 |V|^L, the number of terms of Z(x) for a real LM (GPT-2: 50257 tokens, 1024 positions)."""
    return length * math.log10(vocab)


def bradley_terry_checks(vocab: int = 3, length: int = 3, beta: float = 0.5, seed: int = 0) -> list[Check]:
    """(e) P(y_i > y_j) from the reward equals sigma(beta log-ratio difference) without Z, for all pairs, although
    the log-ratio alone is off by beta log Z; and minimising the DPO loss on the Bradley-Terry preferences of all
    pairs gives back pi*."""
    replies, pi_ref, reward = toy_problem(vocab, length, seed)
    pi_star, log_z = optimal_policy(pi_ref, reward, beta)
    implicit = beta * (pi_star.log() - pi_ref.log())  # the reward without its beta log Z
    with_z = torch.sigmoid(reward[:, None] - reward[None, :])
    without_z = torch.sigmoid(implicit[:, None] - implicit[None, :])

    def neg_dpo_loss(pi: Tensor) -> Tensor:  # expected over all ordered pairs, soft labels P(y_i > y_j)
        r_hat = beta * (pi.log() - pi_ref.log())
        return (with_z * F.logsigmoid(r_hat[:, None] - r_hat[None, :])).sum()

    fitted = _maximise(neg_dpo_loss, len(replies), seed + 1)
    return [
        Check(PROBLEM, "(e) max |P_BT(y_i > y_j) from r - from beta log(pi*/pi_ref)|, all pairs", 0.0,
              (with_z - without_z).abs().max().item(), tol=1e-12),
        Check(PROBLEM, "(e) r - beta log(pi*/pi_ref) = beta log Z (what cancels)", beta * log_z.item(),
              (reward - implicit).mean().item(), tol=1e-12),
        Check(PROBLEM, "(e) max |argmin DPO loss on all BT pairs - pi*|", 0.0, (fitted - pi_star).abs().max().item(),
              tol=1e-5),
    ]


def dpo_gradient_checks(n_pairs: int = 64, vocab: int = 3, length: int = 3, beta: float = 0.5,
                        seed: int = 0) -> list[Check]:
    """(f) on a trainable autoregressive toy policy: autograd's gradient of the summed DPO loss equals
    -beta sum sigma(r_hat_l - r_hat_w) [grad log pi(y_w) - grad log pi(y_l)]; the weight is 1/2 at pi = pi_ref and
    > 1/2 exactly for the pairs the implicit reward ranks wrongly."""
    g = seeded_generator(seed)
    replies = all_replies(vocab, length)
    ref_logits = torch.randn(length, vocab, vocab, generator=g, dtype=DTYPE)
    theta = (ref_logits + 0.5 * torch.randn(ref_logits.shape, generator=g, dtype=DTYPE)).requires_grad_()
    pairs = torch.randint(len(replies), (n_pairs, 2), generator=g)
    ref_logp = autoregressive_logprobs(ref_logits, replies)

    def implicit(params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logp = autoregressive_logprobs(params, replies)
        r_hat = beta * (logp - ref_logp)
        return logp, r_hat[pairs[:, 0]], r_hat[pairs[:, 1]]

    _, r_w, r_l = implicit(theta)
    (autograd,) = torch.autograd.grad(-F.logsigmoid(r_w - r_l).sum(), theta)
    weight = torch.sigmoid(r_l - r_w).detach()
    closed = torch.zeros_like(theta)
    for k in range(n_pairs):
        logp = autoregressive_logprobs(theta, replies[pairs[k]])
        grad_w, grad_l = (torch.autograd.grad(logp[i], theta, retain_graph=i == 0)[0] for i in (0, 1))
        closed -= beta * weight[k] * (grad_w - grad_l)
    _, r_w0, r_l0 = implicit(ref_logits)
    wrong = (r_l > r_w).detach()
    return [
        Check(PROBLEM, f"(f) |autograd - closed-form DPO gradient| / |gradient|, {n_pairs} pairs", 0.0,
              ((autograd - closed).norm() / autograd.norm()).item(), tol=1e-12),
        Check(PROBLEM, "(f) max |weight - 1/2| at pi_theta = pi_ref", 0.0,
              (torch.sigmoid(r_l0 - r_w0) - 0.5).abs().max().item(), tol=1e-12),
        Check(PROBLEM, "(f) weight > 1/2 exactly on the wrongly ranked pairs (share of pairs)", 1.0,
              ((weight > 0.5) == wrong).double().mean().item()),
    ]


def plackett_luce_logprob(scores: Tensor, ranking: Tensor) -> Tensor:
    """log P(ranking) under Plackett-Luce: sum_k [s_tau(k) - logsumexp_{j >= k} s_tau(j)]; scores (K,), ranking (K,)
    the items from most to least preferred."""
    s = scores[ranking]
    tail = torch.logcumsumexp(s.flip(0), dim=0).flip(0)  # logsumexp over positions k..K-1
    return (s - tail).sum()


def plackett_luce_checks(k: int = 4, n_prompts: int = 20, beta: float = 0.5, seed: int = 0) -> list[Check]:
    """(g) for random prompts (log Z(x), pi*, pi_ref of K replies) and every ranking of the K replies:
    PL probabilities from r = beta log(pi*/pi_ref) + beta log Z(x) equal those from beta log(pi*/pi_ref) alone; they
    sum to 1 over the K! rankings; K = 2 is Bradley-Terry. Control: a shift that differs between replies does change
    the probabilities."""
    g = seeded_generator(seed)
    rankings = torch.tensor(list(itertools.permutations(range(k))))
    gap = total = bt_gap = control = 0.0
    for _ in range(n_prompts):
        log_ratio = torch.randn(k, generator=g, dtype=DTYPE)  # log pi*(y|x) - log pi_ref(y|x)
        log_z = 10 * torch.randn((), generator=g, dtype=DTYPE)
        implicit = beta * log_ratio
        with_z = torch.stack([plackett_luce_logprob(implicit + beta * log_z, r) for r in rankings]).exp()
        without_z = torch.stack([plackett_luce_logprob(implicit, r) for r in rankings]).exp()
        shifted = torch.stack([plackett_luce_logprob(implicit + torch.arange(k, dtype=DTYPE), r)
                               for r in rankings]).exp()
        gap = max(gap, (with_z - without_z).abs().max().item())
        total = max(total, abs(without_z.sum().item() - 1))
        control = max(control, (shifted - without_z).abs().max().item())
        pair = torch.tensor([0, 1])
        bt = torch.sigmoid(implicit[0] - implicit[1])
        bt_gap = max(bt_gap, abs(plackett_luce_logprob(implicit[:2], pair).exp().item() - bt.item()))
    return [
        Check(PROBLEM, f"(g) max |P_PL with Z - without Z|, {n_prompts} prompts x {len(rankings)} rankings of K={k}",
              0.0, gap, tol=1e-12),
        Check(PROBLEM, "(g) max |sum over rankings of P_PL - 1|", 0.0, total, tol=1e-12),
        Check(PROBLEM, "(g) max |P_PL(K=2) - sigma(r_hat_1 - r_hat_2)| (Bradley-Terry)", 0.0, bt_gap, tol=1e-12),
        Check(PROBLEM, "(g) control: per-reply shift changes P_PL (max change > 0.01)", 1.0, float(control > 0.01)),
    ]


def dpo_theory_checks(seed: int = 0) -> list[Check]:
    """Every check of (a)-(g), as notebook 0_theory tabulates them."""
    return [*kl_minimiser_check(seed=seed), *optimal_policy_checks(seed=seed), *bradley_terry_checks(seed=seed),
            *dpo_gradient_checks(seed=seed), *plackett_luce_checks(seed=seed)]
