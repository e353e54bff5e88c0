"""Graded tests of task 2.2, the hinge GAN losses (gm/loss.py)."""

import pytest
import torch

from gm.loss import d_hinge_loss, g_hinge_loss
from gm.model import Discriminator


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])  # relu(1 - real) = [0, 0.5, 2, 0] -> mean 0.625
    fake = torch.tensor([-2.0, 0.0, 0.5, -0.5])  # relu(1 + fake) = [0, 1, 1.5, 0.5] -> mean 0.75
    assert d_hinge_loss(real, fake).item() == pytest.approx(1.375)
    assert g_hinge_loss(fake).item() == pytest.approx(0.5)  # -mean(fake)


def test_hinge_losses_average_over_every_patch_logit():
    patches = torch.tensor([[[[3.0, -3.0], [0.0, 1.0]]]])  # (B, 1, h, w) PatchGAN logits
    assert d_hinge_loss(patches, -patches).item() == pytest.approx((0 + 4 + 1 + 0) / 4 * 2)
    assert g_hinge_loss(patches).item() == pytest.approx(-0.25)
    assert d_hinge_loss(patches, -patches).dim() == g_hinge_loss(patches).dim() == 0


def test_hinge_gradients_vanish_beyond_the_margin():
    real = torch.tensor([2.0, 0.5], requires_grad=True)
    fake = torch.tensor([-2.0, 0.5], requires_grad=True)
    d_hinge_loss(real, fake).backward()
    torch.testing.assert_close(real.grad, torch.tensor([0.0, -0.5]))  # only logits inside the margin get pushed
    torch.testing.assert_close(fake.grad, torch.tensor([0.0, 0.5]))
    fake.grad = None
    g_hinge_loss(fake).backward()
    torch.testing.assert_close(fake.grad, torch.tensor([-0.5, -0.5]))


def test_discriminator_learns_to_separate_with_the_hinge_loss():
    disc = Discriminator(1, num_channels=8)
    real, fake = torch.rand(8, 1, 32, 32).round(), torch.full((8, 1, 32, 32), 0.5)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    first = d_hinge_loss(disc(real), disc(fake)).item()
    for _ in range(15):
        loss = d_hinge_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert d_hinge_loss(disc(real), disc(fake)).item() < 0.5 * first
    assert g_hinge_loss(disc(fake)).item() > g_hinge_loss(disc(real)).item()
