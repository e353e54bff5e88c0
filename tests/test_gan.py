"""VAE + PatchGAN: hinge losses by hand, discriminator shapes, and the two-optimizer training step."""

import math

import pytest
import torch

from gm.loss import VAEGANLoss, adaptive_gan_weight, d_hinge_loss, g_hinge_loss, reconstruction_loss
from gm.model import Discriminator
from gm.vae import base_config, gan_config, load_vae, train_vae, vae_config


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])  # relu(1 - real) = [0, 0.5, 2, 0] -> mean 0.625
    fake = torch.tensor([-2.0, 0.0, 0.5, -0.5])  # relu(1 + fake) = [0, 1, 1.5, 0.5] -> mean 0.75
    assert d_hinge_loss(real, fake).item() == pytest.approx(1.375)
    assert g_hinge_loss(fake).item() == pytest.approx(0.5)  # -mean(fake) = -(-2 + 0 + 0.5 - 0.5) / 4
    patches = torch.tensor([[[[3.0, -3.0], [0.0, 1.0]]]])  # means are over all patch logits
    assert d_hinge_loss(patches, -patches).item() == pytest.approx((0 + 4 + 1 + 0) / 4 * 2)


def test_discriminator_gives_per_patch_logits():
    disc = Discriminator(3, num_channels=8, num_layers=2)
    assert disc(torch.rand(5, 3, 32, 32)).shape == (5, 1, 6, 6)
    assert Discriminator(1, num_channels=8, num_layers=1)(torch.rand(2, 1, 32, 32)).shape == (2, 1, 14, 14)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        disc(torch.rand(1, 1, 32, 32))


def test_discriminator_learns_to_separate():
    torch.manual_seed(0)
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


def test_gan_term_and_discriminator_start_at_gan_loss_start():
    cfg = vae_config("mnist", "smoke", gan_weight=0.1, gan_loss_start=3, steps=5, progress=False)
    run = train_vae(cfg)
    assert run.disc is not None
    assert ["g_loss" in row for row in run.train_rows] == [False, False, False, True, True]
    assert ["d_loss" in row for row in run.train_rows] == [False, False, False, True, True]
    state = torch.load(run.folder / "checkpoint.pt", weights_only=False)
    assert state["optimizers"]["disc"]["state"][0]["step"] == 2  # D stepped only from gan_loss_start on
    assert state["optimizers"]["vae"]["state"][0]["step"] == 5
    row = run.train_rows[-1]  # the VAE loss includes the weighted G term
    assert row["loss"] == pytest.approx(row["recon_loss"] + cfg.kl_weight * row["kl"] + 0.1 * row["g_loss"], rel=1e-4)


def test_no_discriminator_without_gan_weight():
    run = train_vae(vae_config("mnist", "smoke", gan_weight=0.0, steps=2, progress=False))
    assert run.disc is None and all("d_loss" not in row for row in run.train_rows)


@pytest.mark.parametrize("num_layers, expected", [(1, 16), (2, 34), (3, 70)])
def test_receptive_field_is_what_one_logit_sees(num_layers, expected):
    """4x4 kernels with strides 2, ..., 2, 1, 1: 34x34 for the default num_layers=2 (pix2pix's 70x70 for 3)."""
    disc = Discriminator(1, num_channels=4, num_layers=num_layers).double()
    assert disc.receptive_field() == expected
    # GroupNorm mixes all positions, so measure the convolutions' field without it: the input pixels that a central
    # logit's gradient reaches span exactly receptive_field() in each direction.
    disc.net = torch.nn.Sequential(*[torch.nn.Identity() if isinstance(m, torch.nn.GroupNorm) else m for m in disc.net])
    x = torch.rand(1, 1, 160, 160, dtype=torch.float64, requires_grad=True)
    logits = disc(x)
    logits[0, 0, logits.shape[-2] // 2, logits.shape[-1] // 2].backward()
    rows, cols = x.grad[0, 0].abs().sum(1).nonzero(), x.grad[0, 0].abs().sum(0).nonzero()
    assert rows.max() - rows.min() + 1 == expected and cols.max() - cols.min() + 1 == expected


def test_adaptive_weight_by_hand_on_a_tiny_decoder():
    """Decoder recon = w * z (last layer: the scalar weight w), D(recon) = 3 * recon, one pixel per image.

    rec = mean_b (w z_b - x_b)^2 -> d rec / d w = mean_b 2 (w z_b - x_b) z_b; G = -mean_b 3 w z_b -> d G / d w =
    -3 mean_b z_b. With w = 2, z = (1, 2), x = (1, 1): d rec / d w = (2 * 1 * 1 + 2 * 3 * 2) / 2 = 7, d G / d w = -4.5,
    so d = 7 / (4.5 + 1e-4).
    """
    w = torch.tensor([2.0], requires_grad=True)
    z, x = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [1.0]])
    recon = w * z
    rec, g = reconstruction_loss(recon, x), g_hinge_loss(3 * recon)
    d = adaptive_gan_weight(rec, g, w)
    assert d.item() == pytest.approx(7 / (4.5 + 1e-4), rel=1e-6)
    assert not d.requires_grad
    (rec + d * g).backward()  # the graphs survive for the caller's backward
    assert w.grad.item() == pytest.approx(7 - d.item() * 4.5, abs=1e-5)
    v = torch.tensor([1.0], requires_grad=True)  # G's gradient 1e-12, rec's 18: 18 / (1e-12 + 1e-4) is clamped
    assert adaptive_gan_weight((v * 3).pow(2).sum(), 1e-12 * v.sum(), v).item() == 1e4
    with pytest.raises(ValueError, match="require grad"):
        adaptive_gan_weight(rec, g, torch.tensor([1.0]))


