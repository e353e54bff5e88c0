"""Distances between two feature sets on the evaluation classifier's features: the Frechet distance (the FID
recipe, a biased plug-in estimate) and the kernel distance (the KID recipe, unbiased, with a confidence interval).

Each set is summarised by its Gaussian statistics (`GaussianStats`: mean, covariance and the covariance's symmetric
square root); `FrechetReference` keeps a reference set's statistics, computed once, for many comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from common.checks import Interval, mean_ci
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
    statistics, computed once, so a comparison costs only the other set's covariance and one eigendecomposition."""

    features: Tensor  # (N, D) float64
    stats: GaussianStats

    @classmethod
    def of(cls, features: Tensor) -> FrechetReference:
        check(features.ndim == 2 and len(features) >= 2,
              f"need an (N, D) reference feature set with N >= 2, got {tuple(features.shape)}")
        f = features.double().cpu()
        return cls(f, GaussianStats.of(f))

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
    `features2` may be a `FrechetReference` (its statistics are reused). A plug-in estimate, biased upwards: two
    samples of one distribution are at a distance > 0 that shrinks with N, so only distances with equal N compare."""
    ref = features2 if isinstance(features2, FrechetReference) else None
    _check_features(features1, ref.features if ref else features2)
    f1 = features1.double().cpu()
    return _frechet(ref.stats if ref else GaussianStats.of(features2), f1.mean(0), torch.cov(f1.T))


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 of (n, D) and (m, D) float64 sets (n, m >= 2) with KID's cubic polynomial kernel
    k(a, b) = (a . b / D + 1)^3 (Binkowski et al. 2018)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()).item()


def kernel_distance(features1: Tensor, features2: Tensor | FrechetReference, blocks: int = 10,
                    seed: int = 0) -> tuple[float, Interval]:
    """Kernel distance (KID, Binkowski et al. 2018) between two (N, D) feature sets, with a 95 % confidence interval.

    Both sets are shuffled (with `seed`) and split into `blocks` disjoint blocks; block b of one set is compared with
    block b of the other by the unbiased MMD^2 with the cubic polynomial kernel. KID is the mean of the block values
    and its interval the normal interval of that mean (`mean_ci`), so it always contains the estimate. Unlike the
    Frechet distance, each block value is unbiased: two samples of one distribution score 0 on average (a block
    value can be negative), so KIDs measured with different N compare."""
    ref = features2.features if isinstance(features2, FrechetReference) else features2
    _check_features(features1, ref)
    check(blocks >= 2 and min(len(features1), len(ref)) >= 2 * blocks,
          f"need blocks >= 2 and at least 2 rows per block, got {blocks} blocks of {len(features1)} and {len(ref)}")
    gen = torch.Generator().manual_seed(seed)
    x, y = (f.double().cpu()[torch.randperm(len(f), generator=gen)] for f in (features1, ref))
    values = [mmd2_unbiased(a, b) for a, b in zip(x.tensor_split(blocks), y.tensor_split(blocks), strict=True)]
    mean, lo, hi = mean_ci(values)
    return mean, Interval(lo, hi)
