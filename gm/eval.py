"""Measuring generated images: a small classifier per data set, conditional accuracy, a classifier-feature
Frechet distance, and sampling speed.

The Frechet distance here is computed on the penultimate features of our own small classifier, not on
Inception-v3 features, so it is an FID *analogue*: comparable between models of this package and against the
real-vs-real baseline measured with the same number of images, not with published FID numbers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import checkpoint_dir, get_device, get_profile, make_config, seed_everything
from common.config import check, config_digest
from common.data import batch_indices
from common.io import atomic_save
from common.trainer import Metrics, Trainer, warmup_cosine
from gm.data import CHANNELS, DATASETS, load_dataset, subset_indices

T = TypeVar("T")


class Classifier(nn.Module):
    """A small CNN for 32x32 images in [0, 1]: three conv stages (32 -> 16 -> 8 -> global pool), then a
    `feature_dim` hidden layer (the features of the Frechet distance) and the class logits."""

    def __init__(self, in_channels: int, num_classes: int = 10, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.in_channels = in_channels

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *stage(in_channels, width), nn.MaxPool2d(2),
            *stage(width, 2 * width), nn.MaxPool2d(2),
            *stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, feature_dim) penultimate features."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"classifier input must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.body(x * 2 - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class ClassifierConfig:
    dataset: str = "mnist"
    width: int = 16
    feature_dim: int = 64
    steps: int = 400
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    eval_size: int = 2000  # test images for the reported accuracy
    degrade: bool = True  # blur/contrast augmentation (see `degrade`)
    seed: int = 0
    device: str | None = None
    log_interval: int = 1  # train metrics are read off the device (a host sync) every log_interval steps
    profile: str = "quick"
    progress: bool = True

    def __post_init__(self):
        check(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        check(self.steps > 0 and self.batch_size > 0, "steps and batch_size must be positive")
        check(self.eval_size > 0, f"eval_size must be positive, got {self.eval_size}")

    @property
    def in_channels(self) -> int:
        return CHANNELS[self.dataset]

    def run_name(self) -> str:
        """Unique per training-relevant settings: a digest of all fields but the bookkeeping ones."""
        return f"{self.dataset}_{self.profile}_{config_digest(self, exclude={'progress', 'device', 'log_interval'})}"


CLASSIFIER_PRESETS = {
    "smoke": dict(profile="smoke", steps=5, batch_size=16, width=4, feature_dim=16, eval_size=64),
    "quick": dict(profile="quick", steps=300, batch_size=64, eval_size=2000),
    "full": dict(profile="full", steps=4000, batch_size=128, width=32, feature_dim=128, eval_size=10_000,
                 log_interval=20),
}


def classifier_config(dataset: str, profile: str | None = None, **overrides) -> ClassifierConfig:
    return make_config(ClassifierConfig, CLASSIFIER_PRESETS, get_profile(profile), dataset=dataset, **overrides)


@dataclass
class ClassifierRun:
    config: ClassifierConfig
    model: Classifier  # eval mode, frozen
    test_accuracy: float  # on `eval_size` random test images
    path: Path


@torch.no_grad()
def predict(classifier: Classifier, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """(logits (N, classes), features (N, feature_dim)) on CPU, computed in batches on the classifier's device."""
    device = next(classifier.parameters()).device
    logits, feats = [], []
    for chunk in images.split(batch_size):
        f = classifier.features(chunk.to(device))
        feats.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(logits), torch.cat(feats)


