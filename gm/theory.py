"""Numerical checks of the theory questions: every derived formula against a simulation or a real module.

Labels follow the homework (theory_hw): P1 reverse conditional q(x_{t-1} | x_t, x_0) of DDPM, closed form (standard
and score form, and `gm.diffusion`) against a Monte Carlo regression on simulated forward chains. P2 DDIM's
non-Markovian family keeps q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) for any admissible sigma. P3 denoising score
matching for the Ornstein-Uhlenbeck process dX = -X/2 dt + dW with p_0 = N(0, 1): the marginals, the loss at the
optimum per t, the weighting lambda(t) = sigma_t^2, the gap m^2, the singular sampling ODE, and the optimal denoiser
being the true score. P4 multi-head attention with and without output projection (`fm.mha_variants`).
"Gauss 1-D" is the exercise of theory_solutions: 1-D Gaussian data under a variance-exploding forward process,
reverse sampling with only the conditional mean (variance ~ sigma^4), DDPM (~ sigma^2) and DDIM (~ sigma^2).

Everything runs in float64 on the CPU with an explicit `torch.Generator`, so each check is reproducible. A check
returns `Check` rows (derived value, measured value, Monte Carlo standard error) that the notebook tabulates and the
tests assert on. Time indices follow the homework: t = 1..T, `betas[t - 1]` is beta_t, and abar_0 = 1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
from torch import Tensor

from common.config import check
from fm.attention import MultiHeadSelfAttention
from fm.mha_variants import MHA1, MHA2, count_parameters, mha1_from_gpt2_attention, mha1_to_mha2, mha_param_formula

DTYPE = torch.float64


@dataclass
class TheoryConfig:
    """Sizes of the simulations: `n_samples` Monte Carlo draws per check, `reverse_steps` T of "Gauss 1-D"."""

    n_samples: int
    reverse_steps: int
    data_var: float = 0.05  # sigma^2 of the 1-D Gaussian data of "Gauss 1-D" (sigma^2 << 1)
    ddim_steps: int = 50  # length of the alpha sequence of the DDIM family (a DDIM-50 subsequence of DDPM's 1000)
    seed: int = 0

    def __post_init__(self):
        check(self.n_samples >= 1000, f"n_samples must be >= 1000 for meaningful Monte Carlo, got {self.n_samples}")
        check(self.reverse_steps >= 2, f"reverse_steps must be >= 2, got {self.reverse_steps}")
        check(0 < self.data_var < 1, f"data_var must lie in (0, 1), got {self.data_var}")
        check(self.ddim_steps >= 2, f"ddim_steps must be >= 2, got {self.ddim_steps}")


PRESETS = {
    "smoke": {"n_samples": 10_000, "reverse_steps": 200},
    "quick": {"n_samples": 100_000, "reverse_steps": 1000},
    "full": {"n_samples": 1_000_000, "reverse_steps": 5000},
}


@dataclass
class Check:
    """One derived-vs-measured comparison. `stderr`: Monte Carlo standard error of `measured` (None: deterministic);
    `tol`: absolute tolerance of a deterministic comparison (float round-off, discretisation)."""

    problem: str
    quantity: str
    derived: float
    measured: float
    stderr: float | None = None
    tol: float = 1e-9

    @property
    def error(self) -> float:
        return abs(self.measured - self.derived)

    @property
    def z(self) -> float | None:
        """Error in units of the standard error (None for deterministic checks)."""
        return None if not self.stderr else self.error / self.stderr

    def passes(self, z_max: float = 5.0) -> bool:
        """|measured - derived| <= z_max * stderr + tol."""
        return self.error <= z_max * (self.stderr or 0.0) + self.tol

    def row(self) -> dict:
        z = self.z
        return {
            "problem": self.problem,
            "quantity": self.quantity.replace("|", "\\|"),  # a bare | would split the markdown cell
            "derived": self.derived,
            "measured": self.measured,
            "MC std err": "exact" if self.stderr is None else f"{self.stderr:.2g}",
            "error / std err": "-" if z is None else f"{z:.2f}",
            "within 5 s.e. (or tol)": "yes" if self.passes() else "no",
        }


def _single_threaded(fn):
    """Run `fn` with one torch thread: element-wise work on 1e5-long vectors gains nothing from threads, and on a
    shared CPU thread contention made it ~100x slower. The previous thread count is restored afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(n: int, generator: torch.Generator) -> Tensor:
    return torch.randn(n, generator=generator, dtype=DTYPE)


