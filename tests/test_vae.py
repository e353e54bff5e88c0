"""VAE: closed-form KL, shapes, input checks, the trainer (loss falls, files, resume, loader), evaluation."""

import math

import pytest
import torch

from gm import vae as gm_vae
from gm.eval import Classifier
from gm.loss import kl_divergence, reconstruction_loss
from gm.model import VAE
from gm.vae import load_or_train_vae, load_vae, train_vae, vae_config
from gm.vae_eval import evaluate, feature_distance, figure_panels, sharpness, zoomed_crops


def test_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mean, logvar = torch.randn(1, 6) * 0.8, torch.randn(1, 6) * 0.7
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn(200_000, 6)
    log_q = torch.distributions.Normal(mean, std).log_prob(z).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    monte_carlo = (log_q - log_p).mean()
    closed = kl_divergence(mean, logvar)
    assert closed.shape == (1,)
    assert abs(closed.item() - monte_carlo.item()) / closed.item() < 0.02


def test_kl_matches_torch_distributions_and_sums_non_batch_dims():
    torch.manual_seed(1)
    mean, logvar = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(kl_divergence(mean, logvar), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(kl_divergence(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(mean, logvar[:, :2])


def test_reconstruction_loss_sums_per_image_and_averages_over_the_batch():
    recon = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 0.5]]]])
    # image 1: 1; image 2: 1 + 1 + 1 + 0.25 = 3.25; batch mean (1 + 3.25) / 2
    assert reconstruction_loss(recon, target).item() == pytest.approx(2.125)
    # + KL (summed per image) is the negative ELBO of N(recon, 1/2 I) minus (D / 2) log(pi), per image
    nll = -torch.distributions.Normal(recon, math.sqrt(0.5)).log_prob(target).flatten(1).sum(1).mean()
    assert nll.item() == pytest.approx(2.125 + 0.5 * 4 * math.log(math.pi), rel=1e-6)


@pytest.mark.parametrize("size,channels,latent", [(32, 3, 8), (28, 1, 7)])
def test_vae_shapes(size, channels, latent):
    vae = VAE(channels, z_channels=3, num_channels=8)
    x = torch.rand(2, channels, size, size)
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 3, latent, latent)
    recon, mean2, _ = vae.eval()(x)
    assert recon.shape == x.shape and torch.equal(mean2, mean)
    assert 0 < recon.min() and recon.max() < 1  # sigmoid output
    assert vae.sample(3, latent_hw=(latent, latent)).shape == (3, channels, size, size)
    z1, z2 = vae.reparameterize(mean, logvar), vae.reparameterize(mean, logvar)
    assert z1.shape == mean.shape and not torch.equal(z1, z2)


def test_vae_rejects_bad_input():
    vae = VAE(3, num_channels=8)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        vae(torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 4, 4))


def test_a_few_steps_on_a_tiny_batch_lower_the_loss():
    torch.manual_seed(0)
    vae = VAE(1, num_channels=8)
    x = (torch.rand(8, 1, 16, 16) < 0.2).float()  # sparse strokes, like MNIST
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)

    def loss_fn():
        recon, mean, logvar = vae(x)
        return reconstruction_loss(recon, x) + 1e-3 * kl_divergence(mean, logvar).mean()

    first = loss_fn().item()
    for _ in range(20):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.7 * first


def test_config_validation():
    with pytest.raises(ValueError, match="unknown config key"):
        vae_config("mnist", "smoke", kl_wieght=1.0)
    with pytest.raises(ValueError, match="dataset"):
        vae_config("imagenet", "smoke")
    with pytest.raises(ValueError, match="kl_weight"):
        vae_config("mnist", "smoke", kl_weight=-1.0)
    full = vae_config("cifar10", "full")
    assert full.num_steps(50_000) == 10 * (50_000 // full.batch_size)  # the homework's 10 epochs
    assert vae_config("mnist", "smoke").run_name() != vae_config("mnist", "smoke", kl_weight=1.0).run_name()


def test_trainer_lowers_loss_writes_files_and_resumes():
    cfg = vae_config("mnist", "smoke", steps=12, eval_interval=12, lr=3e-3, progress=False)
    run = train_vae(cfg)
    losses = [row["loss"] for row in run.train_rows]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert run.eval_rows[-1]["test_recon_error"] < run.eval_rows[0]["test_recon_error"]
    for name in ("train.csv", "eval.csv", "checkpoint.pt", "model.pt"):
        assert (run.folder / name).is_file()
    assert not run.model.training
    loaded = load_vae(run.folder / "model.pt")
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.encode(x)[0], run.model.encode(x)[0])

    again = train_vae(cfg, resume=True)  # finished run: loads, trains nothing
    assert len(again.train_rows) == 12
    assert torch.equal(again.model.encode(x)[0], run.model.encode(x)[0])