def accuracy(classifier: Classifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of `images` the classifier assigns to `labels`: for generated images conditioned on `labels`
    this is the conditional accuracy."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    logits, _ = predict(classifier, images)
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) images (kernel radius 2 sigma, reflect padding)."""
    radius = max(1, round(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def degrade(images: Tensor, max_blur: float = 1.5, min_contrast: float = 0.5) -> Tensor:
    """Random per-image blur (a blend towards a sigma = `max_blur` blur) and contrast reduction around the image
    mean. Training the classifier with it makes it judge the *class* of soft, low-contrast decodes of a small
    VAE instead of rejecting them for their blur (the distance, not the accuracy, is meant to see blur)."""
    b = images.shape[0]
    blend = torch.rand(b, 1, 1, 1, device=images.device)
    x = torch.lerp(images, gaussian_blur(images, max_blur), blend)
    contrast = min_contrast + (1 - min_contrast) * torch.rand(b, 1, 1, 1, device=images.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + contrast * (x - mean)).clamp(0, 1)


def train_classifier(cfg: ClassifierConfig) -> ClassifierRun:
    """Train on the real training images with `common.trainer.Trainer`; augmentations: `degrade` (when
    `cfg.degrade`) and random horizontal flips for CIFAR-10."""
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    images, labels = load_dataset(cfg.dataset, "train")
    test_images, test_labels = load_dataset(cfg.dataset, "test")
    idx = subset_indices(len(test_images), cfg.eval_size, cfg.seed)
    test_images, test_labels = test_images[idx], test_labels[idx]
    model = Classifier(cfg.in_channels, width=cfg.width, feature_dim=cfg.feature_dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run_dir = checkpoint_dir() / "classifier" / cfg.run_name()
    trainer = Trainer(run_dir, {"classifier": model}, {"classifier": optimizer}, steps=cfg.steps,
                      schedulers={"classifier": warmup_cosine(optimizer, max(1, cfg.steps // 20), cfg.steps)},
                      device=device, desc=f"classifier {cfg.dataset}", progress=cfg.progress,
                      log_interval=cfg.log_interval)

    def step_fn(step: int) -> Metrics:
        idx = batch_indices(len(images), cfg.batch_size, step, cfg.seed)
        x, y = images[idx].to(device), labels[idx].to(device)
        if cfg.degrade:
            x = degrade(x)
        if cfg.dataset == "cifar10":
            flip = torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5
            x = torch.where(flip, x.flip(-1), x)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        trainer.optimizer_step("classifier")
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean().detach()}

    def eval_fn(step: int) -> Metrics:
        return {"test_acc": accuracy(model, test_images, test_labels)}

    trainer.fit(step_fn, eval_fn)
    model.eval().requires_grad_(False)
    test_acc = trainer.eval_log.rows[-1]["test_acc"]
    path = atomic_save({"config": dataclasses.asdict(cfg), "state_dict": model.state_dict(), "test_accuracy": test_acc},
                       run_dir / "model.pt")
    return ClassifierRun(cfg, model, test_acc, path)


def load_or_train_classifier(dataset: str, profile: str | None = None, **overrides) -> ClassifierRun:
    """The evaluation classifier of `dataset` for the profile: loaded from its checkpoint, trained if missing."""
    cfg = classifier_config(dataset, profile, **overrides)
    path = checkpoint_dir() / "classifier" / cfg.run_name() / "model.pt"
    if not path.is_file():
        return train_classifier(cfg)
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = Classifier(cfg.in_channels, width=cfg.width, feature_dim=cfg.feature_dim)
    model.load_state_dict(state["state_dict"])
    model = model.to(get_device(cfg.device)).eval().requires_grad_(False)
    return ClassifierRun(cfg, model, state["test_accuracy"], path)


def frechet_distance_from_stats(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^{1/2} C2 C1^{1/2})^{1/2}): the squared 2-Wasserstein distance between
    N(mu1, C1) and N(mu2, C2), computed with symmetric eigendecompositions in float64."""
    mu1, mu2, cov1, cov2 = (a.double() for a in (mu1, mu2, cov1, cov2))
    evals, evecs = torch.linalg.eigh(cov1)
    sqrt1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def frechet_distance(features1: Tensor, features2: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (N may differ; both need N >= 2)."""
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"need two (N, D) feature sets with the same D, got {tuple(features1.shape)} "
                         f"and {tuple(features2.shape)}")
    if min(len(features1), len(features2)) < 2:
        raise ValueError("each feature set needs at least 2 rows to estimate a covariance")
    f1, f2 = features1.double(), features2.double()
    return frechet_distance_from_stats(f1.mean(0), torch.cov(f1.T), f2.mean(0), torch.cov(f2.T))


def timed(fn: Callable[[], T], device: torch.device | None = None) -> tuple[T, float]:
    """(fn(), wall seconds), synchronising CUDA so the time covers the queued kernels."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start
