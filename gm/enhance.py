"""Task 2.4: measured enhancements of the latent diffusion model of task 2.3.

Every experiment samples the same labels from the same start noise (one seed) and measures the images with the
2.3 metrics through `gm.ldm_eval.evaluate_ldm`: conditional accuracy (95 % CI), the classifier-feature Frechet distance
and kernel distance (KID, 95 % CI) to real test images, and wall time. Each runner returns table rows (dicts, for
`common.plotting.markdown_table`): first the reference rows (real test images, their VAE reconstructions; not timed;
`reference_rows` computes them once for all experiments, pass them as `refs`), then one timed row per setting.

- `step_sweep`: DDIM with 10 ... 1000 steps at each noise level eta (0 = deterministic ... 1 = DDPM-like), with
  and without limiting the predicted x0 (`LDMEnhanceConfig.x0_clip`), and ancestral DDPM with all T steps -> a
  quality-vs-time curve and the eta-by-steps table of the DDIM paper (`eta_table`);
- `gap_experiments` and `eps_bias`: what separates deterministic from stochastic DDIM (guidance, discretisation,
  training length, the x0 limit, the network's eps at each t);
- `guidance_sweep`: classifier-free guidance scale w (0 = unconditional, 1 = conditional model);
- `weights_comparison`: EMA weights vs raw weights of the same run;
- the enhancements that retrain the model are in `gm.enhance_retrain`: the variants of `VARIANTS` (cosine schedule,
  v-prediction, both) and rectified flow, each with the 2.3 model's training budget;
- the figures and tables in `gm.enhance_plots`.

Samplers are `gm.sampler.SamplerSpec`s (`ddim_spec` builds the experiments' DDIM); rows use machine keys
(`cond_accuracy`, `images_from`), shown by their display names only in rendered tables (`gm.enhance_plots.save_table`).
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
from gm.data import DATASETS
from gm.eval import Classifier
from gm.ldm import LDMRun, cached_latents, ldm_config, train_ldm
from gm.ldm_eval import References, evaluate_ldm, references
from gm.sampler import SamplerSpec

# Retrained variants of the 2.3 model: name -> LDMConfig overrides (everything else, budget included, unchanged).
VARIANTS = {
    "cosine schedule": {"schedule": "cosine"},
    "v-prediction": {"prediction": "v"},
    # The cosine schedule ends at abar_T ~ 2e-9, where eps-prediction's x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    # multiplies any eps error by 1/sqrt(abar) ~ 2e4; v-prediction's x0 = sqrt(abar) x_t - sqrt(1 - abar) v does not.
    "cosine + v-prediction": {"schedule": "cosine", "prediction": "v"},
}
METRICS = ("cond_accuracy", "kid")  # the two panels of the trade-off figures, each with its 95 % CI


@dataclass
class LDMEnhanceConfig:
    dataset: str = "mnist"
    samples_per_class: int = 10  # generated images per class in every measurement
    ddpm_samples_per_class: int | None = None  # of the 1000-step DDPM sampler (None: samples_per_class)
    ddim_steps: tuple[int, ...] = (10, 20, 50, 100, 1000)
    ddim_etas: tuple[float, ...] = (0.0, 1.0)  # DDIM noise levels of the step sweep (0: deterministic, 1: DDPM-like)
    compare_etas: tuple[float, ...] = (0.0, 1.0)  # DDIM noise levels of the variant and flow comparisons
    # Limit on the predicted x0 in normalised latent units (`SamplerSpec.clip_x0`, and `threshold`: dynamic
    # thresholding's quantile) of the sweep's extra eta = 0 curve and the gap experiments (None: no such rows).
    x0_clip: float | None = None
    x0_threshold: float | None = None
    longer_training: float = 0.0  # gap experiments: the 2.3 model retrained with this many times its steps (0: none)
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
        self.compare_etas = tuple(self.compare_etas)
        self.guidance_scales, self.variants = tuple(self.guidance_scales), tuple(self.variants)
        self.flow_calls, self.flow_datasets = tuple(self.flow_calls), tuple(self.flow_datasets)
        check(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        check(min(self.samples_per_class, self.ddpm_samples_per_class or 2) >= 2,
              "samples_per_class and ddpm_samples_per_class must be >= 2")
        check(all(s >= 1 for s in (*self.ddim_steps, self.compare_steps)), "DDIM step counts must be >= 1")
        check(all(w >= 0 for w in (*self.guidance_scales, self.guidance_scale or 0)), "guidance scales must be >= 0")
        check(bool(self.ddim_etas) and all(eta >= 0 for eta in (*self.ddim_etas, self.compare_eta)),
              "ddim_etas and compare_eta must be >= 0")
        check(bool(self.compare_etas) and min(self.compare_etas) >= 0, "compare_etas must be >= 0")
        check(self.x0_threshold is None or self.x0_clip is not None, "x0_threshold needs x0_clip (the data range)")
        check(self.longer_training == 0 or self.longer_training > 1, "longer_training must be 0 or > 1")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        check(not unknown, f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
        check(bool(self.flow_calls) and all(n >= 2 and n % 2 == 0 for n in self.flow_calls),
              f"flow_calls must be even numbers >= 2 (Heun takes two calls per step), got {self.flow_calls}")
        check(set(self.flow_datasets) <= set(DATASETS), f"flow_datasets must be in {DATASETS}")
        check(self.flow_samples_per_class >= 2, "flow_samples_per_class must be >= 2")


PRESETS = {
    "smoke": dict(profile="smoke", samples_per_class=2, ddim_steps=(2, 5), ddim_etas=(0.0,), compare_etas=(0.0,),
                  ddpm=False, guidance_scales=(0.0, 1.0, 2.0), compare_steps=5, flow_calls=(2, 4),
                  flow_samples_per_class=2),
    # x0 limit: dynamic thresholding at the 99.5th percentile into [-3, 3] (normalised latents: the MNIST test latents'
    # 99th / 99.9th percentiles of |z| are 2.9 / 3.9); in a probe of the quick MNIST model (DDIM-50, w 4, 300 samples)
    # it raised eta 0 from 0.75 to 0.93 accuracy, static clipping at 3 to 0.92 and at the data's max 6.5 to 0.86.
    # 2-core CPU, within 15 minutes: 300 images per measurement (50 for DDPM-1000 and DDIM-1000), four etas at 10,
    # 20 and 50 steps (100 steps changed nothing over 50 in the quick profile), one retrained variant, the 2.3 model
    # trained twice as long; the flow comparison at the few-step end (10 and 20 network calls): 500 images per point.
    "quick": dict(profile="quick", samples_per_class=30, ddpm_samples_per_class=5, ddim_steps=(10, 20, 50),
                  ddim_etas=(0.0, 0.2, 0.5, 1.0), guidance_scales=(0.0, 1.0, 2.0, 4.0, 6.0),
                  variants=("cosine schedule",), x0_clip=3.0, x0_threshold=0.995, longer_training=2.0,
                  flow_calls=(10, 20), flow_samples_per_class=50),
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


def measure_samplers(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig, samplers: dict[str, SamplerSpec],
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


def ddim_spec(run: LDMRun, cfg: LDMEnhanceConfig, steps: int | None, eta: float, guidance_scale: float | None = None,
              limit: bool = False) -> SamplerSpec:
    """DDIM on `run`'s process (all T steps if None) at `guidance_scale` (default: `guidance(run, cfg)`); with
    `limit`, the predicted x0 limited by `cfg.x0_clip` / `cfg.x0_threshold`."""
    w = guidance(run, cfg) if guidance_scale is None else guidance_scale
    clip, threshold = (cfg.x0_clip, cfg.x0_threshold) if limit else (None, None)
    return SamplerSpec(run.model.process, steps, eta=eta, guidance_scale=w, clip_x0=clip, threshold=threshold)


def step_sweep(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig,
               refs: References | None = None) -> list[dict]:
    """Quality vs sampling time: DDPM (all T steps; first, so "speed_up" is relative to it), then DDIM with each
    of `cfg.ddim_steps` steps for each noise level eta in `cfg.ddim_etas`, then (if `cfg.x0_clip`) deterministic
    DDIM with the x0 limit. Rows: the references, then one per sampler with "steps", (DDIM) "eta" and "x0_limit"
    ("-" or the limit) columns."""
    samplers = {"ddpm": ddim_spec(run, cfg, None, eta=1.0)} if cfg.ddpm else {}
    samplers |= {f"ddim{s}_eta{eta:g}": ddim_spec(run, cfg, s, eta) for eta in cfg.ddim_etas for s in cfg.ddim_steps}
    if cfg.x0_clip is not None:
        samplers |= {f"ddim{s}_eta0_limited": ddim_spec(run, cfg, s, 0.0, limit=True) for s in cfg.ddim_steps}
    references, samples = measure_samplers(run, classifier, cfg, samplers, refs=refs)
    for row, spec in zip(samples, samplers.values(), strict=True):
        row["steps"] = spec.num_steps
        row["x0_limit"] = x0_limit_label(spec)
    return references + samples


def x0_limit_label(spec: SamplerSpec) -> str:
    """ "-" (no limit), "clip 3" or "thr. 0.995, 3": the x0 limit of a sampler, for a table column."""
    if spec.clip_x0 is None:
        return "-"
    return f"clip {spec.clip_x0:g}" if spec.threshold is None else f"thr. {spec.threshold:g}, {spec.clip_x0:g}"


def eta_table(rows: Sequence[dict], metric: str = "cond_accuracy") -> list[dict]:
    """The step sweep's DDIM rows as the DDIM paper's Table 1: one row per (eta, x0 limit), one column per step
    count, each cell `metric` (with its CI where it has one)."""
    table: dict[tuple, dict] = {}
    for r in split_rows(rows)[1]:
        if "eta" not in r:
            continue
        ci = r.get(f"{metric}_ci")
        cell = f"{r[metric]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else "")
        table.setdefault((r["eta"], r.get("x0_limit", "-")), {"eta": r["eta"], "x0 limit": r.get("x0_limit", "-")})[
            f"{r['steps']} steps"] = cell
    return list(table.values())


def gap_experiments(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig,
                    refs: References | None = None) -> list[dict]:
    """What separates deterministic DDIM (eta = 0) from the stochastic samplers, each row with an "experiment"
    column, all from the same labels and start noise:

    - "guidance": DDIM-`compare_steps` at eta 0 and 1 with w = 1 (the conditional model), beside the guided rows of
      the step sweep;
    - "discretisation": deterministic DDIM with all T steps against ancestral DDPM-T (`cfg.ddpm_samples_per_class`
      images per class each, the step sweep's DDPM start noise);
    - "x0 limit": DDIM-`compare_steps` at eta 0 and 1 with the predicted x0 limited (`cfg.x0_clip`);
    - "training length": the 2.3 config retrained with `cfg.longer_training` times the steps, DDIM-`compare_steps` at
      eta 0 and 1 (and eta 0 with the x0 limit).
    """
    n, steps = cfg.samples_per_class, cfg.compare_steps
    experiments = [("guidance", run, {f"w1_eta{eta:g}": ddim_spec(run, cfg, steps, eta, 1.0) for eta in (0.0, 1.0)}, n),
                   ("discretisation", run, {"ddpm": ddim_spec(run, cfg, None, 1.0),
                                            "ddim_all_eta0": ddim_spec(run, cfg, run.config.timesteps, 0.0)},
                    cfg.ddpm_samples_per_class or n)]
    if cfg.x0_clip is not None:
        experiments.append(("x0 limit", run, {f"eta{eta:g}": ddim_spec(run, cfg, steps, eta, limit=True)
                                              for eta in (0.0, 1.0)}, n))
    if cfg.longer_training:
        longer = train_ldm(dataclasses.replace(run.config, steps=round(cfg.longer_training * run.config.steps),
                                               progress=cfg.progress), vae=run.vae)
        samplers = {f"eta{eta:g}": ddim_spec(longer, cfg, steps, eta) for eta in (0.0, 1.0)}
        if cfg.x0_clip is not None:
            samplers["eta0_limited"] = ddim_spec(longer, cfg, steps, 0.0, limit=True)
        experiments.append((f"training length x{cfg.longer_training:g}", longer, samplers, n))
    rows = []
    for name, r, samplers, count in experiments:
        references, samples = measure_samplers(r, classifier, cfg, samplers, refs=refs, samples_per_class=count)
        rows = rows or [{"experiment": "-", **row} for row in references]
        for sample, spec in zip(samples, samplers.values(), strict=True):
            sample.pop("speed_up", None)
            rows.append({"experiment": name, "train_steps": r.config.steps, "x0_limit": x0_limit_label(spec),
                         **sample})
    return rows


@torch.no_grad()
def eps_bias(run: LDMRun, fractions: Sequence[float] = (1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.02), num: int = 512,
             seed: int = 0) -> list[dict]:
    """How the EMA network's eps prediction errs at each timestep t = round(f (T - 1)) for f in `fractions` (T-1 = 999
    first: where sampling starts), on `num` test latents x0 (normalised) with
    fresh noise eps and their labels: x_t = q_sample(x0, t, eps), e = model(x_t, t, y). Per t: "eps_slope", the
    least-squares slope of e on eps (1: unbiased in scale; < 1: shrunk towards 0), "eps_mse" = mean (e - eps)^2,
    "x0_rmse", the RMS error of x0_hat = (x_t - sqrt(1 - abar) e) / sqrt(abar), and "x0_hat_max", its largest
    |value| (the data's is a few units)."""
    model, process = run.ema_model, run.ema_model.process
    device = next(model.parameters()).device
    z, y = cached_latents(run.vae, run.config.dataset, "test", num, seed=seed)
    x0, y = model.normalize(z.to(device)), y.to(device)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t in dict.fromkeys(round(f * (process.timesteps - 1)) for f in fractions):
        eps = torch.randn(x0.shape, generator=gen).to(device)
        t_batch = torch.full((len(x0),), t, device=device)
        x_t = process.q_sample(x0, t_batch, eps)
        e = model(x_t, t_batch, y)
        x0_hat = process.split_prediction(x_t, t_batch, e)[0]
        rows.append({"t": t, "abar_t": process.alphas_cumprod[t].item(),
                     "eps_slope": ((e * eps).sum() / eps.pow(2).sum()).item(),
                     "eps_mse": (e - eps).pow(2).mean().item(),
                     "x0_rmse": (x0_hat - x0).pow(2).mean().sqrt().item(), "x0_hat_max": x0_hat.abs().max().item()})
    return rows


def guidance_sweep(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig,
                   fig_prefix: str | Path | None = None, refs: References | None = None) -> list[dict]:
    """Classifier-free guidance eps_u + w (eps_c - eps_u) for each w in `cfg.guidance_scales`, DDIM with
    `cfg.compare_steps` steps and noise `cfg.compare_eta`. With `fig_prefix`, a class grid per scale:
    `{fig_prefix}_w{w:g}.png`."""
    samplers = {f"w{w:g}": ddim_spec(run, cfg, cfg.compare_steps, cfg.compare_eta, w) for w in cfg.guidance_scales}
    references, samples = measure_samplers(run, classifier, cfg, samplers, fig_prefix=fig_prefix, refs=refs)
    return references + samples


def weights_comparison(run: LDMRun, classifier: Classifier, cfg: LDMEnhanceConfig,
                       refs: References | None = None) -> list[dict]:
    """The same run sampled with its EMA weights and with its raw (last-step) weights, plus the final
    fixed-noise validation loss of each. Rows: the references, EMA, raw."""
    last_eval = run.eval_rows[-1] if run.eval_rows else {}
    rows = []
    for use_ema, label, loss_key in ((True, "EMA", "val_loss_ema"), (False, "raw", "val_loss")):
        sampler = {"ddim": ddim_spec(run, cfg, cfg.compare_steps, cfg.compare_eta)}
        references, (sample,) = measure_samplers(run, classifier, cfg, sampler, use_ema=use_ema, refs=refs)
        rows = rows or [{"weights": "-", **r} for r in references]
        rows.append({"weights": label, **sample, "val_loss": last_eval.get(loss_key, math.nan)})
    return rows


def split_rows(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(reference rows, sample rows) of an experiment table: only sample rows were timed."""
    return [r for r in rows if "seconds" not in r], [r for r in rows if "seconds" in r]


def machine_key(value: object, key: str = "") -> str:
    """A row value as a JSON key: floats by `:g`, "eta" values as "eta0.2", text in snake case ("DDIM-50 x0 thr.
    0.995" -> "ddim_50_x0_thr_0.995", "2.3 model" -> "2.3_model", "EMA" -> "ema")."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if key == "eta":
        return f"eta{text}"
    return re.sub(r"[^a-z0-9.]+", "_", text.lower()).replace("._", "_").strip("_.")


def headline(rows: Sequence[dict], label_keys: Sequence[str]) -> dict[str, dict]:
    """The timed rows of an experiment as {label: {n, cond_acc, cond_acc_ci, fd, kid, kid_ci, images_per_s,
    latent_std, latent_max}} for fig/part2_summary.json; a row's label joins the `machine_key`s of its `label_keys`
    values with "_" (e.g. "ddim_50_eta1" for ("images_from", "eta")); the display names stay in the tables."""
    return {"_".join(machine_key(r[k], k) for k in label_keys if k in r): {
        "n": r["n"], "cond_acc": r["cond_accuracy"], "cond_acc_ci": list(r["cond_accuracy_ci"]),
        "fd": r["feature_fd"], "kid": r["kid"], "kid_ci": list(r["kid_ci"]), "images_per_s": r["images_per_s"],
        **{k: r[k] for k in ("latent_std", "latent_max") if k in r}}
        for r in split_rows(rows)[1]}
