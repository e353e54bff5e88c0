"""The channels-last fast path of the VAE, the discriminator and the UNet: the same numbers as the NCHW layout
(forward and gradients, up to float rounding), and outputs laid out as on the NCHW path, so a caller's `.view`
keeps working."""

import torch
from torch import nn

from gm.model import VAE, Discriminator
from gm.unet import UNet


def nchw_twin(model: nn.Module) -> nn.Module:
    """The same weights in the ordinary (contiguous NCHW) layout: the readable path the fast path must equal."""
    twin = type(model).__new__(type(model))
    twin.__dict__ = {**model.__dict__}
    twin.__dict__["_modules"] = {k: nchw_twin(m) for k, m in model._modules.items()}
    twin.__dict__["_parameters"] = {k: None if p is None else nn.Parameter(p.detach().contiguous().clone())
                                    for k, p in model._parameters.items()}
    twin.__dict__["_buffers"] = {k: None if b is None else b.contiguous().clone() for k, b in model._buffers.items()}
    return twin


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def check_fast_path(model: nn.Module, *inputs: torch.Tensor) -> None:
    """Every conv weight of `model` is channels-last, its twin's are not; outputs and gradients agree."""
    twin = nchw_twin(model)
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
               for w in conv_weights(model) if w.shape[-1] > 1)
    assert all(w.is_contiguous() for w in conv_weights(twin))
    fast, slow = model(*inputs), twin(*inputs)
    fast, slow = (fast, slow) if isinstance(fast, tuple) else ((fast,), (slow,))
    for a, b in zip(fast, slow, strict=True):
        assert a.is_contiguous() == b.is_contiguous()  # as on the NCHW path: a caller's `.view` works as before
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    sum(a.square().sum() for a in fast).backward()
    sum(b.square().sum() for b in slow).backward()
    scale = max(q.grad.abs().max().item() for q in twin.parameters())  # gradients that are ~0 differ by rounding
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5 * scale)


def test_vae_fast_path_equals_nchw():
    torch.manual_seed(0)
    check_fast_path(VAE(3, num_channels=8).eval(), torch.rand(4, 3, 32, 32))


def test_discriminator_fast_path_equals_nchw():
    torch.manual_seed(0)
    check_fast_path(Discriminator(3, num_channels=8), torch.rand(4, 3, 32, 32))


def test_unet_fast_path_equals_nchw():
    torch.manual_seed(0)
    model = UNet(3, base_channels=16)
    nn.init.normal_(model.output[-1].weight, std=0.02)  # zero-initialised: give the last conv a say
    check_fast_path(model, torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10]))
