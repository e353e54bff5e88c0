"""Losses of the VAE and the VAE+GAN: Gaussian KL to the prior, squared-error reconstruction, hinge GAN losses,
taming's adaptive weight of the GAN term, and `VAEGANLoss`, which composes them into the two steps' losses.

Convention (the ELBO's): the reconstruction term is summed over pixels and channels per image and the KL over
latent dimensions per image, both averaged over the batch. With kl_weight = 1 the loss is then the negative ELBO
of a Gaussian decoder N(recon, 1/2 I), up to the constant (D / 2) log(pi) for D pixel values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GAN_MODES = ("fixed", "adaptive")


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
                        max_weight: float = 1e4, reduce_grad: Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> torch.Tensor:
    """taming's adaptive weight ||d rec_loss / d W|| / (||d g_loss / d W|| + 1e-4), clamped to [0, max_weight] and
    detached, with W the decoder's last-layer weight: it scales the GAN term so that its gradient at the output
    layer is as large as the reconstruction's, whatever their units. Scalars and a parameter -> a 0-d tensor.
    Both losses keep their graphs (retain_graph), since the caller backpropagates their weighted sum afterwards.

    `reduce_grad` maps each of the two gradients before the norms: under DDP `common.dist.average_`, so that every
    rank computes the weight of the global batch from its shard's gradients (DDP does not reduce these).
    """
    if not last_layer.requires_grad:
        raise ValueError("adaptive_gan_weight needs the last layer's weight to require grad (is the decoder frozen?)")
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if reduce_grad is not None:
        rec_grad, g_grad = reduce_grad(rec_grad), reduce_grad(g_grad)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


Log = dict[str, torch.Tensor]


@dataclass
class VAEGANLoss:
    """The VAE+GAN objective, as taming's `VQLPIPSWithDiscriminator` (its `forward` with optimizer_idx 0 and 1):

    - `generator(...)`, the VAE's loss: reconstruction_loss + kl_weight * KL [+ gan_weight * d * G-hinge(D(recon))
      from step `gan_start` on (taming's `disc_start`), with d = 1 ("fixed") or `adaptive_gan_weight` ("adaptive")];
    - `discriminator(...)`, D's hinge loss on real images vs detached reconstructions.

    Each returns `(loss, log)`, the log holding the detached terms by name. Losses are computed in float32 whatever
    the autocast dtype of the networks. `reduce_grad`: see `adaptive_gan_weight` (None in one process).
    """

    kl_weight: float
    gan_weight: float = 0.0
    gan_mode: str = "fixed"
    gan_start: int = 0
    reduce_grad: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.gan_mode not in GAN_MODES:
            raise ValueError(f"gan_mode must be one of {GAN_MODES}, got {self.gan_mode!r}")
        if min(self.kl_weight, self.gan_weight, self.gan_start) < 0:
            raise ValueError("kl_weight, gan_weight and gan_start must be >= 0")

    def gan_on(self, step: int) -> bool:
        """Whether step `step` has the GAN term (and trains the discriminator)."""
        return self.gan_weight > 0 and step >= self.gan_start

    def generator(self, x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, step: int,
                  disc: nn.Module | None = None, last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, Log]:
        """The VAE's loss on images x and their reconstructions recon (B, C, H, W), posterior mean and logvar
        (B, z, h, w). `disc` (needed when `gan_on(step)`) is run with its parameters frozen, so the generator step
        leaves no gradient in D; `last_layer` is the decoder's output weight (adaptive mode).
        Log: recon_loss, kl[, g_loss, d_weight], loss."""
        rec = reconstruction_loss(recon.float(), x)
        kl = kl_divergence(mean.float(), logvar.float()).mean()
        loss = rec + self.kl_weight * kl
        log = {"recon_loss": rec.detach(), "kl": kl.detach()}
        if self.gan_on(step):
            if disc is None or (self.gan_mode == "adaptive" and last_layer is None):
                raise ValueError(f"step {step} has the GAN term: pass disc (and last_layer in adaptive mode)")
            disc.requires_grad_(False)
            g_loss = g_hinge_loss(disc(recon).float())
            disc.requires_grad_(True)
            if self.gan_mode == "fixed":
                d_weight = torch.ones((), device=loss.device)
            else:
                d_weight = adaptive_gan_weight(rec, g_loss, last_layer, reduce_grad=self.reduce_grad)
            loss = loss + self.gan_weight * d_weight * g_loss
            log |= {"g_loss": g_loss.detach(), "d_weight": d_weight}
        log["loss"] = loss.detach()
        return loss, log

    def discriminator(self, x: torch.Tensor, recon: torch.Tensor, disc: nn.Module) -> tuple[torch.Tensor, Log]:
        """D's hinge loss on real images x vs the detached reconstructions (B, C, H, W). Log: d_loss, logits_real,
        logits_fake (mean logits)."""
        real_logits, fake_logits = disc(x).float(), disc(recon.detach()).float()
        d_loss = d_hinge_loss(real_logits, fake_logits)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": real_logits.mean().detach(),
                        "logits_fake": fake_logits.mean().detach()}
