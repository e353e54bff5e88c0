"""Class-conditional latent diffusion (task 2.3): a UNet denoiser trained with the DDPM loss on VAE latents.

The generative process is a registry entry (`PROCESSES`, picked by `LDMConfig.process`): the DDPM of task 2.3
(`gm.diffusion.GaussianDiffusion`) or the rectified flow of 2.4 (`gm.flow.RectifiedFlow`); training calls the
process's `training_loss`, sampling runs a `gm.sampler.SamplerSpec` on it.

Pipeline: encode the data set once with the frozen VAE of task 2.1 (posterior means, cached per VAE weights),
normalise the latents per channel (mean/std are buffers of `LatentDiffusion`, so they travel with the
checkpoint), train the UNet with `common.trainer.Trainer` (EMA of the weights, label dropout for classifier-free
guidance), sample latents with DDPM or DDIM and decode them with the VAE decoder (`gm.ldm_eval` samples and
measures a run).

Several GPUs: `torchrun --nproc_per_node=8 -m gm.ldm train --profile full --dataset cifar10` (or HW3_NPROC=8, which
makes `train_ldm` launch that itself). Rank 0 encodes and caches the latents (the others wait), each rank trains on
batch_size / N latents of the step's batch with its own timesteps and noise, and the validation loss is shared out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common import cache_dir, checkpoint_dir, dist, get_device, make_config, seed_everything
from common.config import RunConfig, added_field, bookkeeping, check, config_digest
from common.data import batch_indices
from common.ema import EMA
from common.io import atomic_save
from common.optim import build_optimizer, warmup_cosine
from common.params import weights_digest  # the VAE's identity in latent caches and LDM run names
from common.run import Run
from common.trainer import Metrics, Trainer
from gm.data import DATASETS, load_dataset, subset_indices
from gm.diffusion import PREDICTIONS, SCHEDULES, GaussianDiffusion
from gm.flow import RectifiedFlow
from gm.model import VAE
from gm.sampler import Process, SamplerSpec, sample
from gm.unet import UNet
from gm.vae import load_or_train_vae

NUM_CLASSES = 10


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
    # mostly to CIFAR-10). Metrics on 1,000 DDIM samples (100 per class; 500 on MNIST, whose accuracies sit near 1)
    # against 5,000 real test images; DDPM-1000 costs 20x more model calls per image, so it gets 5 per class on
    # CIFAR-10 (its CI says so) and 30 on MNIST, where it is the reference deterministic DDIM-50 is held to (>= 300
    # samples each). MNIST's DDIM limits the predicted
    # x0 by dynamic thresholding (2.4: it lifts deterministic DDIM, and leaves eta = 1 as it is); CIFAR-10's latents
    # were not measured with it, so they sample without. Sampling in batches of 250 (500
    # with guidance): a UNet call on the 8x8 latents ran at more images/s at batch 200 than at 2,000 on this CPU.
    "quick": dict(profile="quick", batch_size=128, base_channels=32, lr=2e-3, warmup_steps=100, max_train=None,
                  eval_interval=250, eval_size=512, samples_per_class=100, ddpm_samples_per_class=5,
                  reference_size=5000, sample_batch_size=250, ddim_steps=50, ema_decay=0.995, guidance_scale=4.0,
                  by_dataset={"mnist": dict(steps=400, samples_per_class=50, ddpm_samples_per_class=30,
                                            ddim_clip_x0=3.0, ddim_threshold=0.995),
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


if __name__ == "__main__":
    sys.exit(main())
