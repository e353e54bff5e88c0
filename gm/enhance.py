"""Task 2.4: measured enhancements of the latent diffusion model of task 2.3.

Every experiment samples the same labels from the same start noise (one seed) and measures the images with the
2.3 metrics through `gm.ldm.evaluate_ldm`: conditional accuracy (95 % CI), the classifier-feature Frechet distance
and kernel distance (KID, 95 % CI) to real test images, and wall time. Each runner returns table rows (dicts, for
`common.plotting.markdown_table`): first the reference rows (real test images, their VAE reconstructions; not timed;
`reference_rows` computes them once for all experiments, pass them as `refs`), then one timed row per setting.

- `step_sweep`: DDIM with 10 ... 1000 steps, deterministic (eta = 0) and stochastic (eta = 1), and ancestral DDPM
  with all T steps -> a quality-vs-time curve;
- `guidance_sweep`: classifier-free guidance scale w (0 = unconditional, 1 = conditional model);
- `weights_comparison`: EMA weights vs raw weights of the same run;
- `variant_comparison`: the 2.3 model against retrained variants (`VARIANTS`: cosine schedule, v-prediction, both)
  with the same training budget (steps, batch size, learning rate, seed, VAE);
- `flow_comparison`: rectified flow (`gm.flow`, the same UNet, latents, guidance and budget) sampled with Euler and
  Heun against the 2.3 model's DDIM at equal network calls per image.

Samplers are `gm.sampler.SamplerSpec`s; rows use machine keys (`cond_accuracy`, `images_from`), shown by their
display names only in rendered tables (`save_table`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common import get_profile, make_config
from common.config import check
from common.plotting import new_figure, save_figure
from gm.data import DATASETS
from gm.diffusion import GaussianDiffusion
from gm.eval import Classifier
from gm.ldm import DISPLAY_NAMES, LDMRun, References, evaluate_ldm, ldm_config, references, table, train_ldm
from gm.sampler import SamplerSpec

# Retrained variants of the 2.3 model: name -> LDMConfig overrides (everything else, budget included, unchanged).
VARIANTS = {
    "cosine schedule": {"schedule": "cosine"},
    "v-prediction": {"prediction": "v"},
    # The cosine schedule ends at abar_T ~ 2e-9, where eps-prediction's x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    # multiplies any eps error by 1/sqrt(abar) ~ 2e4; v-prediction's x0 = sqrt(abar) x_t - sqrt(1 - abar) v does not.
    "cosine + v-prediction": {"schedule": "cosine", "prediction": "v"},
}
METRICS = ("cond_accuracy", "feature_fd")


@dataclass
class LDMEnhanceConfig:
    dataset: str = "mnist"
    samples_per_class: int = 10  # generated images per class in every measurement
    ddpm_samples_per_class: int | None = None  # of the 1000-step DDPM sampler (None: samples_per_class)
    ddim_steps: tuple[int, ...] = (10, 20, 50, 100, 1000)
    ddim_etas: tuple[float, ...] = (0.0, 1.0)  # DDIM noise levels of the step sweep (0: deterministic, 1: DDPM-like)
    ddpm: bool = True  # add the ancestral DDPM sampler (all T steps) to the step sweep
    guidance_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    compare_steps: int = 50  # DDIM steps of the guidance, EMA and variant comparisons
    # DDIM eta of those comparisons: 1 (stochastic), because the step sweep of the quick profile found eta = 1 far
    # better than eta = 0 at every step count with guidance 4.
    compare_eta: float = 1.0
    guidance_scale: float | None = None  # of the step sweep, EMA and variant comparisons (None: the 2.3 setting)
    variants: tuple[str, ...] = ("cosine schedule",)
    # flow matching vs DDIM: network calls per image (Heun: half as many steps), data sets, images per class
    flow_calls: tuple[int, ...] = (10, 20, 50)
    flow_datasets: tuple[str, ...] = ("mnist", "cifar10")
    flow_samples_per_class: int = 100
    seed: int = 0
    profile: str = "quick"
    progress: bool = True

    def __post_init__(self):
        self.ddim_steps, self.ddim_etas = tuple(self.ddim_steps), tuple(self.ddim_etas)
        self.guidance_scales, self.variants = tuple(self.guidance_scales), tuple(self.variants)
        self.flow_calls, self.flow_datasets = tuple(self.flow_calls), tuple(self.flow_datasets)
        check(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        check(min(self.samples_per_class, self.ddpm_samples_per_class or 2) >= 2,
              "samples_per_class and ddpm_samples_per_class must be >= 2")
        check(all(s >= 1 for s in (*self.ddim_steps, self.compare_steps)), "DDIM step counts must be >= 1")
        check(all(w >= 0 for w in (*self.guidance_scales, self.guidance_scale or 0)), "guidance scales must be >= 0")
        check(bool(self.ddim_etas) and all(eta >= 0 for eta in (*self.ddim_etas, self.compare_eta)),
              "ddim_etas and compare_eta must be >= 0")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        check(not unknown, f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
        check(bool(self.flow_calls) and all(n >= 2 and n % 2 == 0 for n in self.flow_calls),
              f"flow_calls must be even numbers >= 2 (Heun takes two calls per step), got {self.flow_calls}")
        check(set(self.flow_datasets) <= set(DATASETS), f"flow_datasets must be in {DATASETS}")
        check(self.flow_samples_per_class >= 2, "flow_samples_per_class must be >= 2")


PRESETS = {
    "smoke": dict(profile="smoke", samples_per_class=2, ddim_steps=(2, 5), ddim_etas=(0.0,), ddpm=False,
                  guidance_scales=(0.0, 1.0, 2.0), compare_steps=5, flow_calls=(2, 4), flow_samples_per_class=2),
    # 2-core CPU, a few minutes: 300 images per measurement (100 for DDPM-1000), one retrained variant; the flow
    # comparison: 1,000 images per point.
    "quick": dict(profile="quick", samples_per_class=30, ddpm_samples_per_class=10, ddim_steps=(10, 20, 50, 100),
                  guidance_scales=(0.0, 1.0, 2.0, 4.0, 6.0), variants=("cosine schedule",)),
    "full": dict(profile="full", samples_per_class=100, ddim_steps=(10, 20, 50, 100, 250, 1000),
                 guidance_scales=(0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), variants=tuple(VARIANTS)),
}


def ldm_enhance_config(profile: str | None = None, **overrides) -> LDMEnhanceConfig:
    """The preset of `profile` (default $HW3_PROFILE), with overrides (unknown keys are rejected)."""
    return make_config(LDMEnhanceConfig, PRESETS, get_profile(profile), **overrides)


def load_baseline(cfg: LDMEnhanceConfig) -> LDMRun:
    """The 2.3 latent diffusion model of the profile: loaded from its checkpoint (notebook 2_3), trained if missing."""
    return train_ldm(ldm_config(cfg.dataset, cfg.profile, progress=cfg.progress))


# ------------------------------------------------------------------------------------------------- experiments


def reference_rows(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig,
                   samples_per_class: int | None = None) -> References:
    """The reference features and baseline rows (as many real images as an experiment generates: `samples_per_class`
    per class, default `cfg.samples_per_class`) that every experiment of `cfg` on `run`'s VAE compares with: compute
    once, pass as `refs`."""
    return references(run, classifier, 10 * (samples_per_class or cfg.samples_per_class), cfg.seed)


def guidance(run: LDMRun, cfg: LDMEnhanceConfig) -> float:
    """The guidance scale of the experiments: `cfg.guidance_scale`, or the 2.3 setting of `run` if None."""
    return run.config.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale


def _measure(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig, samplers: dict[str, SamplerSpec],
             use_ema: bool = True, fig_prefix: str | Path | None = None, refs: References | None = None,
             samples_per_class: int | None = None) -> tuple[list[dict], list[dict]]:
    """`evaluate_ldm` with the experiment's sample counts (`samples_per_class`, default `cfg.samples_per_class`;
    `cfg.ddpm_samples_per_class` for a DDPM sampler) and seed: (reference rows (real test images, their VAE
    reconstructions), one row per sampler in the order of `samplers`)."""
    n = samples_per_class or cfg.samples_per_class
    counts = {name: (cfg.ddpm_samples_per_class or n) if spec.process.sampler_name(spec) == "ddpm" else n
              for name, spec in samplers.items()}
    rows = evaluate_ldm(run, classifier, samplers, counts, fig_prefix=fig_prefix, use_ema=use_ema, seed=cfg.seed,
                        refs=refs or reference_rows(run, classifier, cfg, n), progress=cfg.progress)
    references, samples = rows[: -len(samplers)], rows[-len(samplers):]
    if len(samples) == 1:
        del samples[0]["speed_up"]  # relative to itself
    return references, samples


def _ddim(run: LDMRun, cfg: LDMEnhanceConfig, steps: int | None, eta: float, guidance_scale: float | None = None
          ) -> SamplerSpec:
    """DDIM on `run`'s process (all T steps if None) at `guidance_scale` (default: `guidance(run, cfg)`)."""
    w = guidance(run, cfg) if guidance_scale is None else guidance_scale
    return SamplerSpec(run.model.process, steps, eta=eta, guidance_scale=w)


