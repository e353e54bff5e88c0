"""Parameter counts of a module."""

from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in `module`'s parameters (only those with requires_grad if `trainable_only`).

    Tied weights count once, since `module.parameters()` yields each tensor once.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
