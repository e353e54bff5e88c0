"""Building blocks shared by the VAE, the discriminator and the UNet."""

from __future__ import annotations

import math

from torch import nn


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with gcd(max_groups, channels) groups: up to `max_groups`, and a divisor of any width (12 -> 4)."""
    if channels <= 0:
        raise ValueError(f"group_norm needs a positive number of channels, got {channels}")
    return nn.GroupNorm(math.gcd(max_groups, channels), channels)
