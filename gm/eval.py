"""The evaluation classifier of generated images: a small CNN per data set, trained once per profile, giving the
conditional accuracy (with a Wilson interval) and the features of the Frechet distance (`gm.frechet`).

The Frechet distance is computed on the penultimate features of this classifier, not on Inception-v3 features, so
it is an FID *analogue*: comparable between models of this package and against the real-vs-real baseline measured
with the same number of images, not with published FID numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import checkpoint_dir, dist, get_device, make_config, seed_everything
from common.checks import Interval, wilson_interval
from common.config import RunConfig, bookkeeping, check, config_digest
from common.data import batch_indices
from common.io import atomic_save
from common.memo import RecentResults
from common.optim import build_optimizer, warmup_cosine
from common.params import tensor_digest, weights_digest
from common.run import Run, read_logs
from common.trainer import Metrics, Trainer
from gm.data import CHANNELS, DATASETS, TRAIN_SIZE, load_dataset, subset_indices

T = TypeVar("T")


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU, then a residual conv -> BN -> GELU: halves the resolution."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                  nn.BatchNorm2d(c_out), nn.GELU())
        self.res = nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return x + self.res(x)


class Classifier(nn.Module):
    """A small fast residual CNN (in the style of ResNet-9 / airbench) for 32x32 images in [0, 1]: three
    `ConvGroup`s of widths `width * width_mults` (default (w, 3w, 6w)) at 16, 8 and 4 px, a global max pool (the
    `feature_dim` = last width features of the Frechet distance) and a linear head. No full-resolution stem: the
    first group's convolution reads the image, so most of the compute goes to the wide low-resolution layers. With
    `flip_tta` (CIFAR-10) the eval-mode features are the mean over the image and its mirror image, so the logits
    are the flip test-time augmentation."""

    def __init__(self, in_channels: int, num_classes: int = 10, width: int = 32,
                 width_mults: tuple[int, int, int] = (1, 3, 6), flip_tta: bool = False):
        super().__init__()
        w1, w2, w3 = (width * m for m in width_mults)
        self.in_channels, self.flip_tta, self.feature_dim = in_channels, flip_tta, w3
        self.body = nn.Sequential(ConvGroup(in_channels, w1), ConvGroup(w1, w2), ConvGroup(w2, w3),
                                  nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(w3, num_classes)
        self.to(memory_format=torch.channels_last)  # with channels-last inputs: ~1.6x faster convs on CPU

    def extra_repr(self) -> str:
        return f"flip_tta={self.flip_tta}"  # part of what the features are (`cached_features` keys on the repr)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, feature_dim) penultimate features."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"classifier input must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        x = (x * 2 - 1).contiguous(memory_format=torch.channels_last)
        if self.flip_tta and not self.training:
            return self.body(torch.cat([x, x.flip(-1)])).unflatten(0, (2, -1)).mean(0)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class ClassifierConfig(RunConfig):
    dataset: str = "mnist"
    width: int = 32
    width_mults: tuple[int, int, int] = (1, 3, 6)  # widths of the three groups, in units of `width`
    epochs: float = 4.0  # passes over the training set (sets `steps` with batch_size)
    steps: int = 0  # 0: from epochs
    # A few epochs on a CPU are limited by the number of updates: at 1 epoch of CIFAR-10, batch 128 reached 64 % test
    # accuracy and batch 512 (lr 0.2) 37 %, at the same images/s.
    batch_size: int = 128
    lr: float = 0.1  # peak LR of SGD with Nesterov momentum 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    warmup_steps: int = 0  # 0: 15 % of the steps
    crop_pad: int = 2  # random translation by up to this many pixels (random crop of the reflect-padded image)
    flip: bool | None = None  # random horizontal flips (training) and flip test-time augmentation; None: CIFAR-10
    degrade_fraction: float = 0.1  # fraction of each batch blurred / contrast-reduced (see `degrade`)
    eval_size: int = 10_000  # test images for the reported accuracy (10,000: the full test set)
    log_interval: int = bookkeeping(10)  # train metrics are read off the device every 10 steps

    def __post_init__(self):
        check(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        check(self.batch_size > 0 and (self.steps > 0 or self.epochs > 0), "batch_size and steps (or epochs) must "
              "be positive")
        check(self.eval_size > 0, f"eval_size must be positive, got {self.eval_size}")
        self.width_mults = tuple(self.width_mults)
        check(self.width > 0 and len(self.width_mults) == 3 and min(self.width_mults) > 0,
              f"need width > 0 and three positive width_mults, got {self.width}, {self.width_mults}")
        check(0 <= self.degrade_fraction <= 1, f"degrade_fraction must be in [0, 1], got {self.degrade_fraction}")
        if self.flip is None:
            self.flip = self.dataset == "cifar10"  # mirrored digits are not digits
        if self.steps == 0:
            self.steps = max(1, round(self.epochs * TRAIN_SIZE[self.dataset] / self.batch_size))
        if self.warmup_steps == 0:
            self.warmup_steps = max(1, round(0.15 * self.steps))

    @property
    def in_channels(self) -> int:
        return CHANNELS[self.dataset]

    def run_name(self) -> str:
        """Unique per training-relevant settings: a digest of all fields but the bookkeeping ones."""
        return f"{self.dataset}_{self.profile}_{config_digest(self)}"


CLASSIFIER_PRESETS = {
    "smoke": dict(profile="smoke", steps=5, batch_size=16, width=4, eval_size=64),
    # 2-core CPU: CIFAR-10 trains at ~650-700 images/s at width 32 (5 epochs: 84.0 % test accuracy, ~370 s; 7 epochs:
    # 85.9 %, ~520 s, which put notebook 2_2, where it is first needed, over its 15 minutes); MNIST needs far less
    # (width 16, 1 epoch: ~40 s, 99.3 %).
    "quick": dict(profile="quick",
                  by_dataset={"mnist": dict(width=16, epochs=1.0), "cifar10": dict(width=32, epochs=5.0)}),
    "full": dict(profile="full", epochs=16.0, width=64, batch_size=512, lr=0.2, log_interval=20),
}


def classifier_config(dataset: str, profile: str | None = None, **overrides) -> ClassifierConfig:
    return make_config(ClassifierConfig, CLASSIFIER_PRESETS, profile, dataset=dataset, **overrides)


@dataclass
class ClassifierRun(Run[ClassifierConfig, Classifier]):
    """An evaluation classifier's run: `model` in eval mode, frozen; `folder/model.pt` holds it and its numbers."""

    test_accuracy: float  # on `eval_size` random test images
    train_seconds: float  # wall time of the training steps (as measured when it was trained)

    @property
    def test_accuracy_ci(self) -> Interval:
        return wilson_interval(round(self.test_accuracy * self.config.eval_size), self.config.eval_size)


