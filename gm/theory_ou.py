"""Theory problem P3: denoising score matching for the Ornstein-Uhlenbeck process dX = -X/2 dt + dW, p_0 = N(0, 1).

Checked numerically: the marginals, the loss at the optimum per t, the weighting lambda(t) = sigma_t^2 (finite loss)
against lambda = 1 (diverges at t -> 0), the gap m^2 of a perturbed score, the singular sampling ODE (Euler order 1/2
on [0, T]) and the optimal denoiser being the true score. Float64 on the CPU, seeded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from common.checks import DTYPE, Check, mean_and_se, ols, randn, seeded_generator, var_and_se
from common.plotting import new_figure, save_figure


def ou_gamma_sigma(t: Tensor) -> tuple[Tensor, Tensor]:
    """X_t | X_0 ~ N(gamma_t X_0, sigma_t^2): gamma_t = exp(-t/2), sigma_t = sqrt(1 - exp(-t))."""
    return torch.exp(-t / 2), (-torch.expm1(-t)).sqrt()


def ou_marginal_mc(ts: tuple[float, ...], n: int, dt: float = 2e-3, seed: int = 0) -> list[Check]:
    """(a): Euler-Maruyama simulation of dX = -X/2 dt + dW from X_0 ~ N(0, 1) (closed forms not used): at each t the
    variance of X_t stays 1, and regressing X_t on X_0 gives slope gamma_t and residual variance sigma_t^2.
    The discretisation bias (~ dt/4 in the variance) is far below the Monte Carlo error for dt = 2e-3."""
    g = seeded_generator(seed)
    x0 = randn(n, g)
    x, now, checks = x0, 0.0, []
    for t in sorted(ts):
        while now < t - 1e-12:
            h = min(dt, t - now)
            x = x - 0.5 * x * h + math.sqrt(h) * randn(n, g)
            now += h
        gamma, sigma = ou_gamma_sigma(torch.tensor(t, dtype=DTYPE))
        var, var_se = var_and_se(x)
        coef, se, res_var, res_se = ols(x, [x0])
        checks += [
            Check("P3a", f"t={t:g}: Var p_t", 1.0, var, var_se),
            Check("P3a", f"t={t:g}: slope of X_t on X_0 (gamma_t)", gamma.item(), coef[0].item(), se[0].item()),
            Check("P3a", f"t={t:g}: Var(X_t | X_0) (sigma_t^2)", sigma.pow(2).item(), res_var, res_se),
        ]
    return checks


def _ou_draw(t: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x_0 ~ N(0, 1), eps ~ N(0, 1), x_t = gamma_t x_0 - sigma_t eps (the homework's sign). Returns (x_t, eps,
    conditional score grad log p_{t|0}(x_t | x_0) = eps / sigma_t, sigma_t)."""
    gamma, sigma = ou_gamma_sigma(t)
    x0, eps = randn(t.numel(), generator), randn(t.numel(), generator)
    xt = gamma * x0 - sigma * eps
    return xt, eps, eps / sigma, sigma