def toy_data(n: int, generator: torch.Generator) -> Tensor:
    """(n,) draws from a bimodal, non-Gaussian p_data (0.5 N(-1, 0.1^2) + 0.5 N(1, 0.1^2)): the DDPM/DDIM results
    hold conditionally on x_0, for any data distribution."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(DTYPE) * 2 - 1
    return signs + 0.1 * _randn(n, generator)


def _mean_se(x: Tensor) -> tuple[float, float]:
    return x.mean().item(), (x.std() / math.sqrt(x.numel())).item()


def _var_se(x: Tensor) -> tuple[float, float]:
    """Sample variance and its standard error sqrt((m4 - var^2) / n), valid for any distribution with a 4th moment."""
    centred = x - x.mean()
    var = centred.pow(2).mean()
    return var.item(), ((centred.pow(4).mean() - var**2).clamp(min=0) / x.numel()).sqrt().item()


def _ols(y: Tensor, features: list[Tensor]) -> tuple[Tensor, Tensor, float, float]:
    """Least squares y ~ features @ coef. Returns (coef, coef std errors, residual variance, its std error)."""
    x = torch.stack(features, dim=1)
    n, p = x.shape
    gram_inv = torch.linalg.inv(x.T @ x)
    coef = gram_inv @ (x.T @ y)
    residual = y - x @ coef
    res_var = residual.pow(2).sum().item() / (n - p)
    res_var_se = _var_se(residual)[1]
    return coef, (res_var * gram_inv.diagonal()).sqrt(), res_var, res_var_se


# ------------------------------------------------------------------------------- P1: reverse conditional of DDPM
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


@_single_threaded
def posterior_form_agreement(betas: Tensor, n: int = 1000, seed: int = 0) -> Check:
    """Largest |score-form mean - standard-form mean| over all t = 1..T on random (x_0, x_t) pairs (exact algebra)."""
    g = _generator(seed)
    x0, xt = _randn(n, g), _randn(n, g)
    worst = 0.0
    for t in range(1, len(betas) + 1):
        c_x0, c_xt, _ = posterior_closed_form(betas, t)
        diff = posterior_mean_via_score(betas, t, x0, xt) - (c_x0 * x0 + c_xt * xt)
        worst = max(worst, diff.abs().max().item())
    return Check("P1", f"max over t=1..{len(betas)}: score-form mean - standard mean", 0.0, worst, tol=1e-10)


@_single_threaded
def posterior_vs_diffusion(betas: Tensor, diffusion, n: int = 1000, seed: int = 0) -> list[Check]:
    """Compare with `gm.diffusion.GaussianDiffusion.q_posterior` (0-based index i = t - 1, float32 buffers):
    largest relative error of the mean and of the variance over all t."""
    g = _generator(seed)
    x0, xt = _randn(n, g), _randn(n, g)
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


@_single_threaded
def reverse_conditional_mc(betas: Tensor, ts: tuple[int, ...], n: int, seed: int = 0) -> list[Check]:
    """Simulate n forward chains x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) eps step by step from x_0 ~ toy_data
    (no closed-form marginal used), then regress x_{t-1} on (x_t, x_0, 1): for a Gaussian conditional the regression
    coefficients are c_xt and c_x0, the intercept 0, and the residual variance beta_tilde."""
    if min(ts) < 2 or max(ts) > len(betas):
        raise ValueError(f"ts must lie in 2..{len(betas)} (beta_tilde_1 = 0 is degenerate), got {ts}")
    g = _generator(seed)
    x0 = toy_data(n, g)
    x, checks = x0, []
    for s in range(1, max(ts) + 1):
        prev, beta = x, betas[s - 1]
        x = (1 - beta).sqrt() * prev + beta.sqrt() * _randn(n, g)
        if s in ts:
            c_x0, c_xt, var = posterior_closed_form(betas, s)
            coef, se, res_var, res_se = _ols(prev, [x, x0, torch.ones_like(x)])
            checks += [
                Check("P1", f"t={s}: coefficient of x_t", c_xt, coef[0].item(), se[0].item()),
                Check("P1", f"t={s}: coefficient of x_0", c_x0, coef[1].item(), se[1].item()),
                Check("P1", f"t={s}: variance beta_tilde", var, res_var, res_se),
            ]
    return checks


# ---------------------------------------------------------------------------------------- P2: DDIM marginals
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


@_single_threaded
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
    g = _generator(seed)
    x0 = toy_data(n, g)
    x = alphas[-1].sqrt() * x0 + (1 - alphas[-1]).sqrt() * _randn(n, g)
    stats = torch.zeros(4, T, dtype=DTYPE)  # rows: mean, mean se, var, var se
    for t in range(T, 0, -1):
        if t < T:
            a_t, a_next, sigma = alphas[t - 1], alphas[t], sigmas[t - 1]
            keep = (1 - a_t) if drop_sigma_term else (1 - a_t - sigma**2).clamp(min=0)
            x = a_t.sqrt() * x0 + keep.sqrt() / (1 - a_next).sqrt() * (x - a_next.sqrt() * x0) + sigma * _randn(n, g)
        z = (x - alphas[t - 1].sqrt() * x0) / (1 - alphas[t - 1]).sqrt()
        stats[:, t - 1] = torch.tensor([*_mean_se(z), *_var_se(z)], dtype=DTYPE)
    return stats[0], stats[1], stats[2], stats[3]


def ddim_marginal_checks(alphas: Tensor, n: int, seed: int = 0) -> tuple[list[Check], dict[str, Tensor]]:
    """For every sigma family: the worst |z-score| over t of mean(z_t) = 0 and of var(z_t) = 1, reported as the
    check at that t; plus the negative control's variance (must fail). Returns (checks, {family: var(z_t) per t})."""
    checks, variances = [], {}
    g = _generator(seed + 1)
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


