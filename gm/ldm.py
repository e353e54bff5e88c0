"""Class-conditional latent diffusion (task 2.3): a UNet denoiser trained with the DDPM loss on VAE latents.

The generative process is a registry entry (`PROCESSES`, picked by `LDMConfig.process`): the DDPM of task 2.3
(`gm.diffusion.GaussianDiffusion`) or the rectified flow of 2.4 (`gm.flow.RectifiedFlow`); training calls the
process's `training_loss`, sampling runs a `gm.sampler.SamplerSpec` on it.

Pipeline: encode the data set once with the frozen VAE of task 2.1 (posterior means, cached per VAE weights),
normalise the latents per channel (mean/std are buffers of `LatentDiffusion`, so they travel with the
checkpoint), train the UNet with `common.trainer.Trainer` (EMA of the weights, label dropout for classifier-free
guidance), sample latents with DDPM or DDIM and decode them with the VAE decoder.

Several GPUs: `torchrun --nproc_per_node=8 -m gm.ldm train --profile full --dataset cifar10` (or HW3_NPROC=8, which
makes `train_ldm` launch that itself). Rank 0 encodes and caches the latents (the others wait), each rank trains on
batch_size / N latents of the step's batch with its own timesteps and noise, and the validation loss is shared out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from common import cache_dir, checkpoint_dir, dist, get_device, make_config, seed_everything
from common.config import RunConfig, added_field, bookkeeping, check, config_digest
from common.data import batch_indices
from common.device import timed
from common.ema import EMA
from common.io import atomic_save
from common.logging import trailing_mean
from common.optim import build_optimizer, warmup_cosine
from common.params import weights_digest  # the VAE's identity in latent caches and LDM run names
from common.plotting import make_grid, markdown_table, new_figure, plot_curves, save_figure
from common.run import Run
from common.trainer import Metrics, Trainer
from gm.data import CIFAR10_CLASSES, DATASETS, load_dataset, subset_indices
from gm.diffusion import PREDICTIONS, SCHEDULES, GaussianDiffusion
from gm.eval import Classifier, predict, wilson_interval
from gm.flow import RectifiedFlow
from gm.frechet import FrechetReference, frechet_distance, kernel_distance
from gm.model import VAE
from gm.sampler import Process, SamplerSpec, sample
from gm.unet import UNet
from gm.vae import load_or_train_vae

NUM_CLASSES = 10
CLASS_NAMES = {"mnist": tuple(str(i) for i in range(10)), "cifar10": CIFAR10_CLASSES}


@dataclass
class LDMConfig(RunConfig):
    dataset: str = "mnist"
    process: str = added_field("ddpm")  # the generative process, a key of PROCESSES (ddpm runs keep their folders)
    # diffusion (the "ddpm" process)
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    schedule: str = "linear"
    prediction: str = "eps"
    # denoiser
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention: bool = True
    dropout: float = 0.0
    class_dropout: float = 0.1  # probability of training on the null label (classifier-free guidance)
    # optimisation
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    max_train: int | None = None  # training images encoded (None: all)
    # evaluation during training and sampling for the report
    eval_interval: int = 250
    eval_size: int = 512  # test latents for the validation loss
    samples_per_class: int = bookkeeping(10)  # generated images per class for accuracy, distance and the grids
    ddpm_samples_per_class: int = bookkeeping(10)  # the same for DDPM-1000 (20x the model calls of DDIM-50)
    reference_size: int = bookkeeping(1000)  # real test images the samples are compared with
    sample_batch_size: int = bookkeeping(1000)  # images generated per sampler call (large batches: more images/s)
    kid_blocks: int = bookkeeping(10)  # disjoint blocks of the kernel distance's estimate and confidence interval
    ddim_steps: int = bookkeeping(50)
    # DDIM noise of the report's samples: 1 (stochastic), since 2.4's step sweep finds it better than the deterministic
    # eta = 0 at every step count with guidance
    ddim_eta: float = bookkeeping(1.0)
    # limit on the predicted x0 of the report's DDIM samplers, in normalised latent units (`SamplerSpec.clip_x0`;
    # with ddim_threshold, dynamic thresholding); None: no limit
    ddim_clip_x0: float | None = bookkeeping(None)
    ddim_threshold: float | None = bookkeeping(None)
    guidance_scale: float = bookkeeping(1.0)  # classifier-free guidance w of the report's samples (1: conditional)
    bf16: bool = False
    vae_profile: str | None = None  # profile of the VAE to encode with (default: this profile)

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        check(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        check(self.process in PROCESSES, f"process must be one of {tuple(PROCESSES)}, got {self.process!r}")
        check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check(self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        check(self.steps > 0 and self.batch_size > 0 and self.lr > 0, "steps, batch_size and lr must be positive")
        check(0 <= self.class_dropout < 1, f"class_dropout must be in [0, 1), got {self.class_dropout}")
        check(0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        check(self.max_train is None or self.max_train >= self.batch_size, "max_train must be >= batch_size")
        check(min(self.samples_per_class, self.ddpm_samples_per_class) >= 1 and self.reference_size >= 2,
              "need samples_per_class >= 1, ddpm_samples_per_class >= 1 and reference_size >= 2")
        check(self.sample_batch_size >= 1 and self.kid_blocks >= 2, "need sample_batch_size >= 1 and "
              "kid_blocks >= 2")
        check(1 <= self.ddim_steps <= self.timesteps, f"ddim_steps must be in [1, {self.timesteps}]")
        check(self.ddim_eta >= 0, f"ddim_eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {self.ddim_eta}")

    def run_name(self, vae_digest: str) -> str:
        """Unique per training-relevant settings and VAE weights (`config_digest`: sampling fields are bookkeeping)."""
        return f"{self.dataset}_{self.profile}_{config_digest(self)}_vae{vae_digest[:8]}"


PRESETS = {
    "smoke": dict(profile="smoke", steps=4, batch_size=16, base_channels=8, attention=False, warmup_steps=1,
                  timesteps=100, max_train=256, eval_interval=0, eval_size=32, samples_per_class=2,
                  ddpm_samples_per_class=2, reference_size=32, ddim_steps=10, ema_decay=0.9),
    # 2-core CPU, a few minutes per data set (CIFAR-10 latents are harder to model than MNIST's, so the budget goes
    # mostly to CIFAR-10). Metrics on 1,000 DDIM samples (100 per class) against 5,000 real test images; DDPM-1000
    # costs 20x more model calls per image, so it gets 5 per class on CIFAR-10 (its CI says so) and 30 on MNIST, where
    # it is the reference deterministic DDIM-50 is held to (>= 300 samples each). MNIST's DDIM limits the predicted
    # x0 by dynamic thresholding (2.4: it lifts deterministic DDIM, and leaves eta = 1 as it is); CIFAR-10's latents
    # were not measured with it, so they sample without. Sampling in batches of 250 (500
    # with guidance): a UNet call on the 8x8 latents ran at more images/s at batch 200 than at 2,000 on this CPU.
    "quick": dict(profile="quick", batch_size=128, base_channels=32, lr=2e-3, warmup_steps=100, max_train=None,
                  eval_interval=250, eval_size=512, samples_per_class=100, ddpm_samples_per_class=5,
                  reference_size=5000, sample_batch_size=250, ddim_steps=50, ema_decay=0.995, guidance_scale=4.0,
                  by_dataset={"mnist": dict(steps=400, ddpm_samples_per_class=30, ddim_clip_x0=3.0,
                                            ddim_threshold=0.995),
                              "cifar10": dict(steps=1000)}),
    # GPU: the homework's scale (not run here: no GPU).
    "full": dict(profile="full", steps=50_000, batch_size=256, base_channels=128, channel_mults=(1, 2, 2),
                 num_res_blocks=2, dropout=0.1, lr=2e-4, warmup_steps=1000, eval_interval=2500, eval_size=2000,
                 samples_per_class=100, ddpm_samples_per_class=100, reference_size=9000, ema_decay=0.9999,
                 guidance_scale=2.0, log_interval=50),
}


# The generative processes an LDM trains and samples with: name -> builder from the config. A new process is a module
# implementing `gm.sampler.Process` and one entry here.
PROCESSES: dict[str, Callable[[LDMConfig], Process]] = {
    "ddpm": lambda cfg: GaussianDiffusion(cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.schedule, cfg.prediction),
    "flow": lambda cfg: RectifiedFlow(time_scale=cfg.timesteps),
}


def ldm_config(dataset: str, profile: str | None = None, **overrides) -> LDMConfig:
    """The preset of `profile` (default $HW3_PROFILE) for `dataset`, with overrides (unknown keys are rejected)."""
    return make_config(LDMConfig, PRESETS, profile, dataset=dataset, **overrides)


class LatentDiffusion(nn.Module):
    """UNet + generative process + per-channel latent statistics. Calling it is calling the UNet on normalised
    latents, so it is itself a denoiser `model(z_t, t, y)` for its process."""

    def __init__(self, unet: UNet, process: Process, latent_mean: Tensor, latent_std: Tensor):
        super().__init__()
        self.unet, self.process = unet, process
        self.register_buffer("latent_mean", latent_mean.reshape(1, -1, 1, 1).clone())
        self.register_buffer("latent_std", latent_std.reshape(1, -1, 1, 1).clone())

    @property
    def num_classes(self) -> int:
        return self.unet.num_classes

    def forward(self, z: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.unet(z, t, y)

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean.to(z.device)) / self.latent_std.to(z.device)

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.latent_std.to(z.device) + self.latent_mean.to(z.device)

    @torch.no_grad()
    def sample_latents(self, labels: Tensor, latent_hw: tuple[int, int], spec: SamplerSpec,
                       generator: torch.Generator | None = None, progress: bool = True) -> Tensor:
        """VAE latents (B, C, h, w) for class `labels` (B,), sampled as `spec` says (a spec of this model's process,
        or of an equal one, e.g. the process of the EMA copy)."""
        if type(spec.process) is not type(self.process) or repr(spec.process) != repr(self.process):
            raise ValueError(f"the sampler spec's process {spec.process!r} is not this model's {self.process!r}; "
                             "build the spec with model.process")
        self.unet.check_labels(labels)  # once here, not in each of the sampler's model calls
        shape = (labels.shape[0], self.unet.in_channels, *latent_hw)
        return self.denormalize(sample(self, spec, shape, labels, generator=generator, progress=progress))


def build_ldm(cfg: LDMConfig, latent_channels: int, latent_mean: Tensor, latent_std: Tensor) -> LatentDiffusion:
    unet = UNet(latent_channels, base_channels=cfg.base_channels, channel_mults=cfg.channel_mults,
                num_res_blocks=cfg.num_res_blocks, num_classes=NUM_CLASSES, dropout=cfg.dropout,
                attention=cfg.attention)
    return LatentDiffusion(unet, PROCESSES[cfg.process](cfg), latent_mean, latent_std)


# --------------------------------------------------------------------------------------------- latents


@torch.no_grad()
def encode_images(vae: VAE, images: Tensor, batch_size: int = 500) -> Tensor:
    """(N, C, 32, 32) images in [0, 1] -> (N, z_channels, 8, 8) posterior means, on CPU. The images are checked
    for NaN/Inf here, once per data set (the VAE's forward checks shapes only)."""
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf values; check the data set files")
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(chunk.to(device))[0].cpu() for chunk in images.split(batch_size)])


