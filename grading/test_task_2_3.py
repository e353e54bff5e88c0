"""Graded tests of task 2.3, Gaussian diffusion (gm/diffusion.py): the forward process, the posterior, the loss and
the DDPM and DDIM reverse steps. The schedule is recomputed here in float64 from the DDPM betas."""

import math

import pytest
import torch

from gm.diffusion import GaussianDiffusion

T = 1000
BETAS = torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)
ABAR = torch.cumprod(1 - BETAS, 0)
DATA_MEAN, DATA_STD = 2.0, 0.5


def _abar(t: int) -> float:
    return 1.0 if t < 0 else ABAR[t].item()


def optimal_eps(diffusion: GaussianDiffusion):
    """E[eps | x_t] for 1-D data x0 ~ N(DATA_MEAN, DATA_STD^2): the exact minimiser of the eps-prediction MSE."""

    def model(xt, t, y=None):
        abar = diffusion.alphas_cumprod[t].reshape(-1, 1).double()
        var_t = abar * DATA_STD**2 + 1 - abar
        return ((1 - abar).sqrt() * (xt.double() - abar.sqrt() * DATA_MEAN) / var_t).to(xt.dtype)

    return model


def test_q_sample_with_given_noise():
    diffusion = GaussianDiffusion()
    x0, noise = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    t = torch.tensor([0, 10, 500, 999])
    expected = torch.stack([math.sqrt(_abar(s)) * x0[i] + math.sqrt(1 - _abar(s)) * noise[i]
                            for i, s in enumerate(t.tolist())])
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), expected)
    torch.testing.assert_close(diffusion.q_sample(x0, 500, noise), math.sqrt(_abar(500)) * x0
                               + math.sqrt(1 - _abar(500)) * noise)


def test_q_sample_draws_the_noise_when_none_is_given():
    diffusion = GaussianDiffusion()
    x0 = torch.full((200_000, 1), 1.5)
    for t in (0, 100, 999):
        xt = diffusion.q_sample(x0, t)
        assert xt.mean().item() == pytest.approx(math.sqrt(_abar(t)) * 1.5, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - _abar(t), rel=0.02, abs=1e-5)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_q_posterior_matches_bayes_rule(t):
    """p(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), on a fine 1-D grid."""
    diffusion = GaussianDiffusion()
    beta, abar, abar_prev = BETAS[t].item(), _abar(t), _abar(t - 1)
    x0 = 0.7
    xt = math.sqrt(abar) * x0 + 0.8 * math.sqrt(1 - abar)
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


def test_q_posterior_at_t0_returns_x0():
    diffusion = GaussianDiffusion()
    x0, xt = torch.randn(4, 3), torch.randn(4, 3)
    mean, var, log_var = diffusion.q_posterior(x0, xt, 0)
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0) and torch.isfinite(log_var).all()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_p_losses_is_the_mse_to_the_target(prediction):
    diffusion = GaussianDiffusion(timesteps=100, prediction=prediction)
    x0, noise = torch.randn(8, 2, 4, 4), torch.randn(8, 2, 4, 4)
    t = torch.randint(0, 100, (8,))
    seen = {}

    def model(x, t_in, y):
        seen["x"], seen["t"], seen["y"] = x, t_in, y
        return 0.5 * x

    y = torch.arange(8)
    loss = diffusion.p_losses(model, x0, t, y, noise=noise)
    xt = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(seen["x"], xt)
    assert torch.equal(seen["t"], t) and torch.equal(seen["y"], y), "the model gets (x_t, t, y)"
    target = noise if prediction == "eps" else diffusion.target(x0, noise, t)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, ((0.5 * xt - target) ** 2).mean())


@pytest.mark.parametrize("t", [1, 500, 999])
def test_ddpm_step_samples_the_posterior(t):
    diffusion = GaussianDiffusion()
    xt, eps = torch.randn(5, 4), torch.randn(5, 4)
    beta, abar, abar_prev = BETAS[t].item(), _abar(t), _abar(t - 1)
    x0_hat = (xt - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    mean = (beta * math.sqrt(abar_prev) * x0_hat + math.sqrt(1 - beta) * (1 - abar_prev) * xt) / (1 - abar)
    std = math.sqrt(beta * (1 - abar_prev) / (1 - abar))
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    out = diffusion.step(eps, t, t - 1, xt, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.prev_sample, mean + std * z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pred_x0, x0_hat, rtol=1e-4, atol=1e-5)


def test_ddpm_step_at_t0_adds_no_noise():
    diffusion = GaussianDiffusion()
    xt, eps = torch.randn(5, 4), torch.randn(5, 4)
    out = diffusion.step(eps, 0, -1, xt, eta=1.0, generator=torch.Generator().manual_seed(3))
    x0_hat = (xt - math.sqrt(1 - _abar(0)) * eps) / math.sqrt(_abar(0))
    torch.testing.assert_close(out.prev_sample, x0_hat, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t, t_prev", [(999, 899), (500, 0), (40, -1)])
def test_ddim_step_is_deterministic_at_eta0(t, t_prev):
    diffusion = GaussianDiffusion()
    xt, eps = torch.randn(5, 4), torch.randn(5, 4)
    abar, abar_prev = _abar(t), _abar(t_prev)
    x0_hat = (xt - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    expected = math.sqrt(abar_prev) * x0_hat + math.sqrt(1 - abar_prev) * eps
    runs = [diffusion.step(eps, t, t_prev, xt, eta=0.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    torch.testing.assert_close(runs[0].prev_sample, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(runs[0].prev_sample, runs[1].prev_sample)


def test_ddim_step_with_noise():
    diffusion = GaussianDiffusion()
    t, t_prev, eta = 600, 400, 0.7
    xt, eps = torch.randn(5, 4), torch.randn(5, 4)
    abar, abar_prev = _abar(t), _abar(t_prev)
    x0_hat = (xt - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))
    expected = math.sqrt(abar_prev) * x0_hat + math.sqrt(1 - abar_prev - sigma**2) * eps + sigma * z
    out = diffusion.step(eps, t, t_prev, xt, eta=eta, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 100)])
def test_samplers_with_the_exact_model_recover_gaussian_data(sampler, steps):
    diffusion = GaussianDiffusion()
    x = diffusion.sample(optimal_eps(diffusion), (20_000, 1), sampler=sampler, steps=steps, progress=False,
                         generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(DATA_MEAN, abs=0.02)
    assert x.std().item() == pytest.approx(DATA_STD, rel=0.03)
