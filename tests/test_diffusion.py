"""GaussianDiffusion: forward moments, the posterior against Bayes' rule, DDIM identities, exact Gaussian recovery."""

import math

import pytest
import torch

from gm.diffusion import GaussianDiffusion, beta_schedule

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
    # One full step: same mean and variance, so with the same noise draw the same x_{t-1}.
    xt = torch.randn(5, 4)
    for step in (999, 500, 1):
        tb = torch.full((5,), step)
        ddpm = diffusion.p_sample(_toy_model, xt, tb, generator=torch.Generator().manual_seed(3))
        ddim = diffusion.ddim_step(_toy_model, xt, tb, tb - 1, eta=1.0, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)


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
    diffusion = GaussianDiffusion(timesteps=10)
    x, t, y = torch.randn(4, 3), torch.full((4,), 5), torch.tensor([0, 1, 2, 3])
    cond, uncond = _toy_model(x, t, y), _toy_model(x, t, torch.full_like(y, 10))
    assert torch.equal(diffusion.guided(_toy_model, x, t, y, 1.0, null_label=10), cond)
    torch.testing.assert_close(diffusion.guided(_toy_model, x, t, y, 0.0, null_label=10), uncond)
    torch.testing.assert_close(diffusion.guided(_toy_model, x, t, y, 3.0, null_label=10), uncond + 3 * (cond - uncond))
    with pytest.raises(ValueError, match="null label"):
        diffusion.guided(_toy_model, x, t, y, 2.0)


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
