"""Losses of the VAE and the VAE+GAN: Gaussian KL to the prior, MSE reconstruction, hinge GAN losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)) in nats, summed over all non-batch dims: (B, ...) -> (B,).

    Per dimension it is 0.5 * (mean^2 + var - log var - 1), derived in report section 2.1.
    """
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must have the same shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}")
    ### BEGIN SOLUTION
    per_dim = 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1.0)
    return per_dim.flatten(1).sum(dim=1)
    ### END SOLUTION


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all pixels and channels (a scalar)."""
    if recon.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(recon.shape)} and target {tuple(target.shape)} differ in shape")
    return F.mse_loss(recon, target)


def d_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - real)) + mean(relu(1 + fake)), means over all (patch) logits.

    real_logits, fake_logits: D's logits on real and generated images, any shape (e.g. (B, 1, h, w)) -> a scalar.
    """
    ### BEGIN SOLUTION
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    ### END SOLUTION


def g_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean(fake logits); the generator pushes D's logits on its images up.

    fake_logits: D's logits on generated images, any shape (e.g. (B, 1, h, w)) -> a scalar.
    """
    ### BEGIN SOLUTION
    return -fake_logits.mean()
    ### END SOLUTION
