"""Theory problem P2: DDIM's non-Markovian family keeps q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) for any
admissible sigma, checked numerically.

Simulates the family for several sigma choices (and a negative control with the -sigma^2 term forgotten, which the
check must reject) from the bimodal `toy_data`, and checks that `gm.diffusion`'s DDIM step is a member of the family.
Float64 on the CPU, seeded; entry t - 1 of the alpha sequence is alpha_t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from common.checks import DTYPE, Check, mean_and_se, randn, seeded_generator, var_and_se
from common.plotting import new_figure, save_figure
from gm.diffusion import GaussianDiffusion
from gm.theory_config import toy_data

SIGMA_FAMILIES = ("eta=0 (DDIM)", "eta=1 (DDPM posterior)", "random admissible", "max: sigma^2 = 1 - a_t")


def ddim_family_sigmas(alphas: Tensor, family: str, generator: torch.Generator | None = None) -> Tensor:
    """(T - 1,) sigma_{t+1} for t = 1..T-1 (entry t - 1), all admissible: sigma_{t+1}^2 <= 1 - alpha_t.

    alphas: (T,) the sequence alpha_1..alpha_T in (0, 1) (entry t - 1 is alpha_t)."""
    a_t, a_next = alphas[:-1], alphas[1:]
    if family == SIGMA_FAMILIES[0]:
        return torch.zeros_like(a_t)
    if family == SIGMA_FAMILIES[1]:  # DDIM's eta = 1: the DDPM posterior variance on this subsequence
        return ((1 - a_t) / (1 - a_next) * (1 - a_next / a_t)).clamp(min=0).sqrt()
    if family == SIGMA_FAMILIES[2]:
        return torch.rand(a_t.shape, generator=generator, dtype=DTYPE) * (1 - a_t).sqrt()
    if family == SIGMA_FAMILIES[3]:
        return (1 - a_t).sqrt()
    raise ValueError(f"unknown sigma family {family!r}; choose one of {SIGMA_FAMILIES}")


def ddim_marginals_mc(alphas: Tensor, sigmas: Tensor, n: int, seed: int = 0, drop_sigma_term: bool = False
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample the DDIM "forward" process X_T | X_0, then X_t | X_{t+1}, X_0 for t = T-1..1, with x_0 ~ toy_data.

    Returns per t = 1..T (entry t - 1) the mean and variance of z_t = (X_t - sqrt(alpha_t) X_0) / sqrt(1 - alpha_t)
    and their standard errors; the claim is z_t ~ N(0, 1) for every t. `drop_sigma_term` uses the wrong coefficient
    sqrt(1 - alpha_t) / sqrt(1 - alpha_{t+1}) (forgetting the -sigma^2), a negative control the check must catch.
    """
    T = len(alphas)
    if sigmas.shape != (T - 1,):
        raise ValueError(f"sigmas must have shape ({T - 1},) for {T} alphas, got {tuple(sigmas.shape)}")
    if (sigmas**2 > 1 - alphas[:-1] + 1e-12).any():
        raise ValueError("inadmissible sigma: need sigma_{t+1}^2 <= 1 - alpha_t for all t")
    g = seeded_generator(seed)
    x0 = toy_data(n, g)
    x = alphas[-1].sqrt() * x0 + (1 - alphas[-1]).sqrt() * randn(n, g)
    stats = torch.zeros(4, T, dtype=DTYPE)  # rows: mean, mean se, var, var se
    for t in range(T, 0, -1):
        if t < T:
            a_t, a_next, sigma = alphas[t - 1], alphas[t], sigmas[t - 1]
            keep = (1 - a_t) if drop_sigma_term else (1 - a_t - sigma**2).clamp(min=0)
            x = a_t.sqrt() * x0 + keep.sqrt() / (1 - a_next).sqrt() * (x - a_next.sqrt() * x0) + sigma * randn(n, g)
        z = (x - alphas[t - 1].sqrt() * x0) / (1 - alphas[t - 1]).sqrt()
        stats[:, t - 1] = torch.tensor([*mean_and_se(z), *var_and_se(z)], dtype=DTYPE)
    return stats[0], stats[1], stats[2], stats[3]