def times_three() -> torch.nn.Conv2d:
    """A 1x1-conv discriminator D(x) = 3 x."""
    disc = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        disc.weight.fill_(3.0)
        disc.bias.zero_()
    return disc


def test_vae_gan_loss_by_hand():
    """Two images of two pixels, x = [[1, 1], [0, 0]], recon = [[1.5, 1], [0, -1]]; one latent each, mean = (1, 0),
    logvar = (0, ln 2); D(x) = 3 x.

    rec = mean(0.25, 1) = 0.625; KL = mean(0.5 (1 + 1 - 0 - 1), 0.5 (0 + 2 - ln 2 - 1)) = (0.5 + 0.5 (1 - ln 2)) / 2;
    G = -3 mean(1.5, 1, 0, -1) = -1.125; D-hinge = mean(relu(1 - (3, 3, 0, 0))) + mean(relu(1 + (4.5, 3, 0, -3)))
    = 0.5 + 2.625.
    """
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    recon = torch.tensor([[1.5, 1.0], [0.0, -1.0]]).view(2, 1, 1, 2)
    mean, logvar = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1), torch.tensor([0.0, math.log(2)]).view(2, 1, 1, 1)
    kl = (0.5 + 0.5 * (1 - math.log(2))) / 2
    disc, loss_fn = times_three(), VAEGANLoss(kl_weight=0.1, gan_weight=0.5, gan_start=3)

    loss, log = loss_fn.generator(x, recon, mean, logvar, step=2, disc=disc)  # before gan_start: the VAE alone
    assert loss.item() == pytest.approx(0.625 + 0.1 * kl) and list(log) == ["recon_loss", "kl", "loss"]
    assert log["kl"].item() == pytest.approx(kl) and not loss_fn.gan_on(2)

    recon.requires_grad_(True)
    loss, log = loss_fn.generator(x, recon, mean, logvar, step=3, disc=disc)
    assert list(log) == ["recon_loss", "kl", "g_loss", "d_weight", "loss"]  # the CSV's column order
    assert log["g_loss"].item() == pytest.approx(-1.125) and log["d_weight"].item() == 1.0
    assert loss.item() == pytest.approx(0.625 + 0.1 * kl + 0.5 * -1.125) and log["loss"].item() == loss.item()
    loss.backward()
    assert disc.weight.grad is None and disc.weight.requires_grad  # the generator step leaves D untouched

    d_loss, d_log = loss_fn.discriminator(x, recon, disc)
    assert d_loss.item() == pytest.approx(0.5 + 2.625)
    assert d_log["logits_real"].item() == pytest.approx(1.5) and d_log["logits_fake"].item() == pytest.approx(1.125)
    d_loss.backward()
    assert disc.weight.grad is not None and recon.grad.abs().sum() > 0  # recon.grad: from the generator's backward
    with pytest.raises(ValueError, match="pass disc"):
        loss_fn.generator(x, recon, mean, logvar, step=3)
    with pytest.raises(ValueError, match="gan_mode"):
        VAEGANLoss(kl_weight=0.1, gan_mode="adaptiv")


def test_vae_gan_loss_adaptive_weight_and_its_gradient_hook():
    """recon = w z with the scalar last layer w = 1, z = [[1, 2], [0, 1]], x = [[1, 1], [0, 0]], D(x) = 3 x:
    d rec / d w = mean_b sum 2 (w z - x) z = mean(4, 2) = 3, d G / d w = -3 mean(z) = -3, so d = 3 / (3 + 1e-4).
    `reduce_grad` (under DDP the average over the ranks) maps both gradients before the norms: a stand-in that
    doubles them gives 6 / (6 + 1e-4), and it sees each gradient once."""
    w = torch.tensor([1.0], requires_grad=True)
    z = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).view(2, 1, 1, 2)
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    mean = logvar = torch.zeros(2, 1, 1, 1)
    calls = []

    def double(grad: torch.Tensor) -> torch.Tensor:
        calls.append(grad.clone())
        return grad * 2

    for hook, expected in ((None, 3 / (3 + 1e-4)), (double, 6 / (6 + 1e-4))):
        loss_fn = VAEGANLoss(kl_weight=0.0, gan_weight=0.5, gan_mode="adaptive", reduce_grad=hook)
        loss, log = loss_fn.generator(x, w * z, mean, logvar, step=0, disc=times_three(), last_layer=w)
        assert log["d_weight"].item() == pytest.approx(expected, rel=1e-6)
        assert loss.item() == pytest.approx(log["recon_loss"].item() + 0.5 * log["d_weight"].item() * -3.0)
    assert [c.item() for c in calls] == pytest.approx([3.0, -3.0])


def test_adaptive_mode_trains_and_logs_its_weight():
    cfg = vae_config("mnist", "smoke", gan_weight=0.1, gan_mode="adaptive", gan_loss_start=0, steps=2, progress=False)
    row = train_vae(cfg).train_rows[-1]
    assert row["d_weight"] > 0
    expected = row["recon_loss"] + cfg.kl_weight * row["kl"] + 0.1 * row["d_weight"] * row["g_loss"]
    assert row["loss"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="gan_mode"):
        vae_config("mnist", "smoke", gan_mode="adaptiv")


def test_gan_run_starts_from_the_2_1_weights():
    cfg = gan_config(1e-3, 0.1, "smoke", dataset="mnist", lr=0.0, progress=False)  # lr 0: the VAE cannot move
    assert cfg.warm_start and cfg.gan_loss_start == 0
    run = train_vae(cfg)
    base = load_vae(train_vae(base_config(cfg), resume=True).folder / "model.pt")
    for (name, p), q in zip(run.model.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert all("d_loss" in row for row in run.train_rows)  # adversarial from the first step
