"""Losses of the VAE and the VAE+GAN: Gaussian KL to the prior, squared-error reconstruction, hinge GAN losses,
and taming's adaptive weight of the GAN term.

Convention (the ELBO's): the reconstruction term is summed over pixels and channels per image and the KL over
latent dimensions per image, both averaged over the batch. With kl_weight = 1 the loss is then the negative ELBO
of a Gaussian decoder N(recon, 1/2 I), up to the constant (D / 2) log(pi) for D pixel values.
"""

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
    """Squared error summed over pixels and channels of each image, averaged over the batch: (B, ...) x 2 -> scalar.

    This is -log N(target; recon, 1/2 I) per image minus its constant (D / 2) log(pi), so with the KL summed per
    image, `reconstruction_loss + kl` is the negative ELBO (up to that constant) and kl_weight = 1 the standard VAE.
    """
    if recon.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(recon.shape)} and target {tuple(target.shape)} differ in shape")
    return (recon - target).pow(2).flatten(1).sum(dim=1).mean()


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


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """taming's adaptive weight ||d rec_loss / d W|| / (||d g_loss / d W|| + 1e-4), clamped to [0, max_weight] and
    detached, with W the decoder's last-layer weight: it scales the GAN term so that its gradient at the output
    layer is as large as the reconstruction's, whatever their units. Scalars and a parameter -> a 0-d tensor.
    Both losses keep their graphs (retain_graph), since the caller backpropagates their weighted sum afterwards.
    """
    if not last_layer.requires_grad:
        raise ValueError("adaptive_gan_weight needs the last layer's weight to require grad (is the decoder frozen?)")
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
