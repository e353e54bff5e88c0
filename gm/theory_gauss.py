"""The solutions' 1-D Gaussian exercise (a)-(h): reverse sampling with only the conditional mean vs DDPM vs DDIM.

Data X_0 ~ N(0, sigma^2) under the variance-exploding forward process X_t = X_0 + W_t on [0, 1]. (a)-(c) the forward
marginals and the one-step reverse conditional, simulated step by step (`forward_checks`); (d), (e), (h) from
X_1 ~ N(0, 1), the conditional mean alone gives samples with variance ~ sigma^4 (far too narrow), DDPM (either noise
variance) and DDIM ~ sigma^2; every sampler is linear, so the finite-step variance is also computed exactly
(`gaussian_reverse_experiment`); (f) the regression that trains g(x_t, t) has the ideal denoiser
sigma^2 / (sigma^2 + t) x_t as its minimiser (`denoiser_regression_checks`); (g) eta(t, dt) = 1/2 + dt/(8t) + O(dt^2)
(`eta_expansion_checks`). Float64, seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from common.checks import DTYPE, Check, ols, randn, seeded_generator, var_and_se
from common.plotting import new_figure, save_figure

REVERSE_SAMPLERS = ("mean only", "DDPM, noise var dt", "DDPM, exact posterior var", "DDIM")
SAMPLER_KEYS = dict(zip(REVERSE_SAMPLERS, ("mean_only", "ddpm_noise_var_dt", "ddpm_posterior_var", "ddim"),
                        strict=True))  # their machine keys in fig/theory_checks.json


def reverse_coefficients(sigma2: float, steps: int, sampler: str) -> tuple[Tensor, Tensor]:
    """Variance-exploding process X_t = X_0 + W_t on [0, 1], X_0 ~ N(0, sigma2), dt = 1/steps. Every sampler is
    linear: x_{t - dt} = a x_t + sqrt(v) eps. Returns (a, v), each (steps,), entry k for the step from t = (k+1) dt
    to k dt (so the reverse pass uses k = steps-1 .. 0).

    The conditional mean of X_{t-dt} | X_t is (sigma2 + t - dt) / (sigma2 + t) x_t and its variance
    (sigma2 + t - dt) dt / (sigma2 + t). DDIM moves to x0_hat + sqrt(s / t)(x_t - x0_hat) with the ideal denoiser
    x0_hat = sigma2 / (sigma2 + t) x_t (noise std sqrt(t) at time t)."""
    k = torch.arange(steps, dtype=DTYPE)
    dt = 1.0 / steps
    t, s = (k + 1) * dt, k * dt
    cond_mean = (sigma2 + s) / (sigma2 + t)
    if sampler == REVERSE_SAMPLERS[0]:
        return cond_mean, torch.zeros_like(t)
    if sampler == REVERSE_SAMPLERS[1]:
        return cond_mean, torch.full_like(t, dt)
    if sampler == REVERSE_SAMPLERS[2]:
        return cond_mean, (sigma2 + s) * dt / (sigma2 + t)
    if sampler == REVERSE_SAMPLERS[3]:
        shrink = sigma2 / (sigma2 + t)
        return shrink + (s / t).sqrt() * (1 - shrink), torch.zeros_like(t)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {REVERSE_SAMPLERS}")


def ddim_eta_form(sigma2: float, steps: int) -> Tensor:
    """The solutions' DDIM step factor 1 - eta(t, dt) dt / (sigma2 + t), eta = sqrt(t) / (sqrt(t - dt) + sqrt(t))."""
    dt = 1.0 / steps
    t = torch.arange(1, steps + 1, dtype=DTYPE) * dt
    eta = t.sqrt() / ((t - dt).sqrt() + t.sqrt())
    return 1 - eta * dt / (sigma2 + t)


def reverse_variance_exact(a: Tensor, v: Tensor, start_var: float = 1.0) -> Tensor:
    """(steps + 1,) Var(x_{k dt}) for k = 0..steps of the linear recursion, exact for any number of steps."""
    var = torch.empty(len(a) + 1, dtype=DTYPE)
    var[-1] = start_var
    for k in range(len(a) - 1, -1, -1):
        var[k] = a[k] ** 2 * var[k + 1] + v[k]
    return var


def reverse_variance_limit(sigma2: float, sampler: str) -> float:
    """Continuum (dt -> 0) limit of Var(x_0) from X_1 ~ N(0, 1), as the solutions evaluate it:
    mean only (sigma2/(1+sigma2))^2 ~ sigma^4; DDPM sigma2 - sigma2^3/(1+sigma2)^2 ~ sigma^2;
    DDIM sigma2/(1+sigma2) ~ sigma^2."""
    if sampler == REVERSE_SAMPLERS[0]:
        return (sigma2 / (1 + sigma2)) ** 2
    if sampler in REVERSE_SAMPLERS[1:3]:
        return sigma2 - sigma2**3 / (1 + sigma2) ** 2
    if sampler == REVERSE_SAMPLERS[3]:
        return sigma2 / (1 + sigma2)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {REVERSE_SAMPLERS}")