def ou_dsm_at_optimum(ts: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(b, c) per t: E[(s*(X_t) - grad log p_{t|0})^2] with the true score s* = -x. Closed form 1/sigma_t^2 - 1
    (~ 1/t near 0: its integral diverges, so lambda = 1 gives L = inf, while lambda = sigma_t^2 gives exp(-t)).
    Returns (closed form, MC mean, MC std err), each shaped like ts."""
    g = seeded_generator(seed)
    mc, se = torch.empty_like(ts), torch.empty_like(ts)
    for i, t in enumerate(ts):
        xt, _, cond_score, _ = _ou_draw(t.expand(n), g)
        mc[i], se[i] = mean_and_se((-xt - cond_score) ** 2)
    _, sigma = ou_gamma_sigma(ts)
    return 1 / sigma**2 - 1, mc, se


def ou_loss_at_optimum_checks(T: float, deltas: tuple[float, ...], n: int, seed: int = 0) -> list[Check]:
    """L(theta*) with t ~ U[delta, T]. lambda = 1 gives log((1 - e^{-T}) / (1 - e^{-delta})) / (T - delta), growing
    like log(1/delta) (infinite at delta = 0); lambda = sigma_t^2 with delta = 0 gives (1 - e^{-T}) / T (finite)."""
    g = seeded_generator(seed)
    checks = []
    for delta in deltas:
        t = delta + torch.rand(n, generator=g, dtype=DTYPE) * (T - delta)
        xt, _, cond_score, _ = _ou_draw(t, g)
        derived = math.log(-math.expm1(-T) / -math.expm1(-delta)) / (T - delta)
        checks.append(Check("P3b", f"L(theta*), lambda=1, delta={delta:g}, T={T:g}", derived,
                            *mean_and_se((-xt - cond_score) ** 2)))
    t = torch.rand(n, generator=g, dtype=DTYPE) * T
    xt, _, cond_score, sigma = _ou_draw(t, g)
    checks.append(Check("P3c", f"L(theta*), lambda=sigma_t^2, delta=0, T={T:g}", -math.expm1(-T) / T,
                        *mean_and_se(sigma**2 * (-xt - cond_score) ** 2)))
    return checks


def ou_loss_gap(m: float, T: float, n: int, seed: int = 0) -> Check:
    """(d): lambda = sigma_t^2, delta = 0, s_theta = (m / sigma_t) x + s*(x). L(theta) - L(theta*) = m^2, estimated
    with common random numbers (both losses on the same draws)."""
    g = seeded_generator(seed)
    t = torch.rand(n, generator=g, dtype=DTYPE) * T
    xt, _, cond_score, sigma = _ou_draw(t, g)
    s_star = -xt
    s_theta = m / sigma * xt + s_star
    diff = sigma**2 * ((s_theta - cond_score) ** 2 - (s_star - cond_score) ** 2)
    return Check("P3d", f"L(theta) - L(theta*), m={m:g}", m**2, *mean_and_se(diff))


def ou_ode_log_gain(m: float, t_end: float, steps: int, t_start: float = 0.0) -> tuple[float, float]:
    """(e): the probability-flow ODE dx/dt = f - g^2 s / 2 = -x/2 - s_theta / 2 = -m x / (2 sigma_t) run backwards
    from t_end to t_start with `steps` explicit Euler steps (the drift is evaluated at the later time, never at 0).
    Returns (Euler log x(t_start)/x(t_end), exact m (artanh sigma_{t_end} - artanh sigma_{t_start}))."""
    h = (t_end - t_start) / steps
    t = t_start + h * torch.arange(1, steps + 1, dtype=DTYPE)
    _, sigma = ou_gamma_sigma(t)
    euler = torch.log1p(h * m / (2 * sigma)).sum().item()
    _, s_end = ou_gamma_sigma(torch.tensor([t_end, t_start], dtype=DTYPE))
    exact = m * (torch.atanh(s_end[0]) - torch.atanh(s_end[1])).item()
    return euler, exact


def ou_ode_convergence(m: float, t_end: float, steps: tuple[int, ...], t_start: float
                       ) -> tuple[Tensor, Tensor, list[Check]]:
    """Euler error of the log gain against the step count on [0, t_end] (drift ~ t^{-1/2}, singular) and on
    [t_start, t_end] (smooth). Returns (errors on [0, t_end], errors on [t_start, t_end], Checks): the fitted orders,
    1/2 for the singular interval (the first step alone misses ~ m sqrt(h)/2) and Euler's usual 1 otherwise, and the
    variance of the generated samples."""
    errors = torch.tensor([[abs(euler - exact) for euler, exact in (ou_ode_log_gain(m, t_end, k, t0) for k in steps)]
                           for t0 in (0.0, t_start)], dtype=DTYPE)
    log_steps = torch.tensor(steps, dtype=DTYPE).log()
    checks = []
    for err, derived, span in zip(errors, (0.5, 1.0), (f"[0, {t_end:g}]", f"[{t_start:g}, {t_end:g}]"), strict=True):
        coef, _, _, _ = ols(err.log(), [log_steps, torch.ones_like(log_steps)])
        checks.append(Check("P3e", f"Euler order of convergence on {span}, m={m:g}", derived, -coef[0].item(),
                            tol=0.05))
    # the ODE is linear, so from X_T ~ N(0, 1) the generated x_0 has variance gain^2 (the data have variance 1)
    euler, exact = ou_ode_log_gain(m, t_end, max(steps))
    checks.append(Check("P3e", f"Var of ODE samples x_0 (true 1), m={m:g}, {max(steps)} Euler steps",
                        math.exp(2 * exact), math.exp(2 * euler), tol=0.01))
    return errors[0], errors[1], checks


def ou_optimal_denoiser(ts: tuple[float, ...], n: int, mu0: float = 2.0, s0: float = 0.5, seed: int = 0
                        ) -> list[Check]:
    """The minimiser of the DSM loss at time t is E[grad log p_{t|0}(X_t | X_0) | X_t]; fit it by least squares on
    (x_t, x_t^2, 1) for OU data X_0 ~ N(mu0, s0^2). For Gaussian data it is linear and equals the true score
    grad log p_t(x) = -(x - gamma mu0) / v_t, v_t = gamma^2 s0^2 + sigma^2: slope -1/v_t, intercept gamma mu0 / v_t,
    quadratic coefficient 0."""
    g = seeded_generator(seed)
    checks = []
    for t in ts:
        gamma, sigma = (v.item() for v in ou_gamma_sigma(torch.tensor(t, dtype=DTYPE)))
        x0, eps = mu0 + s0 * randn(n, g), randn(n, g)
        xt = gamma * x0 - sigma * eps
        coef, se, _, _ = ols(eps / sigma, [xt, xt**2, torch.ones_like(xt)])
        v_t = gamma**2 * s0**2 + sigma**2
        checks += [
            Check("P3 denoiser", f"t={t:g}: optimal denoiser slope (-1/v_t)", -1 / v_t, coef[0].item(), se[0].item()),
            Check("P3 denoiser", f"t={t:g}: optimal denoiser x^2 coefficient", 0.0, coef[1].item(), se[1].item()),
            Check("P3 denoiser", f"t={t:g}: optimal denoiser intercept (gamma mu0/v_t)", gamma * mu0 / v_t,
                  coef[2].item(), se[2].item()),
        ]
    return checks


def plot_dsm(ts: Tensor, closed: Tensor, mc: Tensor, se: Tensor, steps: tuple[int, ...], err_singular: Tensor,
             err_smooth: Tensor, t_start: float, path, title: str) -> None:
    """Left: DSM loss at the optimum per t for lambda = 1 and lambda = sigma_t^2 (closed form lines, MC points).
    Right: Euler error of the reverse ODE on [0, T] (singular) and [t_start, T] against the number of steps."""
    fig, (left, right) = new_figure(1, 2, figsize=(11, 4))
    _, sigma = ou_gamma_sigma(ts)
    for weight, label in ((torch.ones_like(ts), "lambda = 1: 1/sigma_t^2 - 1"),
                          (sigma**2, "lambda = sigma_t^2: exp(-t)")):
        line, = left.plot(ts, weight * closed, label=label)
        left.errorbar(ts, weight * mc, yerr=3 * weight * se, fmt="o", color=line.get_color(), markersize=3)
    left.set(xscale="log", yscale="log", xlabel="t", ylabel="E[lambda (s* - grad log p_t|0)^2]",
             title="DSM loss of the true score per t (points: MC +-3 s.e.)")
    left.legend(fontsize=8)
    n = torch.tensor(steps, dtype=DTYPE)
    right.loglog(n, err_singular, "o-", label="[0, T]: drift ~ t^(-1/2)")
    right.loglog(n, err_smooth, "s-", label=f"[{t_start:g}, T]: smooth drift")
    right.loglog(n, err_singular[0] * (n / n[0]) ** -0.5, "k:", linewidth=0.8, label="slope -1/2")
    right.loglog(n, err_smooth[0] * (n / n[0]) ** -1.0, "k--", linewidth=0.8, label="slope -1")
    right.set(xlabel="Euler steps", ylabel="|log-gain error|", title="reverse ODE with s = m x / sigma_t + s*")
    right.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)