def test_load_or_train_vae_trains_once_then_loads(monkeypatch):
    run = load_or_train_vae("mnist", "smoke")
    vae = run.model
    assert run.folder == gm_vae.checkpoint_dir() / "vae" / run.config.run_name() and run.config.kl_weight == 1e-6
    mean, logvar = vae.encode(torch.rand(2, 1, 32, 32))
    assert mean.shape == logvar.shape == (2, 3, 8, 8)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    monkeypatch.setattr(gm_vae, "train_vae", lambda *a, **k: pytest.fail("retrained instead of loading"))
    again = load_or_train_vae("mnist", "smoke")
    assert torch.equal(again.model.decode(mean), vae.decode(mean))
    assert again.train_rows == run.train_rows and again.disc is None  # the logs it was trained with, read back


def test_sharpness_and_evaluate():
    flat, noisy = torch.full((2, 3, 8, 8), 0.5), torch.rand(2, 3, 8, 8)
    assert torch.equal(sharpness(flat), torch.zeros(2)) and (sharpness(noisy) > 0.2).all()
    vae = VAE(1, num_channels=8)
    metrics = evaluate(vae, "mnist", num_images=64, batch_size=32)
    assert {"recon_error", "psnr_db", "kl_nats", "neg_elbo_nats", "neg_elbo_bpd", "sharpness", "n"} <= set(metrics)
    assert metrics["n"] == 64 and all(math.isfinite(v) for v in metrics.values()) and metrics["kl_nats"] > 0
    dims = 32 * 32
    # the mean per-image PSNR is at least the PSNR of the mean per-pixel MSE (Jensen: -log is convex)
    assert metrics["psnr_db"] >= -10 * math.log10(metrics["recon_error"] / dims) - 1e-6
    # neg ELBO = sampled squared error + (D / 2) log(pi) + KL, and bits/dim is that over D ln 2
    assert metrics["neg_elbo_nats"] > metrics["kl_nats"] + 0.5 * dims * math.log(math.pi)
    assert metrics["neg_elbo_bpd"] == pytest.approx(metrics["neg_elbo_nats"] / (dims * math.log(2)))
    panels = figure_panels(vae, "mnist", num_images=4)
    assert list(panels) == ["inputs", "reconstructions", "prior samples"]
    assert all(p.shape == (4, 1, 32, 32) for p in panels.values())
    assert len(set(panels["inputs"].flatten(1).sum(1).tolist())) == 4  # a shuffled, not a repeated, subset


def test_feature_distance_per_image_values_and_zoomed_crops():
    judge = Classifier(1, width=4).eval()
    x = torch.rand(6, 1, 32, 32)
    assert torch.allclose(feature_distance(judge, x, x), torch.zeros(6), atol=1e-6)  # an image is at 0 from itself
    far = feature_distance(judge, 1 - x, x)
    assert far.shape == (6,) and (far > 0).all() and (far <= 2).all()
    vae = VAE(1, num_channels=8)
    m = evaluate(vae, "mnist", num_images=40, batch_size=16, judge=judge, per_image=True)
    per = m["per_image"]
    assert set(per) == {"recon_error", "psnr_db", "kl_nats", "neg_elbo_nats", "sharpness", "feature_dist"}
    assert all(v.shape == (40,) for v in per.values())
    assert m["feature_dist"] == pytest.approx(per["feature_dist"].double().mean().item())
    assert m["sharpness"] == pytest.approx(per["sharpness"].double().mean().item()) and m["sharpness_ci95"] > 0
    # the originals' features are computed once per judge and batch: a second VAE needs its reconstructions' only
    calls = []
    features = judge.features
    judge.features = lambda images: calls.append(len(images)) or features(images)
    again = evaluate(VAE(1, num_channels=8), "mnist", num_images=40, batch_size=16, judge=judge)
    assert calls == [16, 16, 8] and again["feature_dist"] != m["feature_dist"]
    next(judge.parameters()).data.mul_(2)  # another judge (the same object): its own features of the originals
    evaluate(vae, "mnist", num_images=40, batch_size=16, judge=judge)
    assert calls == [16, 16, 8] + [16, 16, 16, 16, 8, 8]
    crops = zoomed_crops(torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32), size=4, scale=3,
                         top_left=(1, 2))
    assert crops.shape == (2, 1, 12, 12) and crops[0, 0, 0, 0].item() == 32 + 2 and crops[0, 0, 0, 3].item() == 33 + 2