def simulate_reverse(a: Tensor, v: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Run the reverse recursion on n samples from X_1 ~ N(0, 1). Returns (x_0 samples (n,), Var per k (steps+1,))."""
    g = seeded_generator(seed)
    x = randn(n, g)
    var = torch.empty(len(a) + 1, dtype=DTYPE)
    var[-1] = x.var()
    for k in range(len(a) - 1, -1, -1):
        x = a[k] * x + (v[k].sqrt() * randn(n, g) if v[k] > 0 else 0.0)
        var[k] = x.var()
    return x, var


@dataclass
class GaussianReverseResult:
    """Output of `gaussian_reverse_experiment`: checks for the table, a per-sampler summary, data for the figure."""

    checks: list[Check]
    table: list[dict]  # one row per sampler for the report
    samples: dict[str, Tensor]  # sampler -> (n,) x_0 draws
    trajectories: dict[str, tuple[Tensor, Tensor]]  # sampler -> (simulated, exact) Var(x_t) per grid point


def gaussian_reverse_experiment(sigma2: float, steps: int, n: int, seed: int = 0) -> GaussianReverseResult:
    """All samplers of `REVERSE_SAMPLERS` from X_1 ~ N(0, 1): simulated Var(x_0) against the exact finite-step value
    and the continuum limit; plus the check that the solutions' eta-form of the DDIM step is the exact DDIM update."""
    checks, table, samples, trajectories = [], [], {}, {}
    for i, sampler in enumerate(REVERSE_SAMPLERS):
        a, v = reverse_coefficients(sigma2, steps, sampler)
        exact = reverse_variance_exact(a, v)
        x0, sim = simulate_reverse(a, v, n, seed + i)
        var, var_se = var_and_se(x0)
        samples[sampler], trajectories[sampler] = x0, (sim, exact)
        checks.append(Check("Gauss 1-D", f"Var(x_0), {sampler}, T={steps}", exact[0].item(), var, var_se))
        table.append({
            "sampler": sampler,
            "Var(x_0) simulated": var,
            "MC std err": f"{var_se:.2g}",
            "exact, T steps": exact[0].item(),
            "limit dt->0 (solutions)": reverse_variance_limit(sigma2, sampler),
            "Var / sigma^2": var / sigma2,
        })
    ddim_a, _ = reverse_coefficients(sigma2, steps, "DDIM")
    gap = (ddim_a - ddim_eta_form(sigma2, steps)).abs().max().item()
    checks.append(Check("Gauss 1-D", "DDIM step: exact update - eta-form of the solutions (max)", 0.0, gap, tol=1e-12))
    return GaussianReverseResult(checks, table, samples, trajectories)


def plot_gaussian_reverse(result: GaussianReverseResult, sigma2: float, path, title: str) -> None:
    """Left: histograms of x_0 per sampler against the data density N(0, sigma2). Right: Var(x_t) along the reverse
    pass divided by the forward marginal sigma2 + t (simulated solid, exact recursion dashed)."""
    fig, (left, right) = new_figure(1, 2, figsize=(11, 4))
    grid = torch.linspace(-4 * math.sqrt(sigma2), 4 * math.sqrt(sigma2), 400, dtype=DTYPE)
    for name, x0 in result.samples.items():
        left.hist(x0.numpy(), bins=120, range=(grid[0].item(), grid[-1].item()), density=True, histtype="step",
                  label=f"{name} (var {x0.var().item():.3g})")
    density = torch.exp(-grid**2 / (2 * sigma2)) / math.sqrt(2 * math.pi * sigma2)
    left.plot(grid, density, "k--", label=f"data N(0, {sigma2:g})")
    left.set(xlabel="x_0", ylabel="density", title="samples x_0 from X_1 ~ N(0, 1)")
    left.legend(fontsize=7)
    for name, (simulated, exact) in result.trajectories.items():
        t = torch.linspace(0, 1, len(simulated), dtype=DTYPE)
        line, = right.plot(t, simulated / (sigma2 + t), label=name)
        right.plot(t, exact / (sigma2 + t), "--", color=line.get_color(), linewidth=0.8)
    right.axhline(1.0, color="k", linestyle=":", label="forward marginal (ratio 1)")
    right.set(xlabel="t", ylabel="Var(x_t) / (sigma^2 + t)", yscale="log",
              title="reverse-pass variance / forward marginal (dashed: exact)")
    right.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def forward_checks(sigma2: float, steps: int, n: int, times: tuple[float, ...] = (0.1, 0.5), seed: int = 0
                   ) -> list[Check]:
    """(a)-(c): n chains X_0 ~ N(0, sigma2) plus `steps` increments N(0, dt) on [0, 1], simulated step by step.
    Var X_1 = sigma2 + 1 (a) and Var X_t = sigma2 + t (b); regressing X_{t-dt} on X_t gives the slope
    (sigma2 + t - dt) / (sigma2 + t) and residual variance (sigma2 + t - dt) dt / (sigma2 + t) = dt (1 - dt / (sigma2 +
    t)) ~ dt (c)."""
    g = seeded_generator(seed)
    dt = 1.0 / steps
    marks = {round(t * steps): t for t in times}
    x = sigma2**0.5 * randn(n, g)
    checks = []
    for k in range(1, steps + 1):
        previous, x = x, x + dt**0.5 * randn(n, g)
        if k in marks:
            t = marks[k]
            var, var_se = var_and_se(x)
            coef, coef_se, res_var, res_se = ols(previous, [x])
            checks += [Check("Gauss 1-D", f"(b) Var X_t = sigma^2 + t, t={t:g}", sigma2 + t, var, var_se),
                       Check("Gauss 1-D", f"(c) slope of E[X_(t-dt) | X_t], t={t:g}", (sigma2 + t - dt) / (sigma2 + t),
                             coef[0].item(), coef_se[0].item()),
                       Check("Gauss 1-D", f"(c) Var(X_(t-dt) | X_t) / dt, t={t:g} (approx. 1)",
                             1 - dt / (sigma2 + t), res_var / dt, res_se / dt)]
    var, var_se = var_and_se(x)
    return [Check("Gauss 1-D", f"(a) Var X_1 = sigma^2 + 1, T={steps}", sigma2 + 1, var, var_se), *checks]


def denoiser_regression_checks(sigma2: float, n: int, times: tuple[float, ...] = (0.05, 0.25, 0.5, 0.9),
                               n_data: int = 1000, seed: int = 0) -> list[Check]:
    """(f) the training recipe of g(x_t, t): a data set s_1..s_n_data ~ N(0, sigma2); a batch draws a time t_i, a
    data point s_l (uniform index) and z_i ~ N(0, t_i); input (t_i, x_i = s_l + z_i), target s_l, squared loss.
    The loss's minimiser is pointwise in t, E[X_0 | X_t = x] = sigma2 / (sigma2 + t) x, so the check draws t_i from
    a few fixed `times` (for t ~ U(0, 1) each t is such a regression) and fits s on (x, x^3) by least squares at
    each: the x coefficient is sigma2 / (sigma2 + t), the x^3 coefficient 0 (the conditional mean is linear) and the
    residual variance, the loss at the minimiser, Var(X_0 | X_t) = sigma2 t / (sigma2 + t). sigma2 is the data set's
    own second moment, which is all a fit to it can see."""
    g = seeded_generator(seed)
    data = sigma2**0.5 * randn(n_data, g)
    s2 = data.pow(2).mean().item()
    per_time = n // len(times)
    checks = []
    for t in times:
        s = data[torch.randint(n_data, (per_time,), generator=g)]
        x = s + math.sqrt(t) * randn(per_time, g)
        coef, se, res_var, res_se = ols(s, [x, x**3])
        checks += [Check("Gauss 1-D", f"(f) fitted coefficient of x_t, t={t:g}", s2 / (s2 + t), coef[0].item(),
                         se[0].item()),
                   Check("Gauss 1-D", f"(f) fitted coefficient of x_t^3, t={t:g}", 0.0, coef[1].item(), se[1].item()),
                   Check("Gauss 1-D", f"(f) loss at the minimiser = Var(X_0 | X_t), t={t:g}", s2 * t / (s2 + t),
                         res_var, res_se)]
    return checks


def eta_expansion_checks(ratios: tuple[float, ...] = (1e-1, 1e-2, 1e-3)) -> list[Check]:
    """(g) eta(t, dt) = sqrt(t) / (sqrt(t - dt) + sqrt(t)) = 1 / (1 + sqrt(1 - h)) with h = dt / t; the expansion
    1/2 + h/8 leaves h^2/16 + O(h^3), so (eta - 1/2 - h/8) / h^2 -> 1/16; the DDIM step is then
    x_t (1 - dt / (2 (sigma^2 + t)) - dt^2 / (8 t (sigma^2 + t)))."""
    checks = []
    for h in ratios:
        eta = 1 / (1 + math.sqrt(1 - h))
        checks.append(Check("Gauss 1-D", f"(g) (eta - 1/2 - dt/(8t)) / (dt/t)^2, dt/t={h:g}", 1 / 16,
                            (eta - 0.5 - h / 8) / h**2, tol=h))
    return checks
