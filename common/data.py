"""Deterministic batching: the batch of a step depends only on (seed, step), so a resumed run sees the same data."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def batch_indices(n: int, batch_size: int, step: int, seed: int = 0) -> torch.Tensor:
    """Indices of the batch at `step`: epoch-wise random permutations of range(n), last partial batch dropped."""
    if batch_size <= 0 or n < batch_size:
        raise ValueError(f"need 0 < batch_size <= number of examples, got batch_size={batch_size}, n={n}")
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return _permutation(n, seed, epoch)[i * batch_size : (i + 1) * batch_size]