def cached_latents(vae: VAE, dataset: str, split: str, limit: int | None = None,
                   vae_digest: str | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(latents, labels) of `limit` random images of a split (all if None), encoded once and cached per VAE. Under
    torchrun rank 0 encodes and writes the cache; the other ranks wait, then read it."""
    digest = vae_digest or weights_digest(vae)
    path = cache_dir() / "ldm_latents" / f"{dataset}_{split}_{limit or 'all'}_s{seed}_{digest[:12]}.pt"
    with dist.main_process_first():
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            return cached["latents"], cached["labels"]
        images, labels = load_dataset(dataset, split)
        idx = subset_indices(len(images), limit, seed)
        images, labels = images[idx], labels[idx]
        latents = encode_images(vae, images)
        atomic_save({"latents": latents, "labels": labels}, path)
        return latents, labels


# --------------------------------------------------------------------------------------------- training


@dataclass
class LDMRun(Run[LDMConfig, LatentDiffusion]):
    """An LDM run: `model` holds the raw weights (eval mode); the report samples from `ema_model`."""

    ema_model: LatentDiffusion  # EMA weights
    vae: VAE  # the frozen VAE whose latents the model learned
    latent_hw: tuple[int, int]


def train_ldm(cfg: LDMConfig, vae: VAE | None = None, resume: bool = True) -> LDMRun:
    """Train (or, when the run's checkpoint is complete, just load) the latent diffusion model of `cfg`.

    With HW3_NPROC=N > 1 (and not already under torchrun), the run trains in N processes (`python -m gm.ldm train`,
    which encodes with `load_or_train_vae(cfg.dataset, cfg.vae_profile or cfg.profile)`: a given `vae` must be that
    one), then this call loads the finished run that rank 0 saved.
    """
    if dist.launch_requested():
        dist.launch_run("gm.ldm", cfg, ldm_config(cfg.dataset, cfg.profile), cfg.profile, resume, cfg.dataset)
        resume = True  # below: the cached latents and the finished checkpoint load, no step runs
    seed_everything(cfg.seed)
    dist.shard_size(cfg.batch_size, "LDMConfig.batch_size")  # a clear error before any work
    device = get_device(cfg.device)
    vae = (vae or load_or_train_vae(cfg.dataset, cfg.vae_profile or cfg.profile).model).to(device).eval()
    digest = weights_digest(vae)
    train_z, train_y = cached_latents(vae, cfg.dataset, "train", cfg.max_train, digest, cfg.seed)
    test_z, test_y = cached_latents(vae, cfg.dataset, "test", cfg.eval_size, digest, cfg.seed)
    model = build_ldm(cfg, train_z.shape[1], train_z.mean((0, 2, 3)), train_z.std((0, 2, 3))).to(device)
    train_z, test_z = model.normalize(train_z.to(device)), model.normalize(test_z.to(device))
    train_y, test_y = train_y.to(device), test_y.to(device)
    for labels in (train_y, test_y):  # once per run: the UNet's forward does not read label values
        model.unet.check_labels(labels)
    process = model.process

    ema = EMA(model, cfg.ema_decay)
    optimizer = build_optimizer(model.unet, cfg.lr)  # AdamW, no weight decay
    run_dir = checkpoint_dir() / "ldm" / cfg.run_name(digest)
    trainer = Trainer(run_dir, {"ldm": model}, {"ldm": optimizer}, steps=cfg.steps,
                      schedulers={"ldm": warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)},
                      ema={"ldm": ema}, grad_clip=cfg.grad_clip, eval_interval=cfg.eval_interval,
                      ckpt_interval=cfg.eval_interval, device=device, bf16=cfg.bf16, desc=f"LDM {cfg.dataset}",
                      progress=cfg.progress, log_interval=cfg.log_interval)

    net = trainer.models["ldm"]  # the DDP wrapper under torchrun

    def step_fn(step: int) -> Metrics:
        idx = dist.shard(batch_indices(len(train_z), cfg.batch_size, step, cfg.seed)).to(device)  # this rank's part
        z, y = train_z[idx], train_y[idx]
        drop = torch.rand(y.shape, device=device) < cfg.class_dropout  # label dropout, t and noise: drawn per rank
        y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        with trainer.autocast():
            loss = process.training_loss(net, z, y)  # draws its own t and noise
        loss.backward()
        trainer.optimizer_step("ldm")
        return {"loss": loss.detach()}

    # Validation: the same noise and times at every evaluation, so the curve is not noisy from resampling.
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    val_t = process.sample_time(len(test_z), device, gen)
    val_noise = torch.randn(test_z.shape, generator=gen).to(device)

    def eval_fn(step: int) -> Metrics:
        """Several ranks each take a part of the test latents and sum their weighted mean losses."""
        rows = dist.split_range(len(test_z))
        part, weight = slice(rows.start, rows.stop), len(rows) / len(test_z)
        return dist.sum_gathered({
            name: process.training_loss(m, test_z[part], test_y[part], t=val_t[part], noise=val_noise[part]).item()
            * weight
            for name, m in (("val_loss", model), ("val_loss_ema", ema.shadow)) if len(rows)})

    trainer.fit(step_fn, eval_fn, resume=resume)
    model.eval()
    return LDMRun(cfg, run_dir, model, trainer.train_log.rows, trainer.eval_log.rows, ema.shadow.eval(), vae,
                  tuple(train_z.shape[-2:]))


def main(argv: list[str] | None = None) -> None:
    """`python -m gm.ldm train --profile full --dataset cifar10 [--set key=json ...] [--resume]`: one LDM run (and
    its VAE first, if missing), in one process or under torchrun."""
    args = dist.train_args(argv, "Train the latent diffusion model of gm.ldm (a run of notebook 2_3)", dataset=True)
    with dist.distributed():
        train_ldm(ldm_config(args.dataset, args.profile, **args.overrides), resume=args.resume)


def plot_loss(run: LDMRun, path: str | Path, window: int = 25) -> Path:
    """Training loss (moving average over `window` steps) and the fixed-noise validation loss (raw and EMA)."""
    steps = [r["step"] for r in run.train_rows]
    losses = [r["loss"] for r in run.train_rows]
    window = max(1, min(window, len(losses)))
    smooth = trailing_mean(losses, window)[window - 1 :]  # full windows only
    series = {f"train (mean of {window} steps)": (steps[window - 1:], smooth)}
    for key, label in (("val_loss", "test, raw weights"), ("val_loss_ema", "test, EMA weights")):
        series[label] = ([r["step"] for r in run.eval_rows], [r[key] for r in run.eval_rows])
    cfg = run.config
    what = "eps-MSE" if cfg.process == "ddpm" else "velocity MSE"
    return plot_curves(series, path, f"LDM {what} on {cfg.dataset} latents ({cfg.profile} profile)",
                       ylabel=f"{what} per latent value (normalised latents, eps ~ N(0, 1))", logy=True)


# --------------------------------------------------------------------------------------------- sampling and metrics


# Display names of the evaluation rows' machine keys, used only when a table is rendered (`table`).
DISPLAY_NAMES = {"images_from": "images from", "cond_accuracy": "cond. accuracy", "cond_accuracy_ci": "acc. 95% CI",
                 "feature_fd": "feature FD", "kid": "KID", "kid_ci": "KID 95% CI", "images_per_s": "images/s",
                 "speed_up": "speed-up", "network_calls": "network calls", "val_loss": "val. loss",
                 "train_steps": "train steps", "train_seconds": "train seconds",
                 "classifier_test_acc": "classifier test acc.", "latent_std": "latent std",
                 "latent_max": "latent max |z|"}


def table(rows: list[dict]) -> str:
    """Markdown table of evaluation rows, machine keys shown by their `DISPLAY_NAMES`."""
    return markdown_table([{DISPLAY_NAMES.get(k, k): v for k, v in row.items()} for row in rows])


def report_samplers(cfg: LDMConfig, process: Process | None = None) -> dict[str, SamplerSpec]:
    """The samplers of the 2.3 report at the config's guidance scale: {"ddpm": all T ancestral steps, "ddim":
    `ddim_steps` steps with noise `ddim_eta` and the x0 limit `ddim_clip_x0` / `ddim_threshold`, and, when
    `ddim_eta` is not 0, "ddim_eta0": the same deterministic} on `process` (default: the config's, from
    `PROCESSES`)."""
    process = process or PROCESSES[cfg.process](cfg)
    limit = {"clip_x0": cfg.ddim_clip_x0, "threshold": cfg.ddim_threshold} if isinstance(
        process, GaussianDiffusion) else {}
    samplers = {"ddpm": SamplerSpec(process, None, eta=1.0, guidance_scale=cfg.guidance_scale),
                "ddim": SamplerSpec(process, cfg.ddim_steps, eta=cfg.ddim_eta, guidance_scale=cfg.guidance_scale,
                                    **limit)}
    if cfg.ddim_eta != 0:
        samplers["ddim_eta0"] = SamplerSpec(process, cfg.ddim_steps, eta=0.0, guidance_scale=cfg.guidance_scale,
                                            **limit)
    return samplers


@torch.no_grad()
def generate_with_latents(run: LDMRun, labels: Tensor, spec: SamplerSpec, use_ema: bool = True,
                          generator: torch.Generator | None = None, progress: bool = True) -> tuple[Tensor, Tensor]:
    """(images (B, C, 32, 32) in [0, 1], normalised latents (B, z_channels, h, w)) for class `labels`: latents
    sampled as `spec` says, decoded with the VAE; the latents in the units the diffusion model works in (data:
    mean 0, std 1 per channel), to see whether samples drift off the data."""
    model = run.ema_model if use_ema else run.model
    device = next(model.parameters()).device
    latents = model.sample_latents(labels.to(device), run.latent_hw, spec, generator, progress)
    return run.vae.decode(latents).clamp(0, 1).cpu(), model.normalize(latents).cpu()


@torch.no_grad()
def generate(run: LDMRun, labels: Tensor, spec: SamplerSpec, use_ema: bool = True,
             generator: torch.Generator | None = None, progress: bool = True) -> Tensor:
    """Images (B, C, 32, 32) in [0, 1] for class `labels` (`generate_with_latents` without the latents)."""
    return generate_with_latents(run, labels, spec, use_ema, generator, progress)[0]


def class_labels(samples_per_class: int) -> Tensor:
    """0,0,...,1,1,...: `samples_per_class` of each class, in class order."""
    return torch.arange(NUM_CLASSES).repeat_interleave(samples_per_class)


def save_class_grid(images: Tensor, labels: Tensor, dataset: str, path: str | Path, title: str,
                    per_row: int = 8) -> Path:
    """One row per class with the first `per_row` images of that class, rows labelled with the class name; the
    figure is sized to the grid (no empty margins)."""
    rows = [images[labels == c][:per_row] for c in range(NUM_CLASSES)]
    per_row = min(len(r) for r in rows)
    grid = make_grid(torch.cat([r[:per_row] for r in rows]), nrow=per_row)
    fig, ax = new_figure(figsize=(grid.shape[1] / 45 + 1.0, grid.shape[0] / 45 + 0.5))
    ax.imshow(grid, interpolation="nearest")
    h = images.shape[-2] + 2
    ax.set_yticks([2 + h * i + h / 2 for i in range(NUM_CLASSES)], list(CLASS_NAMES[dataset]), fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    return save_figure(fig, path)


@dataclass
class References:
    """What the samples of one LDM are measured against: classifier features of `reference_size` real test
    images, and the baseline rows of `n` other real test images and of their VAE
    reconstructions."""

    features: FrechetReference  # of (reference_size, feature_dim) features
    rows: list[dict]


def measure(classifier: Classifier, images: Tensor, labels: Tensor, reference: FrechetReference,
            seed: int = 0, kid_blocks: int = 10) -> dict:
    """Conditional accuracy (Wilson 95 % CI), classifier-feature Frechet distance to `reference` (a point estimate,
    biased upwards at small N) and kernel distance to it (KID, unbiased, 95 % CI over `kid_blocks` blocks) of
    (N, C, H, W) `images` that were asked to be of class `labels` (N,)."""
    logits, feats = predict(classifier, images)
    hits = int((logits.argmax(1) == labels.cpu()).sum())
    kid, kid_ci = kernel_distance(feats, reference, kid_blocks, seed)
    return {"cond_accuracy": hits / len(labels), "cond_accuracy_ci": wilson_interval(hits, len(labels)),
            "feature_fd": frechet_distance(feats, reference), "kid": kid, "kid_ci": kid_ci}


@torch.no_grad()
def references(run: LDMRun, classifier: Classifier, n: int, seed: int = 0) -> References:
    """Two disjoint random sets of real test images: `reference_size` for the reference features, `n` (the number
    of generated images) for the real-vs-real and VAE-reconstruction baselines (the best the latent model can do)."""
    cfg = run.config
    real, real_labels = load_dataset(cfg.dataset, "test")
    if len(real) < cfg.reference_size + n:
        raise ValueError(f"need {cfg.reference_size + n} test images for the reference and baseline sets, the test "
                         f"set has {len(real)}; lower reference_size or samples_per_class")
    idx = subset_indices(len(real), cfg.reference_size + n, seed)
    reference = FrechetReference.of(predict(classifier, real[idx[: cfg.reference_size]])[1])
    baseline, baseline_labels = real[idx[cfg.reference_size:]], real_labels[idx[cfg.reference_size:]]
    device = next(run.ema_model.parameters()).device
    recon = torch.cat([run.vae.decode(run.vae.encode(c.to(device))[0]).cpu() for c in baseline.split(500)])
    rows = [{"dataset": cfg.dataset, "images_from": name, "n": n,
             **measure(classifier, images, baseline_labels, reference, seed, cfg.kid_blocks)}
            for name, images in (("real test images (baseline)", baseline), ("VAE reconstructions of them", recon))]
    return References(reference, rows)


def evaluate_ldm(run: LDMRun, classifier: Classifier, samplers: Mapping[str, SamplerSpec] | None = None,
                 samples_per_class: int | Mapping[str, int] | None = None, *, fig_prefix: str | Path | None = None,
                 use_ema: bool = True, seed: int = 0, refs: References | None = None,
                 progress: bool | None = None) -> list[dict]:
    """Sample images of every class with each sampler, and measure them.

    samplers: {name: SamplerSpec} (default: `report_samplers`, DDPM then DDIM); samples_per_class: images per class,
    one count for all samplers or one per name (default: the config's `ddpm_samples_per_class` for a "ddpm" sampler,
    `samples_per_class` for the others). Returns the two reference rows of `refs` (computed if None, with as many
    real images as the largest sample set) and one row per sampler: conditional accuracy (the classifier agrees with
    the label, Wilson 95 % CI), the classifier-feature Frechet distance and kernel distance (KID, with its 95 % CI)
    to `reference_size` other real test images, the guidance scale, the noise level "eta" (DDIM rows), the network
    calls per image, wall time (sampling and VAE decoding), images/s and the speed-up in images/s over the first
    sampler. Machine keys (`cond_accuracy`, `images_from`; `table` renders them). Images are generated
    `sample_batch_size` at a time. With `fig_prefix`, saves the class grid of each sampler as
    `{fig_prefix}_{name}.png`. progress: sampling progress bars (None: the config's `progress`).
    """
    cfg = run.config
    progress = cfg.progress if progress is None else progress
    model = run.ema_model if use_ema else run.model
    samplers = samplers if samplers is not None else report_samplers(cfg, model.process)
    for name, spec in samplers.items():
        if not isinstance(spec, SamplerSpec):
            raise TypeError(f"sampler {name!r} is a {type(spec).__name__}; pass a gm.sampler.SamplerSpec, e.g. "
                            "SamplerSpec(run.model.process, steps=50, eta=1.0) or gm.ldm.report_samplers(config)")

    def default_count(spec: SamplerSpec) -> int:
        return cfg.ddpm_samples_per_class if spec.process.sampler_name(spec) == "ddpm" else cfg.samples_per_class

    counts = {name: samples_per_class if isinstance(samples_per_class, int)
              else (samples_per_class or {}).get(name, default_count(spec)) for name, spec in samplers.items()}
    refs = refs or references(run, classifier, NUM_CLASSES * max(counts.values()), seed)
    rows = [dict(r) for r in refs.rows]
    device = next(model.parameters()).device
    weights = "EMA" if use_ema else "raw"
    process_label = (f"{cfg.schedule}, {cfg.prediction}-pred." if isinstance(model.process, GaussianDiffusion)
                     else cfg.process)
    first_rate = None
    for name, spec in samplers.items():
        labels = class_labels(counts[name])
        generator = torch.Generator(device).manual_seed(seed)
        pairs, seconds = timed(lambda s=spec, g=generator, y=labels: [
            generate_with_latents(run, chunk, s, use_ema, g, progress) for chunk in y.split(cfg.sample_batch_size)],
            device)
        images, latents = (torch.cat(parts) for parts in zip(*pairs, strict=True))
        rate = len(labels) / seconds
        first_rate = first_rate or rate
        ddim = spec.process.sampler_name(spec) == "ddim"
        rows.append({"dataset": cfg.dataset, "images_from": spec.label, "guidance": spec.guidance_scale,
                     **({"eta": spec.eta} if ddim else {}), "network_calls": spec.network_calls, "n": len(labels),
                     **measure(classifier, images, labels, refs.features, seed, cfg.kid_blocks),
                     "latent_std": latents.std().item(), "latent_max": latents.abs().max().item(),
                     "seconds": seconds, "images_per_s": rate, "speed_up": rate / first_rate})
        if fig_prefix is not None:
            save_class_grid(images, labels, cfg.dataset, f"{fig_prefix}_{name}.png",
                            f"{cfg.dataset} LDM ({process_label}, {weights} weights): "
                            f"{spec.label}, eta {spec.eta:g}, w {spec.guidance_scale:g}, {cfg.profile} profile")
    return rows


def summary(rows: list[dict], cfg: LDMConfig) -> dict:
    """The headline numbers of one data set's `evaluate_ldm` rows (for fig/part2_summary.json): accuracies
    (fractions) and distances with their 95 % CIs, sample counts and images/s of the `report_samplers`, keyed by the
    sampler and its steps as run ("ddim_50_cond_acc", "ddpm_1000_kid_ci", "ddim_10_n" in smoke); the real images and
    their VAE reconstructions ("real_*", "recon_*"); DDIM's n, images/s, guidance and eta without a prefix; the
    training steps. The deterministic DDIM of "ddim_eta0" is keyed "ddim_50_eta0_*". "ddim50_*" and "ddpm1000_*"
    repeat the keys of DDIM-50 and DDPM-1000 where those ran (the report's keys). The first row of each sampler
    (its label and eta) counts."""

    def first(label: str, eta: float | None = None) -> dict:
        found = [r for r in rows if r["images_from"] == label and (eta is None or r.get("eta", 1.0) == eta)]
        if not found:
            raise ValueError(f"no row of {label!r} in the evaluation rows; evaluate_ldm with that sampler first")
        return found[0]

    specs = report_samplers(cfg)
    d = first(specs["ddim"].label, specs["ddim"].eta)
    out = {"n": d["n"], "guidance": d["guidance"], "eta": d["eta"], "train_steps": cfg.steps,
           "images_per_s": d["images_per_s"]}
    named = {spec.name + ("_eta0" if key == "ddim_eta0" else ""): first(spec.label, spec.eta)
             for key, spec in specs.items()}
    for key, row in (*named.items(), ("real", first("real test images (baseline)")),
                     ("recon", first("VAE reconstructions of them"))):
        out |= {f"{key}_cond_acc": row["cond_accuracy"], f"{key}_cond_acc_ci": list(row["cond_accuracy_ci"]),
                f"{key}_fd": row["feature_fd"], f"{key}_kid": row["kid"], f"{key}_kid_ci": list(row["kid_ci"])}
    for key, row in named.items():
        out |= {f"{key}_n": row["n"], f"{key}_images_per_s": row["images_per_s"]}
    for key in ("ddim_50", "ddpm_1000"):
        out |= {k.replace(key, key.replace("_", ""), 1): v for k, v in out.items() if k.startswith(f"{key}_")}
    return out


if __name__ == "__main__":
    sys.exit(main())
