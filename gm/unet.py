"""A small class-conditional UNet denoiser for latent grids (e.g. 3 x 8 x 8 VAE latents).

Time and label embeddings are summed into one conditioning vector that every residual block adds to its
features. Label index `num_classes` is the null label ("no class") used for classifier-free guidance: training
replaces labels with it at random, sampling mixes the two predictions. The output conv starts at zero, so the
untrained model predicts 0 (the mean of the noise) and the first loss is exactly E[eps^2] = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gm.layers import group_norm


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): cos and sin of t at geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()], dim=1)
    return F.pad(emb, (0, dim % 2))



class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning vector added in between; 1x1 skip when channels change."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.block1 = nn.Sequential(group_norm(in_channels), nn.SiLU(),
                                    nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.block2 = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.block1(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.block2(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the positions of a (small) feature map, residual."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """eps_theta(x_t, t, y): (B, in_channels, H, W), (B,) timesteps, (B,) labels or None -> (B, out_channels, H, W).

    Levels: `channel_mults` (one per resolution, halving between them, so H and W must be divisible by
    2 ** (len(channel_mults) - 1)), `num_res_blocks` residual blocks per level, self-attention at the lowest
    resolution. y = None (or the null label `num_classes`) means unconditional; num_classes = 0 builds an
    unconditional model.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        num_classes: int = 10,
        dropout: float = 0.0,
        attention: bool = True,
        num_heads: int = 4,
    ):
        super().__init__()
        if in_channels <= 0 or base_channels <= 0 or not channel_mults or num_res_blocks <= 0 or num_classes < 0:
            raise ValueError(f"invalid UNet sizes: in_channels={in_channels}, base_channels={base_channels}, "
                             f"channel_mults={channel_mults}, num_res_blocks={num_res_blocks}, "
                             f"num_classes={num_classes}")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.num_classes = num_classes
        self.downsample = 2 ** (len(channel_mults) - 1)
        emb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None  # +1: the null label

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mults]
        self.down_blocks, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        skip_channels, ch = [base_channels], base_channels
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, width, emb_dim, dropout))
                ch = width
                skip_channels.append(ch)
            self.down_blocks.append(blocks)
            last = level == len(widths) - 1
            self.downsamplers.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                skip_channels.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = SelfAttention(ch, num_heads) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)

        self.up_blocks, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):  # one more than on the way down: also eats the downsampler's skip
                blocks.append(ResBlock(ch + skip_channels.pop(), width, emb_dim, dropout))
                ch = width
            self.up_blocks.append(blocks)
            self.upsamplers.append(nn.Identity() if level == 0 else
                                   nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                 nn.Conv2d(ch, ch, 3, padding=1)))
        self.output = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)
        # Fast path: channels-last conv weights (the input conv converts NCHW latents), ~1.2x faster training steps
        # and ~1.3x faster sampling on CPU; the output is NCHW-contiguous again (same numbers up to rounding, tested).
        self.to(memory_format=torch.channels_last)

    def check_labels(self, y: Tensor) -> None:
        """Raise unless every label lies in [0, num_classes] (num_classes = the null label). Call it once per run
        on the data or per sampling call: `forward` does not read label values (that would be a host sync every
        step); an out-of-range label fails there in the embedding lookup."""
        if y.numel() and (y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}] ({self.num_classes} = null label), "
                             f"got [{int(y.min())}, {int(y.max())}]")

    def _conditioning(self, t: Tensor, y: Tensor | None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.label_emb is None:
            if y is not None:
                raise ValueError("this UNet is unconditional (num_classes=0) but got labels y")
            return emb
        if y is None:
            y = torch.full_like(t, self.num_classes)
        return emb + self.label_emb(y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet input must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.downsample or x.shape[-1] % self.downsample:
            raise ValueError(f"UNet input height and width must be divisible by {self.downsample}, "
                             f"got {tuple(x.shape[-2:])}")
        if t.shape != (x.shape[0],) or (y is not None and y.shape != t.shape):
            raise ValueError(f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and "
                             f"{None if y is None else tuple(y.shape)}")
        emb = self._conditioning(t, y)
        h = self.input_conv(x)
        skips = [h]
        for blocks, down in zip(self.down_blocks, self.downsamplers, strict=True):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks, up in zip(self.up_blocks, self.upsamplers, strict=True):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = up(h)
        return self.output(h).contiguous()