def step_sweep(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig,
               refs: References | None = None) -> list[dict]:
    """Quality vs sampling time: DDPM (all T steps; first, so "speed_up" is relative to it), then DDIM with each
    of `cfg.ddim_steps` steps for each noise level eta in `cfg.ddim_etas`. Rows: the references, then one per
    sampler with "steps" and (DDIM) "eta" columns."""
    samplers = {"ddpm": _ddim(run, cfg, None, eta=1.0)} if cfg.ddpm else {}
    samplers |= {f"ddim{s}_eta{eta:g}": _ddim(run, cfg, s, eta) for eta in cfg.ddim_etas for s in cfg.ddim_steps}
    references, samples = _measure(run, classifier, cfg, samplers, refs=refs)
    for row, spec in zip(samples, samplers.values(), strict=True):
        row["steps"] = spec.num_steps
    return references + samples


def guidance_sweep(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig,
                   fig_prefix: str | Path | None = None, refs: References | None = None) -> list[dict]:
    """Classifier-free guidance eps_u + w (eps_c - eps_u) for each w in `cfg.guidance_scales`, DDIM with
    `cfg.compare_steps` steps and noise `cfg.compare_eta`. With `fig_prefix`, a class grid per scale:
    `{fig_prefix}_w{w:g}.png`."""
    samplers = {f"w{w:g}": _ddim(run, cfg, cfg.compare_steps, cfg.compare_eta, w) for w in cfg.guidance_scales}
    references, samples = _measure(run, classifier, cfg, samplers, fig_prefix=fig_prefix, refs=refs)
    return references + samples


