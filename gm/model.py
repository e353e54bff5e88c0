"""Convolutional VAE (encoder, decoder) and a PatchGAN discriminator for 32x32 (or 28x28) images.

The VAE is fully convolutional: each level after the first halves the resolution, so with the default
`ch_mult=(1, 2, 2)` a 32x32 image maps to a `z_channels x 8 x 8` latent grid (28x28 -> 7x7).
"""

from __future__ import annotations

import torch
from torch import nn

from gm.layers import group_norm


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 projection on the skip path when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * z_channels, H / 2^(L-1), W / 2^(L-1)): mean and log-variance stacked."""

    def __init__(self, in_channels: int, z_channels: int, num_channels: int, ch_mult: tuple[int, ...],
                 num_res_blocks: int):
        super().__init__()
        widths = [num_channels * m for m in ch_mult]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        prev = widths[0]
        for level, width in enumerate(widths):
            if level > 0:
                layers.append(nn.Conv2d(prev, prev, 3, stride=2, padding=1))  # downsample by 2
            for _ in range(num_res_blocks):
                layers.append(ResBlock(prev, width))
                prev = width
        layers += [group_norm(prev), nn.SiLU(), nn.Conv2d(prev, 2 * z_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h * 2^(L-1), w * 2^(L-1)) logits (the VAE applies the sigmoid)."""

    def __init__(self, out_channels: int, z_channels: int, num_channels: int, ch_mult: tuple[int, ...],
                 num_res_blocks: int):
        super().__init__()
        widths = [num_channels * m for m in reversed(ch_mult)]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, widths[0], 3, padding=1)]
        prev = widths[0]
        for level, width in enumerate(widths):
            if level > 0:  # nearest upsampling + conv avoids the checkerboard of transposed convs
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(prev, prev, 3, padding=1)]
            for _ in range(num_res_blocks):
                layers.append(ResBlock(prev, width))
                prev = width
        layers += [group_norm(prev), nn.SiLU(), nn.Conv2d(prev, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VAE(nn.Module):
    """Gaussian-latent VAE. `encode(x) -> (mean, logvar)`, each (B, z_channels, H/4, W/4) with the default
    `ch_mult`; `decode(z)` returns images in (0, 1) (a sigmoid on the decoder's logits, so no clamping is needed);
    `forward(x) -> (recon, mean, logvar)` with a reparameterized sample in training mode and the mean in eval mode.
    Inputs are images in [0, 1]."""

    def __init__(self, in_channels: int, z_channels: int = 3, num_channels: int = 32,
                 ch_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1):
        super().__init__()
        if in_channels <= 0 or z_channels <= 0 or num_channels <= 0 or not ch_mult or num_res_blocks <= 0:
            raise ValueError(f"invalid VAE sizes: in_channels={in_channels}, z_channels={z_channels}, "
                             f"num_channels={num_channels}, ch_mult={ch_mult}, num_res_blocks={num_res_blocks}")
        self.in_channels, self.z_channels = in_channels, z_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(in_channels, z_channels, num_channels, tuple(ch_mult), num_res_blocks)
        self.decoder = Decoder(in_channels, z_channels, num_channels, tuple(ch_mult), num_res_blocks)
        # Fast path: channels-last conv weights (the first conv converts its NCHW input), ~1.3x faster training
        # steps and ~1.6x faster decoding on CPU; the outputs are made NCHW-contiguous again, so that the tensors
        # a caller (or a student's loss) sees are laid out as usual. Same numbers up to float rounding (tested).
        self.to(memory_format=torch.channels_last)

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        """Shapes only: a value check (NaN/Inf) would be a host sync in every training step; the data are checked
        once where they enter (`gm.ldm.encode_images`; the training images are uint8)."""
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1], H and W divisible by `downsample` -> mean, logvar (B, z_channels, H/d, W/d)."""
        self._check(x, self.in_channels, "VAE input")
        if x.shape[-2] % self.downsample or x.shape[-1] % self.downsample:
            raise ValueError(f"VAE input height and width must be divisible by {self.downsample}, "
                             f"got {tuple(x.shape[-2:])}")
        mean, logvar = self.encoder(x * 2 - 1).contiguous().chunk(2, dim=1)  # the network sees inputs centred on 0
        return mean, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite early in training

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mean + sigma * eps with sigma = exp(logvar / 2) and eps ~ N(0, I) (`torch.randn_like(mean)`): a sample
        of N(mean, sigma^2) whose gradient flows to mean and logvar. mean, logvar (B, z_channels, h, w) -> z, same."""
        ### BEGIN SOLUTION
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        ### END SOLUTION

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_channels, h, w) -> images (B, C, h*d, w*d) in (0, 1)."""
        self._check(z, self.z_channels, "VAE latent")
        return torch.sigmoid(self.decoder(z)).contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encode(x)
        z = self.reparameterize(mean, logvar) if self.training else mean
        return self.decode(z), mean, logvar

    @torch.no_grad()
    def sample(self, n: int, latent_hw: tuple[int, int] = (8, 8), generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Decode n draws from the prior N(0, I): images (n, C, h*d, w*d) in (0, 1)."""
        device = next(self.parameters()).device
        z = torch.randn((n, self.z_channels, *latent_hw), generator=generator, device=device)
        return self.decode(z)


class Discriminator(nn.Module):
    """PatchGAN: a stack of stride-2 4x4 convs, then two stride-1 4x4 convs, giving one real/fake logit per
    overlapping patch. 32x32 input with `num_layers=2` -> (B, 1, 6, 6) logits, each seeing a 34x34 patch
    (`receptive_field`; with padding 1 the patches of the border logits reach past the image).
    GroupNorm instead of the original BatchNorm, so D behaves the same for any batch size and in eval mode."""

    def __init__(self, in_channels: int, num_channels: int = 64, num_layers: int = 2):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"Discriminator needs num_layers >= 1, got {num_layers}")
        self.in_channels = in_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, num_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = num_channels
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            out = num_channels * min(2**i, 8)
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1), group_norm(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.to(memory_format=torch.channels_last)  # fast path, as in the VAE (~1.5x on CPU); NCHW logits out

    def receptive_field(self) -> int:
        """Side of the input patch one logit sees, from the convs: r <- (r - 1) * stride + kernel, output first."""
        r = 1
        for conv in reversed([m for m in self.net if isinstance(m, nn.Conv2d)]):
            r = (r - 1) * conv.stride[0] + conv.kernel_size[0]
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1] -> per-patch logits (B, 1, h, w)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Discriminator input must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.net(x * 2 - 1).contiguous()
