"""Sampling and measuring the latent diffusion model of task 2.3 (`gm.ldm`): the report's samplers
(`report_samplers`), class-conditional images from a run (`generate`), the metrics of a sample set against real test
images (`measure`, `references`), the evaluation rows of every sampler (`evaluate_ldm`) and their headline numbers
(`summary`), and the loss curves of a run (`plot_loss`). Rows use machine keys; `table` renders their
`DISPLAY_NAMES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from common.checks import wilson_interval
from common.device import timed
from common.logging import trailing_mean
from common.memo import RecentResults
from common.params import weights_digest
from common.plotting import make_grid, markdown_table, new_figure, plot_curves, save_figure
from gm.data import CIFAR10_CLASSES, load_dataset, subset_indices
from gm.diffusion import GaussianDiffusion
from gm.eval import Classifier, predict
from gm.frechet import FrechetReference, frechet_distance, kernel_distance
from gm.ldm import NUM_CLASSES, PROCESSES, LDMConfig, LDMRun
from gm.sampler import Process, SamplerSpec

CLASS_NAMES = {"mnist": tuple(str(i) for i in range(10)), "cifar10": CIFAR10_CLASSES}


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


# Display names of the evaluation rows' machine keys, used only when a table is rendered (`table`).
DISPLAY_NAMES = {"images_from": "images from", "cond_accuracy": "cond. accuracy", "cond_accuracy_ci": "acc. 95% CI",
                 "feature_fd": "feature FD", "kid": "KID", "kid_ci": "KID 95% CI", "images_per_s": "images/s",
                 "speed_up": "speed-up", "network_calls": "network calls", "val_loss": "val. loss",
                 "train_steps": "train steps", "train_seconds": "train seconds",
                 "classifier_test_acc": "classifier test acc.", "latent_std": "latent std",
                 "latent_max": "latent max |z|"}


def table(rows: list[dict]) -> str:
    """Markdown table of evaluation rows, machine keys shown by their `DISPLAY_NAMES`."""
    return markdown_table(rows, names=DISPLAY_NAMES)


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


# Sample sets drawn in this process, by everything that fixes the draw (`sample_set`). 2.4's experiments share sample
# sets: the step sweep's DDPM-1000 is the gap experiment's, and the guidance, EMA and variant comparisons each repeat
# one of the sweep's DDIM-50 sets; a set is a few MB of images.
_SAMPLE_SETS: RecentResults[tuple[Tensor, Tensor, float]] = RecentResults(kept=32)


def sample_set(run: LDMRun, spec: SamplerSpec, labels: Tensor, use_ema: bool = True, seed: int = 0,
               progress: bool = True) -> tuple[Tensor, Tensor, float]:
    """(images (N, C, 32, 32), normalised latents, seconds of sampling and decoding) for class `labels` (N,), drawn
    `run.config.sample_batch_size` at a time from one generator seeded with `seed` (`generate_with_latents`).

    The same draw asked again in this process (the same sampling network (weights and settings), VAE weights,
    sampler, labels, seed and batch size) is returned from memory, with the seconds it took the first time, instead
    of being sampled again: it would come out the same. The last 32 sets are kept.
    """
    model = run.ema_model if use_ema else run.model
    device = next(model.parameters()).device
    key = (weights_digest(model), repr(model), repr(model.process), weights_digest(run.vae), repr(spec.process),
           *(getattr(spec, f.name) for f in fields(spec) if f.name != "process"),
           tuple(labels.tolist()), seed, run.config.sample_batch_size, str(device))

    def draw() -> tuple[Tensor, Tensor, float]:
        generator = torch.Generator(device).manual_seed(seed)
        pairs, seconds = timed(lambda: [generate_with_latents(run, chunk, spec, use_ema, generator, progress)
                                        for chunk in labels.split(run.config.sample_batch_size)], device)
        images, latents = (torch.cat(parts) for parts in zip(*pairs, strict=True))
        return images, latents, seconds

    return _SAMPLE_SETS.get(key, draw)


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
                            "SamplerSpec(run.model.process, steps=50, eta=1.0) or gm.ldm_eval.report_samplers(config)")

    def default_count(spec: SamplerSpec) -> int:
        return cfg.ddpm_samples_per_class if spec.process.sampler_name(spec) == "ddpm" else cfg.samples_per_class

    counts = {name: samples_per_class if isinstance(samples_per_class, int)
              else (samples_per_class or {}).get(name, default_count(spec)) for name, spec in samplers.items()}
    refs = refs or references(run, classifier, NUM_CLASSES * max(counts.values()), seed)
    rows = [dict(r) for r in refs.rows]
    weights = "EMA" if use_ema else "raw"
    process_label = (f"{cfg.schedule}, {cfg.prediction}-pred." if isinstance(model.process, GaussianDiffusion)
                     else cfg.process)
    first_rate = None
    for name, spec in samplers.items():
        labels = class_labels(counts[name])
        images, latents, seconds = sample_set(run, spec, labels, use_ema, seed, progress)
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
