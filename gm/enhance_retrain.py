"""Task 2.4 enhancements that retrain the 2.3 latent diffusion model with its training budget (steps, batch size,
learning rate, seed, VAE), measured as `gm.enhance` measures samplers:

- `variant_comparison`: the 2.3 model against retrained variants (`gm.enhance.VARIANTS`: cosine schedule,
  v-prediction, both);
- `flow_comparison`: rectified flow (`gm.flow`, the same UNet, latents, guidance and budget) sampled with Euler and
  Heun against the 2.3 model's DDIM at equal network calls per image; `flow_verdict` tells them apart by their CIs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from gm.enhance import (
    VARIANTS,
    LDMEnhanceConfig,
    ddim_spec,
    guidance,
    machine_key,
    measure_samplers,
    reference_rows,
    split_rows,
)
from gm.eval import Classifier
from gm.ldm import LDMRun, train_ldm
from gm.ldm_eval import References
from gm.sampler import SamplerSpec


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
    (DDIM with `cfg.compare_steps` steps, EMA weights) for each eta of `cfg.compare_etas`. Rows: the references, then
    one per (model, eta). With `fig_prefix`, class grids `{fig_prefix}_{model}_eta{eta}.png`."""
    runs = {"2.3 model": run} | {name: train_variant(run, name, cfg.progress) for name in cfg.variants}
    rows = []
    for name, r in runs.items():
        prefix = None if fig_prefix is None else f"{fig_prefix}_{machine_key(name)}"
        samplers = {f"eta{eta:g}": ddim_spec(r, cfg, cfg.compare_steps, eta) for eta in cfg.compare_etas}
        references, samples = measure_samplers(r, classifier, cfg, samplers, fig_prefix=prefix, refs=refs)
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
    steps on `run` for each eta of `cfg.compare_etas`, and the flow model (`flow`, trained by `train_flow` if None)
    with n Euler steps and n / 2 Heun steps; all at `guidance(run, cfg)`, `cfg.flow_samples_per_class` images per
    class, EMA weights. Rows: the references, then one per (sampler, calls) with a "model" column."""
    flow = flow or train_flow(run, cfg.progress)
    w, n = guidance(run, cfg), cfg.flow_samples_per_class
    refs = refs or reference_rows(run, classifier, cfg, n)
    rows = []
    for calls in cfg.flow_calls:
        for model, samplers in (
                ("2.3 DDPM", {f"ddim{calls}_eta{eta:g}": ddim_spec(run, cfg, calls, eta, w)
                              for eta in cfg.compare_etas}),
                ("flow", {f"{solver}{calls}": SamplerSpec(flow.model.process, calls // order, guidance_scale=w,
                                                         solver=solver)
                          for solver, order in (("euler", 1), ("heun", 2))})):
            references, samples = measure_samplers(run if model != "flow" else flow, classifier, cfg, samplers,
                                                   refs=refs, samples_per_class=n)
            rows = rows or [{"model": "-", **r} for r in references]
            for sample in samples:
                sample.pop("speed_up", None)  # relative to the other sampler of the call only
                rows.append({"model": model, **sample})
    return rows


def compare_rates(a: dict, b: dict) -> str:
    """How row a's conditional accuracy compares with row b's, told apart by their 95 % CIs: "higher than" (a's
    interval wholly above b's), "lower than", or "not different from" (the intervals overlap)."""
    (a_lo, a_hi), (b_lo, b_hi) = a["cond_accuracy_ci"], b["cond_accuracy_ci"]
    return "higher than" if a_lo > b_hi else "lower than" if a_hi < b_lo else "not different from"


def flow_verdict(rows: Sequence[dict]) -> dict[str, dict]:
    """Per number of network calls of a `flow_comparison`: the flow sampler with the higher conditional accuracy
    (Euler or Heun) against the DDIM row with the higher one (any eta), as {calls: {"flow", "flow_acc", "ddim",
    "ddim_acc", "flow_is": `compare_rates(flow, ddim)`}} for fig/part2_summary.json."""
    out = {}
    for calls in dict.fromkeys(r["network_calls"] for r in split_rows(rows)[1]):
        at = [r for r in split_rows(rows)[1] if r["network_calls"] == calls]
        flow = max((r for r in at if r["model"] == "flow"), key=lambda r: r["cond_accuracy"])
        ddim = max((r for r in at if r["model"] != "flow"), key=lambda r: r["cond_accuracy"])
        out[str(calls)] = {"flow": flow["images_from"], "flow_acc": flow["cond_accuracy"],
                           "ddim": f"{ddim['images_from']} eta {ddim['eta']:g}", "ddim_acc": ddim["cond_accuracy"],
                           "flow_is": compare_rates(flow, ddim)}
    return out
