"""GaussianDiffusion: forward moments, the posterior against Bayes' rule, the scheduler step against its formulas
(float64, written out here), DDIM identities, exact Gaussian recovery, guidance."""

import math

import pytest
import torch

from gm.diffusion import GaussianDiffusion, beta_schedule, guided_output, limit_x0
from gm.sampler import SamplerSpec, sample

DATA_MEAN, DATA_STD = 2.0, 0.5


def optimal_eps(diffusion: GaussianDiffusion):
    """E[eps | x_t] for 1-D data x0 ~ N(DATA_MEAN, DATA_STD^2): the exact minimiser of the eps-prediction MSE."""

    def model(xt, t, y=None):
        abar = diffusion.alphas_cumprod[t].reshape(-1, 1).double()
        var_t = abar * DATA_STD**2 + 1 - abar  # Var(x_t)
        return ((1 - abar).sqrt() * (xt.double() - abar.sqrt() * DATA_MEAN) / var_t).to(xt.dtype)

    return model


def optimal_v(diffusion: GaussianDiffusion):
    """The optimal v-model, from the optimal eps-model: v = sqrt(abar) eps - sqrt(1 - abar) x0_hat(eps)."""
    eps_model = optimal_eps(diffusion)

    def model(xt, t, y=None):
        eps = eps_model(xt, t)
        a = diffusion.sqrt_alphas_cumprod[t].reshape(-1, 1)
        s = diffusion.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1)
        return a * eps - s * (xt - s * eps) / a

    return model


def test_q_sample_moments():
    diffusion = GaussianDiffusion()
    x0 = torch.full((200_000, 1), 1.5)
    torch.manual_seed(0)
    for t in (0, 100, 500, 999):
        xt = diffusion.q_sample(x0, t)
        abar = diffusion.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 1.5, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - abar, rel=0.02, abs=1e-5)


def test_schedules():
    linear = GaussianDiffusion(schedule="linear")
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(2e-2)
    assert linear.alphas_cumprod[-1].item() < 1e-4  # x_T is (almost) pure noise
    cosine = beta_schedule("cosine", 1000)
    abar = torch.cumprod(1 - cosine, 0)
    assert abar[0].item() > 0.9999 and abar[-1].item() < 1e-6
    assert cosine.max().item() <= 0.999 and bool((cosine[1:] >= cosine[:-1]).all())
    with pytest.raises(ValueError, match="unknown schedule"):
        GaussianDiffusion(schedule="quadratic")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="x0")


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_q_posterior_matches_bayes_rule_and_closed_form(t):
    """p(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), evaluated on a fine 1-D grid."""
    diffusion = GaussianDiffusion()
    betas = beta_schedule("linear", 1000)  # float64: 1 - abar at small t cancels too much in float32
    abars = torch.cumprod(1 - betas, 0)
    beta, abar, abar_prev = betas[t].item(), abars[t].item(), abars[t - 1].item()
    x0 = 0.7
    xt = math.sqrt(abar) * x0 + 0.8 * math.sqrt(1 - abar)  # a typical x_t for this x0
    mean, var, log_var = diffusion.q_posterior(torch.tensor([[x0]]), torch.tensor([[xt]]), t)
    prior_mean, prior_var = math.sqrt(abar_prev) * x0, 1 - abar_prev
    width = 12 * math.sqrt(prior_var)
    grid = torch.linspace(prior_mean - width, prior_mean + width, 400_001, dtype=torch.float64)
    log_p = -((grid - prior_mean) ** 2) / (2 * prior_var) - (xt - math.sqrt(1 - beta) * grid) ** 2 / (2 * beta)
    weights = torch.softmax(log_p, 0)
    bayes_mean = (weights * grid).sum().item()
    bayes_var = (weights * (grid - bayes_mean) ** 2).sum().item()
    assert mean.item() == pytest.approx(bayes_mean, rel=1e-4, abs=1e-5)
    assert var.item() == pytest.approx(bayes_var, rel=1e-3)
    assert log_var.exp().item() == pytest.approx(var.item(), rel=1e-5)
    # The homework's form: mu = (x_t + beta grad log p_{t|0}(x_t | x0)) / sqrt(1 - beta), without beta ≈ 0.
    score = -(xt - math.sqrt(abar) * x0) / (1 - abar)
    assert mean.item() == pytest.approx((xt + beta * score) / math.sqrt(1 - beta), rel=1e-4, abs=1e-5)
    assert var.item() == pytest.approx((1 - abar_prev) / (1 - abar) * beta, rel=1e-4)