# Features of image batches computed in this process, by classifier and image values. The same real test images are
# measured against many models: 2.2 scores nine VAEs against the same 2,000 originals, and 2.3 compares three
# autoencoders with the same 6,000 real images.
_FEATURES: RecentResults[Tensor] = RecentResults(kept=64)


def cached_features(classifier: nn.Module, images: Tensor) -> Tensor:
    """`classifier.features(images)`, (N, feature_dim), detached; from memory when a classifier with the same weights
    and settings (its repr), in the same train/eval mode, featurised the same images (the same values, as one batch)
    in this process (the last 64 such batches are kept)."""
    key = (weights_digest(classifier), repr(classifier), classifier.training, tensor_digest(images))
    return _FEATURES.get(key, lambda: classifier.features(images).detach())


@torch.no_grad()
def predict(classifier: Classifier, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """(logits (N, classes), features (N, feature_dim)) on CPU, computed in batches on the classifier's device
    (features by `cached_features`)."""
    device = next(classifier.parameters()).device
    logits, feats = [], []
    for chunk in images.split(batch_size):
        f = cached_features(classifier, chunk.to(device))
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
    mean. Training the classifier on some such images makes it judge the *class* of soft, low-contrast decodes of
    a small VAE instead of rejecting them for their blur (the distance, not the accuracy, is meant to see blur)."""
    b = images.shape[0]
    blend = torch.rand(b, 1, 1, 1, device=images.device)
    x = torch.lerp(images, gaussian_blur(images, max_blur), blend)
    contrast = min_contrast + (1 - min_contrast) * torch.rand(b, 1, 1, 1, device=images.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + contrast * (x - mean)).clamp(0, 1)


def random_translate(images: Tensor, pad: int) -> Tensor:
    """Random crop of the reflect-padded (B, C, H, W) batch: each image shifted by up to `pad` pixels."""
    if pad == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (b, 1), device=images.device) for _ in range(2))
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def augment(x: Tensor, cfg: ClassifierConfig) -> Tensor:
    """Training augmentation of a (B, C, 32, 32) batch: `degrade` on a fraction, random translation, flips."""
    k = round(cfg.degrade_fraction * x.shape[0])
    if k:
        x = torch.cat([degrade(x[:k]), x[k:]])  # batches are random, so the first k are a random subset
    x = random_translate(x, cfg.crop_pad)
    if cfg.flip:
        flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
        x = torch.where(flip, x.flip(-1), x)
    return x


def train_classifier(cfg: ClassifierConfig) -> ClassifierRun:
    """Train on the real training images with `common.trainer.Trainer` (SGD + Nesterov, warm-up then cosine decay,
    label smoothing, `augment`); the reported accuracy is on `eval_size` test images (all 10,000 by default)."""
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    images, labels = load_dataset(cfg.dataset, "train")
    test_images, test_labels = load_dataset(cfg.dataset, "test")
    idx = subset_indices(len(test_images), cfg.eval_size, cfg.seed)
    test_images, test_labels = test_images[idx], test_labels[idx]
    model = Classifier(cfg.in_channels, width=cfg.width, width_mults=cfg.width_mults, flip_tta=cfg.flip).to(device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, "sgd", momentum=0.9, nesterov=True)
    run_dir = checkpoint_dir() / "classifier" / cfg.run_name()
    # distributed=False: under torchrun, rank 0 alone trains it (`load_or_train_classifier`), so its BatchNorm
    # statistics are those of one process's batches, as in a one-process run
    trainer = Trainer(run_dir, {"classifier": model}, {"classifier": optimizer}, steps=cfg.steps, grad_clip=None,
                      schedulers={"classifier": warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, min_ratio=0.0)},
                      device=device, desc=f"classifier {cfg.dataset}",
                      progress=cfg.progress, log_interval=cfg.log_interval, distributed=False)

    def step_fn(step: int) -> Metrics:
        idx = batch_indices(len(images), cfg.batch_size, step, cfg.seed)
        x, y = augment(images[idx].to(device), cfg), labels[idx].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        trainer.optimizer_step("classifier")
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean().detach()}

    trainer.fit(step_fn)  # no evaluation during training: one pass over the test set at the end
    model.eval().requires_grad_(False)
    test_acc = accuracy(model, test_images, test_labels)
    rows = trainer.train_log.rows
    starts = [0] + [r["step"] for r in rows[:-1]]
    seconds = sum(r["step_time"] * (r["step"] - start) for r, start in zip(rows, starts, strict=True))
    atomic_save({"config": dataclasses.asdict(cfg), "state_dict": model.state_dict(), "test_accuracy": test_acc,
                 "train_seconds": seconds}, run_dir / "model.pt")
    return ClassifierRun(cfg, run_dir, model, rows, trainer.eval_log.rows, test_acc, seconds)


def load_or_train_classifier(dataset: str, profile: str | None = None, **overrides) -> ClassifierRun:
    """The evaluation classifier of `dataset` for the profile: loaded from its checkpoint, trained if missing.

    Under torchrun rank 0 trains it in one process while the other ranks wait, then they load it: the classifier is
    small next to the runs that use it, and its BatchNorm keeps one process's statistics (SyncBatchNorm has no CPU
    kernel, so this path is the one the CPU tests run). With HW3_NPROC > 1 a notebook trains it in its own process.
    """
    cfg = classifier_config(dataset, profile, **overrides)
    folder = checkpoint_dir() / "classifier" / cfg.run_name()
    with dist.main_process_first():
        if not (folder / "model.pt").is_file():
            return train_classifier(cfg)
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=False)
    model = Classifier(cfg.in_channels, width=cfg.width, width_mults=cfg.width_mults, flip_tta=cfg.flip)
    model.load_state_dict(state["state_dict"])
    model = model.to(get_device(cfg.device)).eval().requires_grad_(False)
    return ClassifierRun(cfg, folder, model, *read_logs(folder), state["test_accuracy"], state["train_seconds"])
