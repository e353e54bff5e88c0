"""Theory problem P1: the reverse conditional q(x_{t-1} | x_t, x_0) of DDPM, checked numerically.

The closed form (standard and score form, and `gm.diffusion.GaussianDiffusion.q_posterior`) against a Monte Carlo
regression on simulated forward chains from the bimodal `toy_data`. Float64 on the CPU, seeded; time indices follow
the homework: t = 1..T, `betas[t - 1]` is beta_t, and abar_0 = 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from common.checks import Check, ols, randn, seeded_generator
from gm.diffusion import GaussianDiffusion
from gm.theory_config import toy_data


def alphas_cumprod(betas: Tensor) -> Tensor:
    """(T + 1,) abar_0 = 1, abar_t = prod_{s <= t} (1 - beta_s)."""
    return torch.cat([torch.ones(1, dtype=betas.dtype), torch.cumprod(1 - betas, dim=0)])


def posterior_closed_form(betas: Tensor, t: int) -> tuple[float, float, float]:
    """q(x_{t-1} | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, beta_tilde): returns (c_x0, c_xt, beta_tilde), t in 1..T.

    c_x0 = beta_t sqrt(abar_{t-1}) / (1 - abar_t), c_xt = sqrt(1 - beta_t)(1 - abar_{t-1}) / (1 - abar_t),
    beta_tilde = beta_t (1 - abar_{t-1}) / (1 - abar_t).
    """
    if not 1 <= t <= len(betas):
        raise ValueError(f"t must lie in 1..{len(betas)}, got {t}")
    abar = alphas_cumprod(betas)
    beta, prev, cur = betas[t - 1].item(), abar[t - 1].item(), abar[t].item()
    c_x0 = beta * math.sqrt(prev) / (1 - cur)
    c_xt = math.sqrt(1 - beta) * (1 - prev) / (1 - cur)
    return c_x0, c_xt, beta * (1 - prev) / (1 - cur)


def posterior_mean_via_score(betas: Tensor, t: int, x0: Tensor, xt: Tensor) -> Tensor:
    """The homework's form: (x_t + beta_t grad log p_{t|0}(x_t | x_0)) / sqrt(1 - beta_t),
    with grad log p_{t|0}(x_t | x_0) = -(x_t - sqrt(abar_t) x_0) / (1 - abar_t)."""
    abar_t = alphas_cumprod(betas)[t]
    beta = betas[t - 1]
    score = -(xt - abar_t.sqrt() * x0) / (1 - abar_t)
    return (xt + beta * score) / (1 - beta).sqrt()


def posterior_form_agreement(betas: Tensor, n: int = 1000, seed: int = 0) -> Check:
    """Largest |score-form mean - standard-form mean| over all t = 1..T on random (x_0, x_t) pairs (exact algebra)."""
    g = seeded_generator(seed)
    x0, xt = randn(n, g), randn(n, g)
    worst = 0.0
    for t in range(1, len(betas) + 1):
        c_x0, c_xt, _ = posterior_closed_form(betas, t)
        diff = posterior_mean_via_score(betas, t, x0, xt) - (c_x0 * x0 + c_xt * xt)
        worst = max(worst, diff.abs().max().item())
    return Check("P1", f"max over t=1..{len(betas)}: score-form mean - standard mean", 0.0, worst, tol=1e-10)


def posterior_vs_diffusion(betas: Tensor, diffusion: GaussianDiffusion, n: int = 1000, seed: int = 0) -> list[Check]:
    """Compare with `gm.diffusion.GaussianDiffusion.q_posterior` (0-based index i = t - 1, float32 buffers):
    largest relative error of the mean and of the variance over all t."""
    g = seeded_generator(seed)
    x0, xt = randn(n, g), randn(n, g)
    worst_mean = worst_var = 0.0
    for t in range(2, len(betas) + 1):  # t = 1 has beta_tilde = 0; its mean is x_0 (checked via the mean only)
        c_x0, c_xt, var = posterior_closed_form(betas, t)
        mean_ref = c_x0 * x0 + c_xt * xt
        mean, variance, _ = diffusion.q_posterior(x0.float(), xt.float(), t - 1)
        worst_mean = max(worst_mean, ((mean.double() - mean_ref).abs().max() / mean_ref.abs().max()).item())
        worst_var = max(worst_var, abs(variance.double().flatten()[0].item() - var) / var)
    return [
        Check("P1", "max rel. diff of mean vs gm.diffusion.q_posterior (float32)", 0.0, worst_mean, tol=1e-5),
        Check("P1", "max rel. diff of variance vs gm.diffusion.q_posterior (float32)", 0.0, worst_var, tol=1e-5),
    ]


def reverse_conditional_mc(betas: Tensor, ts: tuple[int, ...], n: int, seed: int = 0) -> list[Check]:
    """Simulate n forward chains x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) eps step by step from x_0 ~ toy_data
    (no closed-form marginal used), then regress x_{t-1} on (x_t, x_0, 1): for a Gaussian conditional the regression
    coefficients are c_xt and c_x0, the intercept 0, and the residual variance beta_tilde."""
    if min(ts) < 2 or max(ts) > len(betas):
        raise ValueError(f"ts must lie in 2..{len(betas)} (beta_tilde_1 = 0 is degenerate), got {ts}")
    g = seeded_generator(seed)
    x0 = toy_data(n, g)
    x, checks = x0, []
    for s in range(1, max(ts) + 1):
        prev, beta = x, betas[s - 1]
        x = (1 - beta).sqrt() * prev + beta.sqrt() * randn(n, g)
        if s in ts:
            c_x0, c_xt, var = posterior_closed_form(betas, s)
            coef, se, res_var, res_se = ols(prev, [x, x0, torch.ones_like(x)])
            checks += [
                Check("P1", f"t={s}: coefficient of x_t", c_xt, coef[0].item(), se[0].item()),
                Check("P1", f"t={s}: coefficient of x_0", c_x0, coef[1].item(), se[1].item()),
                Check("P1", f"t={s}: variance beta_tilde", var, res_var, res_se),
            ]
    return checks