def test_q_posterior_at_t0_returns_x0():
    diffusion = GaussianDiffusion()
    x0, xt = torch.randn(4, 3), torch.randn(4, 3)
    mean, var, _ = diffusion.q_posterior(x0, xt, 0)
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0)


def test_p_losses_is_mse_to_target_and_validates_input():
    diffusion = GaussianDiffusion(timesteps=100)
    x0, noise = torch.randn(8, 2, 4, 4), torch.randn(8, 2, 4, 4)
    t = torch.randint(0, 100, (8,))
    model = lambda x, t, y: 0.5 * x  # noqa: E731
    expected = ((0.5 * diffusion.q_sample(x0, t, noise) - noise) ** 2).mean()
    torch.testing.assert_close(diffusion.p_losses(model, x0, t, noise=noise), expected)
    with pytest.raises(ValueError, match="timesteps must lie"):
        diffusion.p_losses(model, x0, 100)
    with pytest.raises(IndexError):  # a tensor's values are not read (no host sync per training step)
        diffusion.p_losses(model, x0, torch.full((8,), 100))
    with pytest.raises(ValueError, match="shape"):
        diffusion.p_losses(lambda x, t, y: x[:, :1], x0, t)


def test_v_prediction_round_trip():
    diffusion = GaussianDiffusion(prediction="v")
    x0, noise, t = torch.randn(16, 3), torch.randn(16, 3), torch.randint(0, 1000, (16,))
    xt = diffusion.q_sample(x0, t, noise)
    x0_hat, eps_hat = diffusion.split_prediction(xt, t, diffusion.target(x0, noise, t))
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, noise, atol=1e-4, rtol=1e-4)


def _toy_model(x, t, y):
    """A fixed smooth 'denoiser' whose output depends on x, t and y (y = 10 is the null label)."""
    scale = 1.0 if y is None else (1 + y.float()).reshape(-1, *[1] * (x.ndim - 1)) / 10
    return torch.tanh(x) * scale + 1e-3 * t.float().reshape(-1, *[1] * (x.ndim - 1))


