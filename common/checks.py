"""Derived-vs-measured checks of the theory problems, and the small statistics they are measured with.

A theory module returns `Check` rows (derived value, measured value, Monte Carlo standard error) that the notebook
tabulates and the tests assert on. Simulations run in float64 (`DTYPE`) on the CPU with an explicit
`torch.Generator` (`seeded_generator`), so every check is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

DTYPE = torch.float64
Z_95 = 1.959964  # two-sided 95 % quantile of the standard normal


@dataclass
class Check:
    """One derived-vs-measured comparison. `stderr`: Monte Carlo standard error of `measured` (None: deterministic);
    `tol`: absolute tolerance of a deterministic comparison (float round-off, discretisation)."""

    problem: str
    quantity: str
    derived: float
    measured: float
    stderr: float | None = None
    tol: float = 1e-9

    @property
    def error(self) -> float:
        return abs(self.measured - self.derived)

    @property
    def z(self) -> float | None:
        """Error in units of the standard error (None for deterministic checks)."""
        return None if not self.stderr else self.error / self.stderr

    def passes(self, z_max: float = 5.0) -> bool:
        """|measured - derived| <= z_max * stderr + tol."""
        return self.error <= z_max * (self.stderr or 0.0) + self.tol

    def row(self) -> dict:
        z = self.z
        return {
            "problem": self.problem,
            "quantity": self.quantity.replace("|", "\\|"),  # a bare | would split the markdown cell
            "derived": self.derived,
            "measured": self.measured,
            "MC std err": "exact" if self.stderr is None else f"{self.stderr:.2g}",
            "error / std err": "-" if z is None else f"{z:.2f}",
            "within 5 s.e. (or tol)": "yes" if self.passes() else "no",
        }


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`: each check draws from its own stream."""
    return torch.Generator().manual_seed(seed)


def randn(n: int, gen: torch.Generator) -> Tensor:
    """(n,) float64 standard normal draws from `gen`."""
    return torch.randn(n, generator=gen, dtype=DTYPE)


def mean_and_se(x: Tensor) -> tuple[float, float]:
    """Sample mean of a 1-D tensor and its standard error std / sqrt(n)."""
    return x.mean().item(), (x.std() / math.sqrt(x.numel())).item()


def var_and_se(x: Tensor) -> tuple[float, float]:
    """Sample variance and its standard error sqrt((m4 - var^2) / n), valid for any distribution with a 4th moment."""
    centred = x - x.mean()
    var = centred.pow(2).mean()
    return var.item(), ((centred.pow(4).mean() - var**2).clamp(min=0) / x.numel()).sqrt().item()


def ols(y: Tensor, features: list[Tensor]) -> tuple[Tensor, Tensor, float, float]:
    """Least squares y (n,) ~ stack(features) (n, p) @ coef. Returns (coef (p,), coef std errors (p,), residual
    variance, its std error)."""
    x = torch.stack(features, dim=1)
    n, p = x.shape
    gram_inv = torch.linalg.inv(x.T @ x)
    coef = gram_inv @ (x.T @ y)
    residual = y - x @ coef
    res_var = residual.pow(2).sum().item() / (n - p)
    return coef, (res_var * gram_inv.diagonal()).sqrt(), res_var, var_and_se(residual)[1]


class Interval(NamedTuple):
    """A confidence interval (95 % unless said otherwise); prints as [lo, hi] in tables and is a JSON list."""

    lo: float
    hi: float

    def __str__(self) -> str:
        return f"[{self.lo:.4g}, {self.hi:.4g}]"


def mean_ci(values: Sequence[float] | Tensor, z: float = Z_95) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and its normal-approximation confidence interval mean +- z * s / sqrt(n).

    `s` is the sample standard deviation (n - 1 in the denominator); the default z gives 95 %. Needs n >= 2.
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {x.numel()}")
    mean, se = mean_and_se(x)
    return mean, mean - z * se, mean + z * se


def wilson_interval(successes: int, n: int, z: float = Z_95) -> Interval:
    """Wilson score interval (lo, hi) of a binomial proportion successes / n (95 % for the default z); unlike the
    normal approximation it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need n > 0 and 0 <= successes <= n, got successes={successes}, n={n}")
    p = successes / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    # at 0 or n successes the bound is exactly 0 or 1 (the formula reaches it only up to round-off)
    return Interval(0.0 if successes == 0 else centre - half, 1.0 if successes == n else centre + half)
