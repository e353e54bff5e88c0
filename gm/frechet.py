"""Frechet distance between two feature sets (the FID recipe on the evaluation classifier's features), with a
bootstrap confidence interval.

Each set is summarised by its Gaussian statistics (`GaussianStats`: mean, covariance and the covariance's symmetric
square root); `FrechetReference` keeps a reference set's statistics, computed once, for many comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from common.checks import Interval
from common.config import check


# Symmetric eigendecompositions with numpy's LAPACK: torch's runs every small step of the eigensolver as an OpenMP
# region, which with OMP_WAIT_POLICY=PASSIVE makes a 192 x 192 one ~7x slower (20 ms vs 3 ms).
def _sqrt_psd(cov: Tensor) -> Tensor:
    """Symmetric square root of a (D, D) positive semi-definite float64 matrix (negative rounding-error eigenvalues
    clamped to 0)."""
    evals, evecs = (torch.from_numpy(a) for a in np.linalg.eigh(cov.cpu().numpy()))
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


class GaussianStats(NamedTuple):
    """Mean (D,), covariance (D, D) and its symmetric square root of one feature set, in float64."""

    mean: Tensor
    cov: Tensor
    cov_sqrt: Tensor

    @classmethod
    def of(cls, features: Tensor) -> GaussianStats:
        f = features.double().cpu()
        cov = torch.cov(f.T)
        return cls(f.mean(0), cov, _sqrt_psd(cov))


def _frechet(ref: GaussianStats, mean: Tensor, cov: Tensor) -> float:
    """The Frechet distance of `frechet_distance_from_stats`, with the first Gaussian's square root given."""
    product = (ref.cov_sqrt @ cov @ ref.cov_sqrt).cpu().numpy()  # symmetric PSD, its eigenvalues real and >= 0
    cross = torch.from_numpy(np.linalg.eigvalsh(product)).clamp(min=0).sqrt()
    return ((ref.mean - mean).pow(2).sum() + ref.cov.trace() + cov.trace() - 2 * cross.sum()).item()


def frechet_distance_from_stats(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^{1/2} C2 C1^{1/2})^{1/2}): the squared 2-Wasserstein distance between
    N(mu1, C1) and N(mu2, C2), computed with symmetric eigendecompositions in float64."""
    mu1, cov1, mu2, cov2 = (a.double().cpu() for a in (mu1, cov1, mu2, cov2))
    return _frechet(GaussianStats(mu1, cov1, _sqrt_psd(cov1)), mu2, cov2)


@dataclass(frozen=True)
class FrechetReference:
    """A reference feature set that many feature sets are compared with (real test images): its Gaussian
    statistics and those of `resamples` bootstrap resamples of it (drawn with `seed`), each computed once, so a
    comparison costs only the other set's covariance and one eigendecomposition per resample."""

    features: Tensor  # (N, D) float64
    stats: GaussianStats
    resampled: tuple[GaussianStats, ...]

    @classmethod
    def of(cls, features: Tensor, resamples: int = 200, seed: int = 0) -> FrechetReference:
        check(features.ndim == 2 and len(features) >= 2,
              f"need an (N, D) reference feature set with N >= 2, got {tuple(features.shape)}")
        check(resamples >= 10, f"need resamples >= 10, got {resamples}")
        gen = torch.Generator().manual_seed(seed)
        f = features.double().cpu()
        resampled = tuple(GaussianStats.of(f[torch.randint(len(f), (len(f),), generator=gen)])
                          for _ in range(resamples))
        return cls(f, GaussianStats.of(f), resampled)

    def __len__(self) -> int:
        return len(self.features)


def _check_features(features1: Tensor, features2: Tensor) -> None:
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"need two (N, D) feature sets with the same D, got {tuple(features1.shape)} "
                         f"and {tuple(features2.shape)}")
    if min(len(features1), len(features2)) < 2:
        raise ValueError("each feature set needs at least 2 rows to estimate a covariance")


def frechet_distance(features1: Tensor, features2: Tensor | FrechetReference) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (N may differ; both need N >= 2);
    `features2` may be a `FrechetReference` (its statistics are reused)."""
    ref = features2 if isinstance(features2, FrechetReference) else None
    _check_features(features1, ref.features if ref else features2)
    f1 = features1.double().cpu()
    return _frechet(ref.stats if ref else GaussianStats.of(features2), f1.mean(0), torch.cov(f1.T))


def bootstrap_frechet_interval(features1: Tensor, features2: Tensor | FrechetReference, resamples: int = 200,
                               seed: int = 0, level: float = 0.95) -> Interval:
    """Basic (reflected) bootstrap interval of `frechet_distance(features1, features2)`: both (N, D) sets are
    resampled with replacement (each set is a random sample: the generated images and the real reference images),
    and the quantiles q of the resampled distances give [2 d - q_hi, 2 d - q_lo], clamped at 0. A
    `FrechetReference` brings its own resamples (then `resamples` must equal their number); a tensor is resampled
    with `seed + 1`, `features1` with `seed`.

    The plug-in distance d is biased upwards (two samples of one distribution are at distance > 0), and resampling
    with replacement duplicates images and inflates it further, so the percentile interval [q_lo, q_hi] can lie
    wholly above d. The basic interval reflects that shift back: it estimates where the population distance is, and
    near zero it may lie below d."""
    check(resamples >= 10 and 0 < level < 1, f"need resamples >= 10 and level in (0, 1), got {resamples}, {level}")
    given = isinstance(features2, FrechetReference)
    _check_features(features1, features2.features if given else features2)
    if given:
        check(len(features2.resampled) == resamples, f"the reference holds {len(features2.resampled)} resamples, "
              f"asked for {resamples}; build it with FrechetReference.of(features, resamples={resamples})")
    ref = features2 if given else FrechetReference.of(features2, resamples, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    f1 = features1.double().cpu()
    values = []
    for stats in ref.resampled:
        f = f1[torch.randint(len(f1), (len(f1),), generator=gen)]
        values.append(_frechet(stats, f.mean(0), torch.cov(f.T)))
    values = torch.tensor(values)
    q_lo, q_hi = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=values.dtype)).tolist()
    estimate = frechet_distance(f1, ref)
    return Interval(max(0.0, 2 * estimate - q_hi), max(0.0, 2 * estimate - q_lo))
