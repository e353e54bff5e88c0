"""Graded tests of task 2.1, the VAE's KL divergence (gm/loss.py) and reparameterization (gm/model.py)."""

import torch

from gm.loss import kl_divergence, reconstruction_loss
from gm.model import VAE


def test_kl_matches_torch_distributions_and_sums_the_non_batch_dims():
    mean, logvar = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    kl = kl_divergence(mean, logvar)
    assert kl.shape == (4,), "kl_divergence returns one value per example, (B,)"
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-4)


def test_kl_is_zero_only_at_the_prior():
    assert torch.equal(kl_divergence(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))
    assert (kl_divergence(torch.full((3, 4), 0.1), torch.zeros(3, 4)) > 0).all()
    assert (kl_divergence(torch.zeros(3, 4), torch.full((3, 4), -0.5)) > 0).all()


def test_kl_matches_monte_carlo():
    mean, logvar = torch.randn(1, 6) * 0.8, torch.randn(1, 6) * 0.7
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn(200_000, 6)
    monte_carlo = (torch.distributions.Normal(mean, std).log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z))
    closed = kl_divergence(mean, logvar)
    assert abs(closed.item() - monte_carlo.sum(1).mean().item()) / closed.item() < 0.02


def test_reparameterize_samples_the_posterior():
    mean = torch.tensor([[-1.0, 0.0, 2.0]]).expand(100_000, 3)
    logvar = torch.tensor([[0.0, -2.0, 1.0]]).expand(100_000, 3)
    z = VAE.reparameterize(mean, logvar)
    assert z.shape == mean.shape
    torch.testing.assert_close(z.mean(0), mean[0], atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(0), torch.exp(0.5 * logvar[0]), atol=0.03, rtol=0.02)


def test_reparameterize_passes_gradients_to_mean_and_logvar():
    mean = torch.randn(5, 4, requires_grad=True)
    logvar = torch.randn(5, 4, requires_grad=True)
    torch.manual_seed(1)
    z = VAE.reparameterize(mean, logvar)
    z.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones(5, 4))
    eps = (z - mean) / torch.exp(0.5 * logvar)  # the noise that was drawn
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps.detach())
    assert not torch.equal(VAE.reparameterize(mean, logvar), VAE.reparameterize(mean, logvar)), "draw fresh noise"


def test_a_few_vae_steps_lower_the_elbo_loss():
    vae = VAE(1, num_channels=8)
    x = (torch.rand(8, 1, 16, 16) < 0.2).float()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)

    def loss_fn():
        recon, mean, logvar = vae.train()(x)
        return reconstruction_loss(recon, x) + 1e-3 * kl_divergence(mean, logvar).mean()

    first = loss_fn().item()
    for _ in range(20):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.7 * first
