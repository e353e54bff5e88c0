"""Measuring a trained VAE (tasks 2.1, 2.2): reconstruction error, PSNR, KL and the negative ELBO with confidence
intervals, sharpness and a perceptual (judge-feature) distance with confidence intervals, the figure panels, zoomed
crops, and smoothed training curves."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.checks import mean_ci
from common.logging import column, trailing_mean
from gm.data import eval_images
from gm.eval import cached_features
from gm.loss import kl_divergence
from gm.model import VAE


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Sharpness of each of (N, C, H, W) images in [0, 1]: the mean over pixels and channels of the gradient
    magnitude sqrt(dx^2 + dy^2), with dx, dy the differences to the right and lower neighbour (intensity per
    pixel): (N,). Blur lowers it; noise and hallucinated texture raise it."""
    dx = images[..., :-1, 1:] - images[..., :-1, :-1]
    dy = images[..., 1:, :-1] - images[..., :-1, :-1]
    return (dx.pow(2) + dy.pow(2)).sqrt().flatten(1).mean(dim=1)


def feature_distance(judge: nn.Module, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Perceptual distance of reconstructions to their originals, (N, C, H, W) each: 1 - cosine similarity of the
    judge classifier's penultimate features (`judge.features`, e.g. `gm.eval.Classifier`), (N,) in [0, 2]. A
    stand-in for LPIPS (whose weights cannot be downloaded here): it compares what a network trained to recognise
    the images sees, not pixels."""
    return 1 - F.cosine_similarity(judge.features(recon), cached_features(judge, images), dim=1)


@torch.no_grad()
def evaluate(vae: VAE, dataset: str, num_images: int | None = None, batch_size: int = 500,
             seed: int = 0, judge: nn.Module | None = None, per_image: bool = False) -> dict:
    """Test-set metrics of a VAE on n = `num_images` test images (all if None; `gm.data.eval_images`), 32x32 as
    trained.

    Per image, then averaged over the n images (each `*_ci95` is the half-width of a normal 95 % interval):
    - `recon_error`: squared error summed over pixels and channels, decoded from the posterior mean (the training
      loss's convention, `reconstruction_loss`; what the figures show);
    - `psnr_db`: 10 log10(1 / per-pixel MSE) of that reconstruction (pixels in [0, 1]);
    - `kl_nats`: KL(q(z|x) || N(0, I));
    - `neg_elbo_nats`: -ELBO = E_q[-log p(x|z)] + KL under the Gaussian decoder p(x|z) = N(decode(z), 1/2 I) that
      kl_weight = 1 trains, i.e. sum of squared errors + (D / 2) log(pi), with one posterior sample z; a density
      of continuous pixel values in [0, 1] (D = C * 32 * 32 values), so it is not comparable to discrete-data
      likelihoods; `neg_elbo_bpd` = neg_elbo_nats / (D ln 2);
    - `sharpness`: mean gradient magnitude of the reconstructions (`sharpness`), with `sharpness_ci95`;
      `sharpness_ratio`: that over the inputs' (1 = as sharp as the data);
    - with a `judge` classifier: `feature_dist`, the perceptual distance of each reconstruction to its original
      (`feature_distance`), with `feature_dist_ci95`.

    per_image: also return the per-image values (tensors of n) under "per_image" (for paired comparisons).
    """
    device = next(vae.parameters()).device
    images = eval_images(dataset, num_images, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = vae.training
    vae.eval()
    keys = ("recon_error", "psnr_db", "kl_nats", "neg_elbo_nats", "sharpness") + (("feature_dist",) if judge else ())
    values: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    sharp_input = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        mean, logvar = vae.encode(x)
        recon = vae.decode(mean)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=device)
        sq_err = (recon - x).pow(2).flatten(1)
        kl = kl_divergence(mean, logvar)
        values["recon_error"].append(sq_err.sum(1))
        values["psnr_db"].append(-10 * torch.log10(sq_err.mean(1).clamp(min=1e-10)))
        values["kl_nats"].append(kl)
        sample_err = (vae.decode(z) - x).pow(2).flatten(1).sum(1)
        values["neg_elbo_nats"].append(sample_err + 0.5 * x[0].numel() * math.log(math.pi) + kl)
        values["sharpness"].append(sharpness(recon))
        sharp_input += sharpness(x).sum().item()
        if judge is not None:
            values["feature_dist"].append(feature_distance(judge, recon, x))
    vae.train(was_training)
    n, dims = len(images), images[0].numel()
    out: dict = {"n": n}
    per = {key: torch.cat(chunks).cpu() for key, chunks in values.items()}
    for key, v in per.items():
        mean_value, _, high = mean_ci(v)
        out[key], out[f"{key}_ci95"] = mean_value, high - mean_value  # the half-width
    out["neg_elbo_bpd"] = out["neg_elbo_nats"] / (dims * math.log(2))
    out["sharpness_ratio"] = out["sharpness"] * n / sharp_input
    if per_image:
        out["per_image"] = per
    return out


@torch.no_grad()
def figure_panels(vae: VAE, dataset: str, num_images: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """{"inputs", "reconstructions", "prior samples"}: (num_images, C, 32, 32) each, for `save_labeled_grids`."""
    device = next(vae.parameters()).device
    x = eval_images(dataset, num_images, device)
    mean, _ = vae.encode(x)
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = vae.sample(num_images, latent_hw=tuple(mean.shape[-2:]), generator=generator)
    return {"inputs": x.cpu(), "reconstructions": vae.decode(mean).cpu(), "prior samples": samples.cpu()}


def zoomed_crops(images: torch.Tensor, size: int = 12, scale: int = 4, top_left: tuple[int, int] = (10, 10)
                 ) -> torch.Tensor:
    """(N, C, size * scale, size * scale): the size x size crop at `top_left` (row, column) of each of (N, C, H, W)
    images, enlarged `scale` times with nearest-neighbour pixels, so single pixels (blur, GAN texture) are visible."""
    r, c = top_left
    return F.interpolate(images[..., r : r + size, c : c + size], scale_factor=scale, mode="nearest")


def curve(rows: list[dict], key: str, window: int = 1) -> tuple[list[float], list[float]]:
    """(steps, values) of metric `key` in log rows, smoothed by a trailing mean over `window` points."""
    steps, values = column(rows, key)
    if not steps:
        raise ValueError(f"no metric {key!r} in the rows; available: {sorted({k for r in rows for k in r})}")
    return steps, trailing_mean(values, window)