def weights_comparison(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig,
                       refs: References | None = None) -> list[dict]:
    """The same run sampled with its EMA weights and with its raw (last-step) weights, plus the final
    fixed-noise validation loss of each. Rows: the references, EMA, raw."""
    last_eval = run.eval_rows[-1] if run.eval_rows else {}
    rows = []
    for use_ema, label, loss_key in ((True, "EMA", "val_loss_ema"), (False, "raw", "val_loss")):
        sampler = {"ddim": _ddim(run, cfg, cfg.compare_steps, cfg.compare_eta)}
        references, (sample,) = _measure(run, classifier, cfg, sampler, use_ema=use_ema, refs=refs)
        rows = rows or [{"weights": "-", **r} for r in references]
        rows.append({"weights": label, **sample, "val_loss": last_eval.get(loss_key, math.nan)})
    return rows


def train_variant(run: LDMRun, name: str, progress: bool = True) -> LDMRun:
    """`run`'s model retrained with the overrides of VARIANTS[name] and otherwise the same config (the same
    budget, data, VAE and seed). Cached like any LDM run: a finished variant is only loaded."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    return train_ldm(dataclasses.replace(run.config, progress=progress, **VARIANTS[name]), vae=run.vae)


def training_seconds(run: LDMRun) -> float:
    """Wall time of the training steps of a run (sum of the logged step times)."""
    return sum(r.get("step_time", 0.0) for r in run.train_rows)


def variant_comparison(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig,
                       fig_prefix: str | Path | None = None, refs: References | None = None) -> list[dict]:
    """The 2.3 model against each variant of `cfg.variants`, trained with the same budget and sampled identically
    (DDIM with `cfg.compare_steps` steps, EMA weights) for each eta of `cfg.ddim_etas`. Rows: the references, then
    one per (model, eta). With `fig_prefix`, class grids `{fig_prefix}_{model}_eta{eta}.png`."""
    runs = {"2.3 model": run} | {name: train_variant(run, name, cfg.progress) for name in cfg.variants}
    rows = []
    for name, r in runs.items():
        prefix = None if fig_prefix is None else f"{fig_prefix}_{re.sub(r'[^a-z0-9.]+', '_', name)}"
        samplers = {f"eta{eta:g}": _ddim(r, cfg, cfg.compare_steps, eta) for eta in cfg.ddim_etas}
        references, samples = _measure(r, classifier, cfg, samplers, fig_prefix=prefix, refs=refs)
        rows = rows or [{"model": "-", **row} for row in references]
        for sample, spec in zip(samples, samplers.values(), strict=True):
            sample.pop("speed_up", None)
            rows.append({"model": name, "schedule": r.config.schedule, "prediction": r.config.prediction,
                         "train_steps": r.config.steps, "train_seconds": training_seconds(r), "eta": spec.eta,
                         **sample})
    return rows


def train_flow(run: LDMRun, progress: bool = True) -> LDMRun:
    """`run`'s model retrained as a rectified flow (`LDMConfig.process = "flow"`): the same UNet, data, VAE, seed
    and budget. Cached like any LDM run."""
    return train_ldm(dataclasses.replace(run.config, process="flow", progress=progress), vae=run.vae)


def flow_comparison(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig, flow: LDMRun | None = None,
                    refs: References | None = None) -> list[dict]:
    """Rectified flow against DDIM at equal network calls per image: for each n in `cfg.flow_calls`, DDIM with n
    steps on `run` for each eta of `cfg.ddim_etas`, and the flow model (`flow`, trained by `train_flow` if None)
    with n Euler steps and n / 2 Heun steps; all at `guidance(run, cfg)`, `cfg.flow_samples_per_class` images per
    class, EMA weights. Rows: the references, then one per (sampler, calls) with a "model" column."""
    flow = flow or train_flow(run, cfg.progress)
    w, n = guidance(run, cfg), cfg.flow_samples_per_class
    refs = refs or reference_rows(run, classifier, cfg, n)
    rows = []
    for calls in cfg.flow_calls:
        for model, samplers in (
                ("2.3 DDPM", {f"ddim{calls}_eta{eta:g}": _ddim(run, cfg, calls, eta, w) for eta in cfg.ddim_etas}),
                ("flow", {f"{solver}{calls}": SamplerSpec(flow.model.process, calls // order, guidance_scale=w,
                                                         solver=solver)
                          for solver, order in (("euler", 1), ("heun", 2))})):
            references, samples = _measure(run if model != "flow" else flow, classifier, cfg, samplers, refs=refs,
                                           samples_per_class=n)
            rows = rows or [{"model": "-", **r} for r in references]
            for sample in samples:
                sample.pop("speed_up", None)  # relative to the other sampler of the call only
                rows.append({"model": model, **sample})
    return rows


def headline(rows: Sequence[dict], label_keys: Sequence[str]) -> dict[str, dict]:
    """The timed rows of an experiment as {label: {n, cond_acc, cond_acc_ci, fd, kid, kid_ci, images_per_s}} for
    fig/part2_summary.json; a row's label joins its `label_keys` values with "_" (e.g. "DDIM-50_1" for
    ("images_from", "eta"))."""
    return {"_".join(f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in label_keys if k in r): {
        "n": r["n"], "cond_acc": r["cond_accuracy"], "cond_acc_ci": list(r["cond_accuracy_ci"]),
        "fd": r["feature_fd"], "kid": r["kid"], "kid_ci": list(r["kid_ci"]), "images_per_s": r["images_per_s"]}
        for r in _split(rows)[1]}


# ------------------------------------------------------------------------------------------------- figures


def save_table(rows: Sequence[dict], path: str | Path, caption: str) -> str:
    """Write `caption` and the markdown table of `rows` (display names as headers) to `path` (for the report);
    returns the text."""
    text = f"{caption}\n\n{table(rows)}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def _split(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(reference rows, sample rows) of an experiment table: only sample rows were timed."""
    return [r for r in rows if "seconds" not in r], [r for r in rows if "seconds" in r]