@_single_threaded
def ddim_sampler_in_family(diffusion, steps: int, n: int = 1000, seed: int = 0) -> list[Check]:
    """`gm.diffusion`'s DDIM sampler is this family: with an oracle eps-model (it returns the true noise of x_t given
    x_0, so x0_hat = x_0), `ddim_step` with eta = 0 must equal the family's mean (sigma = 0), and `ddim_sigma` with
    eta = 1 the family's eta = 1 sigma, on every pair of consecutive DDIM timesteps (float32 buffers)."""
    g = _generator(seed)
    x0 = toy_data(n, g).float()
    seq = diffusion.ddim_timesteps(steps)
    alphas = diffusion.alphas_cumprod.double()[seq]
    sigma_family = ddim_family_sigmas(alphas, SIGMA_FAMILIES[1])
    worst_mean = worst_sigma = 0.0
    for i in range(1, len(seq)):
        t, t_prev = torch.full((n,), int(seq[i])), torch.full((n,), int(seq[i - 1]))
        xt = diffusion.q_sample(x0, t, _randn(n, g).float())
        a_t, a_prev = alphas[i].item(), alphas[i - 1].item()
        oracle = lambda x, _t, _y, a_t=a_t: (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        step = diffusion.ddim_step(oracle, xt, t, t_prev, eta=0.0)
        family_mean = math.sqrt(a_prev) * x0 + math.sqrt((1 - a_prev) / (1 - a_t)) * (xt - math.sqrt(a_t) * x0)
        worst_mean = max(worst_mean, (step - family_mean).abs().max().item())
        sigma = diffusion.ddim_sigma(t[:1], t_prev[:1], 1.0).item()
        worst_sigma = max(worst_sigma, abs(sigma - sigma_family[i - 1].item()))
    return [
        Check("P2", f"gm.diffusion ddim_step (eta=0, oracle) - family mean, max over {len(seq) - 1} steps", 0.0,
              worst_mean, tol=1e-5),
        Check("P2", "gm.diffusion ddim_sigma (eta=1) - family sigma, max (float32)", 0.0, worst_sigma, tol=1e-5),
    ]


# ------------------------------------------------------------ Gauss 1-D: DDPM vs conditional mean only vs DDIM
REVERSE_SAMPLERS = ("mean only", "DDPM, noise var dt", "DDPM, exact posterior var", "DDIM")


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


@_single_threaded
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


@_single_threaded
def simulate_reverse(a: Tensor, v: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Run the reverse recursion on n samples from X_1 ~ N(0, 1). Returns (x_0 samples (n,), Var per k (steps+1,))."""
    g = _generator(seed)
    x = _randn(n, g)
    var = torch.empty(len(a) + 1, dtype=DTYPE)
    var[-1] = x.var()
    for k in range(len(a) - 1, -1, -1):
        x = a[k] * x + (v[k].sqrt() * _randn(n, g) if v[k] > 0 else 0.0)
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
        var, var_se = _var_se(x0)
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


# ------------------------------------------------------------- P3: Ornstein-Uhlenbeck denoising score matching
def ou_gamma_sigma(t: Tensor) -> tuple[Tensor, Tensor]:
    """X_t | X_0 ~ N(gamma_t X_0, sigma_t^2): gamma_t = exp(-t/2), sigma_t = sqrt(1 - exp(-t))."""
    return torch.exp(-t / 2), (-torch.expm1(-t)).sqrt()


@_single_threaded
def ou_marginal_mc(ts: tuple[float, ...], n: int, dt: float = 2e-3, seed: int = 0) -> list[Check]:
    """(a): Euler-Maruyama simulation of dX = -X/2 dt + dW from X_0 ~ N(0, 1) (closed forms not used): at each t the
    variance of X_t stays 1, and regressing X_t on X_0 gives slope gamma_t and residual variance sigma_t^2.
    The discretisation bias (~ dt/4 in the variance) is far below the Monte Carlo error for dt = 2e-3."""
    g = _generator(seed)
    x0 = _randn(n, g)
    x, now, checks = x0, 0.0, []
    for t in sorted(ts):
        while now < t - 1e-12:
            h = min(dt, t - now)
            x = x - 0.5 * x * h + math.sqrt(h) * _randn(n, g)
            now += h
        gamma, sigma = ou_gamma_sigma(torch.tensor(t, dtype=DTYPE))
        var, var_se = _var_se(x)
        coef, se, res_var, res_se = _ols(x, [x0])
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
    x0, eps = _randn(t.numel(), generator), _randn(t.numel(), generator)
    xt = gamma * x0 - sigma * eps
    return xt, eps, eps / sigma, sigma


@_single_threaded
def ou_dsm_at_optimum(ts: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(b, c) per t: E[(s*(X_t) - grad log p_{t|0})^2] with the true score s* = -x. Closed form 1/sigma_t^2 - 1
    (~ 1/t near 0: its integral diverges, so lambda = 1 gives L = inf, while lambda = sigma_t^2 gives exp(-t)).
    Returns (closed form, MC mean, MC std err), each shaped like ts."""
    g = _generator(seed)
    mc, se = torch.empty_like(ts), torch.empty_like(ts)
    for i, t in enumerate(ts):
        xt, _, cond_score, _ = _ou_draw(t.expand(n), g)
        mc[i], se[i] = _mean_se((-xt - cond_score) ** 2)
    _, sigma = ou_gamma_sigma(ts)
    return 1 / sigma**2 - 1, mc, se


@_single_threaded
def ou_loss_at_optimum_checks(T: float, deltas: tuple[float, ...], n: int, seed: int = 0) -> list[Check]:
    """L(theta*) with t ~ U[delta, T]. lambda = 1 gives log((1 - e^{-T}) / (1 - e^{-delta})) / (T - delta), growing
    like log(1/delta) (infinite at delta = 0); lambda = sigma_t^2 with delta = 0 gives (1 - e^{-T}) / T (finite)."""
    g = _generator(seed)
    checks = []
    for delta in deltas:
        t = delta + torch.rand(n, generator=g, dtype=DTYPE) * (T - delta)
        xt, _, cond_score, _ = _ou_draw(t, g)
        derived = math.log(-math.expm1(-T) / -math.expm1(-delta)) / (T - delta)
        checks.append(Check("P3b", f"L(theta*), lambda=1, delta={delta:g}, T={T:g}", derived,
                            *_mean_se((-xt - cond_score) ** 2)))
    t = torch.rand(n, generator=g, dtype=DTYPE) * T
    xt, _, cond_score, sigma = _ou_draw(t, g)
    checks.append(Check("P3c", f"L(theta*), lambda=sigma_t^2, delta=0, T={T:g}", -math.expm1(-T) / T,
                        *_mean_se(sigma**2 * (-xt - cond_score) ** 2)))
    return checks


@_single_threaded
def ou_loss_gap(m: float, T: float, n: int, seed: int = 0) -> Check:
    """(d): lambda = sigma_t^2, delta = 0, s_theta = (m / sigma_t) x + s*(x). L(theta) - L(theta*) = m^2, estimated
    with common random numbers (both losses on the same draws)."""
    g = _generator(seed)
    t = torch.rand(n, generator=g, dtype=DTYPE) * T
    xt, _, cond_score, sigma = _ou_draw(t, g)
    s_star = -xt
    s_theta = m / sigma * xt + s_star
    diff = sigma**2 * ((s_theta - cond_score) ** 2 - (s_star - cond_score) ** 2)
    return Check("P3d", f"L(theta) - L(theta*), m={m:g}", m**2, *_mean_se(diff))


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
        coef, _, _, _ = _ols(err.log(), [log_steps, torch.ones_like(log_steps)])
        checks.append(Check("P3e", f"Euler order of convergence on {span}, m={m:g}", derived, -coef[0].item(),
                            tol=0.05))
    # the ODE is linear, so from X_T ~ N(0, 1) the generated x_0 has variance gain^2 (the data have variance 1)
    euler, exact = ou_ode_log_gain(m, t_end, max(steps))
    checks.append(Check("P3e", f"Var of ODE samples x_0 (true 1), m={m:g}, {max(steps)} Euler steps",
                        math.exp(2 * exact), math.exp(2 * euler), tol=0.01))
    return errors[0], errors[1], checks


@_single_threaded
def ou_optimal_denoiser(ts: tuple[float, ...], n: int, mu0: float = 2.0, s0: float = 0.5, seed: int = 0
                        ) -> list[Check]:
    """The minimiser of the DSM loss at time t is E[grad log p_{t|0}(X_t | X_0) | X_t]; fit it by least squares on
    (x_t, x_t^2, 1) for OU data X_0 ~ N(mu0, s0^2). For Gaussian data it is linear and equals the true score
    grad log p_t(x) = -(x - gamma mu0) / v_t, v_t = gamma^2 s0^2 + sigma^2: slope -1/v_t, intercept gamma mu0 / v_t,
    quadratic coefficient 0."""
    g = _generator(seed)
    checks = []
    for t in ts:
        gamma, sigma = (v.item() for v in ou_gamma_sigma(torch.tensor(t, dtype=DTYPE)))
        x0, eps = mu0 + s0 * _randn(n, g), _randn(n, g)
        xt = gamma * x0 - sigma * eps
        coef, se, _, _ = _ols(eps / sigma, [xt, xt**2, torch.ones_like(xt)])
        v_t = gamma**2 * s0**2 + sigma**2
        checks += [
            Check("P3 denoiser", f"t={t:g}: optimal denoiser slope (-1/v_t)", -1 / v_t, coef[0].item(), se[0].item()),
            Check("P3 denoiser", f"t={t:g}: optimal denoiser x^2 coefficient", 0.0, coef[1].item(), se[1].item()),
            Check("P3 denoiser", f"t={t:g}: optimal denoiser intercept (gamma mu0/v_t)", gamma * mu0 / v_t,
                  coef[2].item(), se[2].item()),
        ]
    return checks


# ------------------------------------------------------------------------------ P4: MHA with / without W^O
@_single_threaded
def mha_checks(d_model: int = 512, d_head: int = 64, seed: int = 0) -> list[Check]:
    """MHA1 == MHA2 after W^V_h <- W^V_h W^O_h (cross-attention with unequal widths, causal self-attention, and the
    package's GPT-2 attention block), the rank of the mapped value maps (<= d_head), and parameter counts of real
    modules with d_v = d_out = d_q = d_k = `d_model`, d_attn = d_head, H = d_model / d_head against the formula."""
    torch.manual_seed(seed)
    checks = []
    mha1 = MHA1(d_q=24, d_k=20, d_v=16, d_attn=8, d_head=4, d_out=12, n_heads=3).double()
    mha2 = mha1_to_mha2(mha1)
    q, k, v = (torch.randn(2, length, width, dtype=DTYPE) for length, width in ((5, 24), (7, 20), (7, 16)))
    with torch.no_grad():
        diff = (mha1(q, k, v) - mha2(q, k, v)).abs().max().item()
    checks.append(Check("P4 MHA", "max |MHA1 - MHA2|, cross-attention, d_q,d_k,d_v,d_out = 24,20,16,12", 0.0, diff))

    n_heads = d_model // d_head
    gpt2 = MultiHeadSelfAttention(d_model, n_heads, block_size=16, bias=False).double().eval()
    mha1 = mha1_from_gpt2_attention(gpt2)
    mha2 = mha1_to_mha2(mha1)
    x = torch.randn(2, 16, d_model, dtype=DTYPE)
    with torch.no_grad():
        reference = gpt2(x)[0]
        checks += [
            Check("P4 MHA", f"max |fm.attention block - MHA1|, causal, d={d_model}", 0.0,
                  (reference - mha1(x, x, x, causal=True)).abs().max().item()),
            Check("P4 MHA", f"max |fm.attention block - MHA2 (mapped)|, causal, d={d_model}", 0.0,
                  (reference - mha2(x, x, x, causal=True)).abs().max().item()),
        ]
    rank = max(int(torch.linalg.matrix_rank(w)) for w in mha2.w_v.detach())
    checks.append(Check("P4 MHA", f"max rank of mapped W^V_h ({d_model}x{d_model}), bound d_head", d_head, rank))

    dims = {"d_q": d_model, "d_k": d_model, "d_v": d_model, "d_attn": d_head, "d_out": d_model, "n_heads": n_heads}
    formula = mha_param_formula(d_head=d_head, **dims)
    counts = {"MHA1": count_parameters(MHA1(d_head=d_head, **dims)), "MHA2": count_parameters(MHA2(**dims))}
    counts["MHA2 - MHA1"] = counts["MHA2"] - counts["MHA1"]
    label = f"d_v=d_out={d_model}, d_head=d_attn={d_head}, H={n_heads}"
    checks += [Check("P4 MHA", f"parameters {name}, {label}", formula[name], counts[name]) for name in counts]
    checks.append(Check("P4 MHA", "parameters fm.attention block (bias=False) = MHA1", formula["MHA1"],
                        count_parameters(gpt2)))
    return checks


# ------------------------------------------------------------------------------------------------------- figures
def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gaussian_reverse(result: GaussianReverseResult, sigma2: float, path, title: str) -> None:
    """Left: histograms of x_0 per sampler against the data density N(0, sigma2). Right: Var(x_t) along the reverse
    pass divided by the forward marginal sigma2 + t (simulated solid, exact recursion dashed)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
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
    _save(fig, path)


def plot_dsm(ts: Tensor, closed: Tensor, mc: Tensor, se: Tensor, steps: tuple[int, ...], err_singular: Tensor,
             err_smooth: Tensor, t_start: float, path, title: str) -> None:
    """Left: DSM loss at the optimum per t for lambda = 1 and lambda = sigma_t^2 (closed form lines, MC points).
    Right: Euler error of the reverse ODE on [0, T] (singular) and [t_start, T] against the number of steps."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
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
    _save(fig, path)


def plot_ddim_marginals(variances: dict[str, Tensor], path, title: str) -> None:
    """Var of the standardised z_t = (X_t - sqrt(a_t) X_0) / sqrt(1 - a_t) per t for each sigma family."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, var in variances.items():
        ax.plot(torch.arange(1, len(var) + 1), var, marker="o", markersize=2, label=name)
    ax.axhline(1.0, color="k", linestyle=":", linewidth=0.8)
    ax.set(xlabel="t (DDIM index)", ylabel="Var(z_t)", yscale="log", title=title)
    ax.legend(fontsize=7)
    _save(fig, path)