def ddim_marginal_checks(alphas: Tensor, n: int, seed: int = 0) -> tuple[list[Check], dict[str, Tensor]]:
    """For every sigma family: the worst |z-score| over t of mean(z_t) = 0 and of var(z_t) = 1, reported as the
    check at that t; plus the negative control's variance (must fail). Returns (checks, {family: var(z_t) per t})."""
    checks, variances = [], {}
    g = seeded_generator(seed + 1)
    runs = [(family, ddim_family_sigmas(alphas, family, g), False) for family in SIGMA_FAMILIES]
    runs.append(("control, must fail: coefficient without -sigma^2 (eta=1)", runs[1][1], True))
    for i, (family, sigmas, wrong) in enumerate(runs):
        mean, mean_se, var, var_se = ddim_marginals_mc(alphas, sigmas, n, seed + 10 + i, drop_sigma_term=wrong)
        variances[family] = var
        i_mean = int((mean / mean_se).abs().argmax())
        i_var = int(((var - 1).abs() / var_se).argmax())
        if not wrong:  # the control's mean is still right; only its variance is meant to fail
            checks.append(Check("P2", f"{family}: mean of z_t, worst t={i_mean + 1}", 0.0, mean[i_mean].item(),
                                mean_se[i_mean].item()))
        checks.append(Check("P2", f"{family}: var of z_t, worst t={i_var + 1}", 1.0, var[i_var].item(),
                            var_se[i_var].item()))
    return checks, variances


def ddim_sampler_in_family(diffusion: GaussianDiffusion, steps: int, n: int = 1000, seed: int = 0) -> list[Check]:
    """`gm.diffusion`'s DDIM sampler is this family: with an oracle eps output (the true noise of x_t given x_0, so
    x0_hat = x_0), `GaussianDiffusion.step` with eta = 0 must equal the family's mean (sigma = 0), and `ddim_sigma`
    with eta = 1 the family's eta = 1 sigma, on every pair of consecutive DDIM timesteps (float32 buffers)."""
    g = seeded_generator(seed)
    x0 = toy_data(n, g).float()
    seq = diffusion.ddim_timesteps(steps)
    alphas = diffusion.alphas_cumprod.double()[seq]
    sigma_family = ddim_family_sigmas(alphas, SIGMA_FAMILIES[1])
    worst_mean = worst_sigma = 0.0
    for i in range(1, len(seq)):
        t, t_prev = torch.full((n,), int(seq[i])), torch.full((n,), int(seq[i - 1]))
        xt = diffusion.q_sample(x0, t, randn(n, g).float())
        a_t, a_prev = alphas[i].item(), alphas[i - 1].item()
        oracle_eps = (xt - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        prev = diffusion.step(oracle_eps, t, t_prev, xt, eta=0.0).prev_sample
        family_mean = math.sqrt(a_prev) * x0 + math.sqrt((1 - a_prev) / (1 - a_t)) * (xt - math.sqrt(a_t) * x0)
        worst_mean = max(worst_mean, (prev - family_mean).abs().max().item())
        sigma = diffusion.ddim_sigma(t[:1], t_prev[:1], 1.0).item()
        worst_sigma = max(worst_sigma, abs(sigma - sigma_family[i - 1].item()))
    return [
        Check("P2", f"gm.diffusion step (eta=0, oracle) - family mean, max over {len(seq) - 1} steps", 0.0,
              worst_mean, tol=1e-5),
        Check("P2", "gm.diffusion ddim_sigma (eta=1) - family sigma, max (float32)", 0.0, worst_sigma, tol=1e-5),
    ]


def plot_ddim_marginals(variances: dict[str, Tensor], path, title: str) -> None:
    """Var of the standardised z_t = (X_t - sqrt(a_t) X_0) / sqrt(1 - a_t) per t for each sigma family."""
    fig, ax = new_figure(figsize=(6.5, 4))
    for name, var in variances.items():
        ax.plot(torch.arange(1, len(var) + 1), var, marker="o", markersize=2, label=name)
    ax.axhline(1.0, color="k", linestyle=":", linewidth=0.8)
    ax.set(xlabel="t (DDIM index)", ylabel="Var(z_t)", yscale="log", title=title)
    ax.legend(fontsize=7)
    save_figure(fig, path)