def plot_tradeoff(curves: dict[str, Sequence[dict]], x: str, path: str | Path, title: str, xlabel: str,
                  references: Sequence[dict] = (), logx: bool = False, annotate: str | None = None) -> Path:
    """Conditional accuracy and feature FD (two panels) against row key `x` for each named list of rows.
    `references` (real images, VAE reconstructions) are drawn as horizontal lines; `annotate`: a row key written
    next to each point."""
    fig, axes = new_figure(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, METRICS, strict=True):
        for label, rows in curves.items():
            xs, ys = [r[x] for r in rows], [r[metric] for r in rows]
            ax.plot(xs, ys, marker="o", label=label)
            if annotate:
                for r, xv, yv in zip(rows, xs, ys, strict=True):
                    ax.annotate(f"{r[annotate]:g}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for ref, style in zip(references, ("--", ":", "-."), strict=False):
            ax.axhline(ref[metric], color="gray", linestyle=style, label=ref["images_from"])
        better = " (higher is better)" if metric == METRICS[0] else " (lower is better)"
        ax.set(xlabel=xlabel, ylabel=DISPLAY_NAMES[metric] + better)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_step_sweep(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """The step sweep as quality vs sampling seconds (log), points labelled with their step count."""
    references, samples = _split(rows)
    etas = dict.fromkeys(r["eta"] for r in samples if "eta" in r)
    curves = {f"DDIM (eta = {eta:g})": [r for r in samples if r.get("eta") == eta] for eta in etas}
    ddpm = [r for r in samples if r["images_from"].startswith("DDPM")]
    curves |= {"DDPM (ancestral)": ddpm} if ddpm else {}
    return plot_tradeoff(curves, "seconds", path, title, "sampling seconds (log scale)", references, logx=True,
                         annotate="steps")


def plot_flow_comparison(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """The flow comparison as quality against network calls per image (log), one curve per sampler (and eta)."""
    references, samples = _split(rows)
    curves: dict[str, list[dict]] = {}
    for r in samples:
        name = r["images_from"].rsplit("-", 1)[0] + (f" (eta = {r['eta']:g})" if "eta" in r else "")
        curves.setdefault(name, []).append(r)
    return plot_tradeoff(curves, "network_calls", path, title, "network calls per image (log scale)", references,
                         logx=True)


def plot_guidance_sweep(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """The guidance sweep: quality against the guidance scale w."""
    references, samples = _split(rows)
    return plot_tradeoff({samples[0]["images_from"]: samples}, "guidance", path, title, "guidance scale w",
                         references)


def log_snr(diffusion: GaussianDiffusion) -> torch.Tensor:
    """(T,) log signal-to-noise ratio log(abar_t / (1 - abar_t)) of a schedule."""
    abar = diffusion.alphas_cumprod.double()
    return (abar / (1 - abar)).log()


def plot_schedules(path: str | Path, title: str, timesteps: int = 1000) -> Path:
    """abar_t and log SNR of the linear and cosine schedules (the cosine one destroys information more evenly)."""
    fig, axes = new_figure(1, 2, figsize=(10, 3.8))
    t = torch.arange(timesteps)
    for schedule in ("linear", "cosine"):
        diffusion = GaussianDiffusion(timesteps, schedule=schedule)
        axes[0].plot(t, diffusion.alphas_cumprod, label=schedule)
        axes[1].plot(t, log_snr(diffusion), label=schedule)
    axes[0].set(xlabel="t", ylabel=r"$\bar\alpha_t$")
    axes[1].set(xlabel="t", ylabel=r"log SNR $= \log \bar\alpha_t / (1 - \bar\alpha_t)$")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