def test_ddim_eta0_is_deterministic_given_start_noise():
    diffusion = GaussianDiffusion(timesteps=200)
    noise = torch.randn(6, 2, 3, 3)
    runs = [diffusion.sample(_toy_model, noise.shape, sampler="ddim", steps=20, eta=0.0, noise=noise, progress=False,
                             generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    stochastic = [diffusion.sample(_toy_model, noise.shape, sampler="ddim", steps=20, eta=1.0, noise=noise,
                                   progress=False, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    assert (stochastic[0] - stochastic[1]).abs().max() > 1e-2


def test_ddim_all_steps_eta1_equals_ddpm_posterior():
    diffusion = GaussianDiffusion()
    t = torch.arange(1, 1000)
    sigma = diffusion.ddim_sigma(t, t - 1, eta=1.0)
    torch.testing.assert_close(sigma**2, diffusion.posterior_variance[1:], rtol=1e-3, atol=1e-9)  # float32 schedule
    assert torch.equal(diffusion.ddim_timesteps(1000), torch.arange(1000))
    # One full step: the DDIM update with eta = 1 has the posterior's mean and variance, so with the same noise
    # draw it lands on the same x_{t-1} as the ancestral update (which `step` takes for eta = 1, t_prev = t - 1).
    xt = torch.randn(5, 4)
    for t in (999, 500, 1):
        tb = torch.full((5,), t)
        x0_hat, eps_hat = diffusion.split_prediction(xt, tb, _toy_model(xt, tb, None))
        ddpm = diffusion.ddpm_update(x0_hat, xt, tb, generator=torch.Generator().manual_seed(3))
        ddim = diffusion.ddim_update(x0_hat, eps_hat, tb, tb - 1, 1.0, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)
        gen = torch.Generator().manual_seed(3)
        step = diffusion.step(_toy_model(xt, tb, None), t, t - 1, xt, eta=1.0, generator=gen)
        assert torch.equal(step.prev_sample, ddpm) and torch.equal(step.pred_x0, x0_hat)


def reference_schedule() -> tuple[torch.Tensor, torch.Tensor]:
    """(betas, abar) of the default 1000-step linear schedule, float64, indexed by t = 0..999 like GaussianDiffusion."""
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    return betas, torch.cumprod(1 - betas, dim=0)


def reference_eps(x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
    """E[eps | x_t] for N(DATA_MEAN, DATA_STD^2) data on the float64 reference schedule, returned in x's dtype: one
    fixed 'model' for the float32 sampler and the float64 reference, whose samples stay at the data's scale."""
    abar = reference_schedule()[1][t].reshape(-1, *[1] * (x.ndim - 1))
    eps = (1 - abar).sqrt() * (x.double() - abar.sqrt() * DATA_MEAN) / (abar * DATA_STD**2 + 1 - abar)
    return eps.to(x.dtype)


@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_one_ddpm_step_matches_the_formulas(t):
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); x_{t-1} = c1 x0 + c2 x_t + sqrt(beta_tilde_t) z (no z at
    t = 0) with c1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t), c2 = sqrt(1 - beta_t) (1 - abar_{t-1}) / (1 - abar_t),
    beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), abar_{-1} = 1."""
    diffusion = GaussianDiffusion()
    betas, abar = reference_schedule()
    gen = torch.Generator().manual_seed(0)
    xt, eps = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    out = diffusion.step(eps, t, t - 1, xt, eta=1.0, generator=torch.Generator().manual_seed(5))
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(5)).double()
    x, e = xt.double(), eps.double()
    beta, abar_t = betas[t].item(), abar[t].item()
    abar_prev = abar[t - 1].item() if t > 0 else 1.0
    x0 = (x - math.sqrt(1 - abar_t) * e) / math.sqrt(abar_t)
    mean = (beta * math.sqrt(abar_prev) / (1 - abar_t) * x0
            + math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t) * x)
    var = beta * (1 - abar_prev) / (1 - abar_t)
    expected = mean + (math.sqrt(var) * z if t > 0 else 0.0)
    torch.testing.assert_close(out.pred_x0.double(), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prev_sample.double(), expected, rtol=1e-5, atol=1e-5)
    assert (out.prev_sample.double() - mean).abs().max() > (0.1 * math.sqrt(var) if t > 0 else -1)  # noise added


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_50_step_trajectory_matches_the_formulas(eta):
    """sample(ddim, 50 steps) visits t = round(999 k / 49), k = 49..0, and each step is x_prev = sqrt(abar_prev) x0
    + sqrt(1 - abar_prev - sigma^2) eps + sigma z with sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)
    (1 - abar_t / abar_prev)), abar_prev = 1 after t = 0; z is drawn (from the same generator) only when eta > 0."""
    diffusion = GaussianDiffusion()
    _, abar = reference_schedule()
    visited = []

    def model(x, t, y):
        visited.append(t.tolist())
        return reference_eps(x, t)

    x_start = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    out = diffusion.sample(model, x_start.shape, sampler="ddim", steps=50, eta=eta, noise=x_start, progress=False,
                           generator=torch.Generator().manual_seed(1))
    ts = [round(999 * k / 49) for k in range(49, -1, -1)]
    assert [v[0] for v in visited] == ts and all(len(set(v)) == 1 for v in visited)
    assert ts[:3] == [999, 979, 958] and ts[-3:] == [41, 20, 0]

    gen = torch.Generator().manual_seed(1)
    x = x_start.double()
    for t, t_prev in zip(ts, [*ts[1:], -1], strict=True):
        e = reference_eps(x, torch.full((6,), t))
        abar_t = abar[t].item()
        abar_prev = abar[t_prev].item() if t_prev >= 0 else 1.0
        x0 = (x - math.sqrt(1 - abar_t) * e) / math.sqrt(abar_t)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma**2) * e
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen).double()
    torch.testing.assert_close(out.double(), x, rtol=1e-5, atol=1e-5)


def test_step_is_pure_and_validates_its_arguments():
    diffusion = GaussianDiffusion(timesteps=100)
    xt, output = torch.randn(3, 2), torch.randn(3, 2)
    first = diffusion.step(output, 50, 30, xt)
    assert torch.equal(first.prev_sample, diffusion.step(output, torch.full((3,), 50), torch.full((3,), 30),
                                                         xt).prev_sample)  # int or (B,) timesteps, no state
    with pytest.raises(ValueError, match="t_prev"):
        diffusion.step(output, 50, 50, xt)
    with pytest.raises(ValueError, match="t_prev"):
        diffusion.step(output, 5, -2, xt)
    with pytest.raises(ValueError, match="timesteps must lie"):
        diffusion.step(output, 100, 99, xt)
    with pytest.raises(ValueError, match="model output shape"):
        diffusion.step(output[:, :1], 50, 30, xt)
    with pytest.raises(ValueError, match="eta"):
        diffusion.step(output, 50, 30, xt, eta=-0.1)
    with pytest.raises(TypeError):
        diffusion.step(output, 50, 30, xt, 0.5)  # eta is keyword-only
    with pytest.raises(TypeError):
        diffusion.sample(_toy_model, (2, 3), None, "ddim")  # sampler options are keyword-only


def test_limit_x0_clips_or_thresholds_by_hand():
    x0 = torch.tensor([[0.5, -4.0, 2.0, 10.0], [1.0, -1.0, 0.5, 2.0]])
    assert torch.equal(limit_x0(x0, 3.0), torch.tensor([[0.5, -3.0, 2.0, 3.0], [1.0, -1.0, 0.5, 2.0]]))
    # threshold 0.75: per row s = max(3, 0.75-quantile of |x0|); row 0: |x0| sorted 0.5, 2, 4, 10 -> quantile
    # 4 + 0.25 (10 - 4) = 5.5, clamp to [-5.5, 5.5] and scale by 3 / 5.5; row 1 stays inside: s = 3, unchanged
    thresholded = limit_x0(x0, 3.0, threshold=0.75)
    assert torch.allclose(thresholded[0], torch.tensor([0.5, -4.0, 2.0, 5.5]) * 3 / 5.5)
    assert torch.equal(thresholded[1], x0[1]) and thresholded.abs().max() <= 3.0


def test_clipped_step_rederives_eps_from_the_clipped_x0():
    diffusion = GaussianDiffusion(timesteps=100)
    xt, output = 3 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), torch.randn(4, 2)
    t, t_prev = torch.full((4,), 90), torch.full((4,), 60)
    free = diffusion.step(output, t, t_prev, xt)
    assert torch.allclose(diffusion.step(output, t, t_prev, xt, clip_x0=1e9).prev_sample, free.prev_sample, atol=1e-5)
    clipped = diffusion.step(output, t, t_prev, xt, clip_x0=1.0)
    x0 = free.pred_x0.clamp(-1, 1)
    a, s = diffusion.sqrt_alphas_cumprod[90], diffusion.sqrt_one_minus_alphas_cumprod[90]
    eps = (xt - a * x0) / s
    assert torch.equal(clipped.pred_x0, x0) and free.pred_x0.abs().max() > 1
    assert torch.allclose(clipped.prev_sample, diffusion.ddim_update(x0, eps, t, t_prev, 0.0), atol=1e-6)
    # the sampler passes the spec's limits to the step; a process without an x0 estimate rejects them
    spec = SamplerSpec(diffusion, 10, clip_x0=0.5, threshold=0.9)
    assert spec.label == "DDIM-10 x0 thr. 0.9" and spec.name == "ddim_10"
    x = sample(lambda x, t, y: torch.zeros_like(x), spec, (8, 3), progress=False,
               generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 0.5 + 1e-5  # eps = 0 model: the last step returns the limited x0
    with pytest.raises(ValueError, match="clip_x0"):
        SamplerSpec(diffusion, 10, threshold=0.9)
    with pytest.raises(ValueError, match="quantile"):
        SamplerSpec(diffusion, 10, clip_x0=1.0, threshold=1.5)


@pytest.mark.parametrize(("prediction", "sampler", "steps", "eta"), [
    ("eps", "ddpm", None, 0.0), ("eps", "ddim", 250, 0.0), ("v", "ddim", 250, 0.0),
])
def test_exact_model_recovers_gaussian_data(prediction, sampler, steps, eta):
    """With the exact E[eps | x_t] (or its v), both samplers turn N(0, 1) into N(DATA_MEAN, DATA_STD^2)."""
    diffusion = GaussianDiffusion(prediction=prediction)
    model = optimal_eps(diffusion) if prediction == "eps" else optimal_v(diffusion)
    x = diffusion.sample(model, (20_000, 1), sampler=sampler, steps=steps, eta=eta, progress=False,
                         generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(DATA_MEAN, abs=0.02)
    assert x.std().item() == pytest.approx(DATA_STD, rel=0.02)


def test_few_step_ddim_shrinks_the_variance_and_converges():
    """DDIM is a first-order discretisation: few steps give under-dispersed samples; more steps close the gap."""
    diffusion = GaussianDiffusion()
    model = optimal_eps(diffusion)
    stds = [diffusion.sample(model, (20_000, 1), sampler="ddim", steps=steps, progress=False,
                             generator=torch.Generator().manual_seed(0)).std().item() for steps in (10, 50, 250)]
    assert stds[0] < stds[1] < stds[2] < DATA_STD * 1.01
    assert stds[0] < 0.8 * DATA_STD


def test_guidance():
    x, t, y = torch.randn(4, 3), torch.full((4,), 5), torch.tensor([0, 1, 2, 3])
    cond, uncond = _toy_model(x, t, y), _toy_model(x, t, torch.full_like(y, 10))
    assert torch.equal(guided_output(_toy_model, x, t, y, 1.0, null_label=10), cond)
    torch.testing.assert_close(guided_output(_toy_model, x, t, y, 0.0, null_label=10), uncond)
    torch.testing.assert_close(guided_output(_toy_model, x, t, y, 3.0, null_label=10), uncond + 3 * (cond - uncond))
    with pytest.raises(ValueError, match="null label"):
        guided_output(_toy_model, x, t, y, 2.0)
    # the null label defaults to the model's `num_classes`, as the UNet reserves that index
    class WithClasses:
        num_classes = 10

        def __call__(self, x, t, y):
            return _toy_model(x, t, y)

    torch.testing.assert_close(guided_output(WithClasses(), x, t, y, 3.0), uncond + 3 * (cond - uncond))


def test_sample_rejects_bad_arguments():
    diffusion = GaussianDiffusion(timesteps=10)
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample(_toy_model, (2, 3), sampler="euler")
    with pytest.raises(ValueError, match="DDPM sampler runs all"):
        diffusion.sample(_toy_model, (2, 3), sampler="ddpm", steps=5)
    with pytest.raises(ValueError, match="DDIM steps"):
        diffusion.sample(_toy_model, (2, 3), sampler="ddim", steps=11)
    with pytest.raises(ValueError, match="y must have shape"):
        diffusion.sample(_toy_model, (2, 3), y=torch.zeros(3, dtype=torch.long))
