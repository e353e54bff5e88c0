"""The figures and tables of task 2.4 (`gm.enhance`, `gm.enhance_retrain`): quality against sampling time, network
calls or guidance scale with 95 % CIs (`plot_tradeoff` and its three uses), the noise schedules, and the tables of
the report (`save_table`, display names as headers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.ticker import FuncFormatter, NullFormatter

from common.plotting import new_figure, save_figure
from gm.diffusion import GaussianDiffusion
from gm.enhance import METRICS, split_rows
from gm.ldm_eval import DISPLAY_NAMES, table


def save_table(rows: Sequence[dict], path: str | Path, caption: str) -> str:
    """Write `caption` and the markdown table of `rows` (display names as headers) to `path` (for the report);
    returns the text."""
    text = f"{caption}\n\n{table(rows)}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def plot_tradeoff(curves: dict[str, Sequence[dict]], x: str, path: str | Path, title: str, xlabel: str,
                  references: Sequence[dict] = (), logx: bool = False, annotate: str | None = None) -> Path:
    """Conditional accuracy and KID (two panels, 95 % CIs as error bars) against row key `x` for each named list of
    rows. `references` (real images, VAE reconstructions) are drawn as horizontal lines; `annotate`: a row key
    written next to each point. A log x axis is labelled at powers of ten, or at the data's x values when they span
    less than a decade, in plain numbers (no overlapping minor-tick labels)."""
    fig, axes = new_figure(1, 2, figsize=(10, 3.8))
    all_x = sorted({r[x] for rows in curves.values() for r in rows})
    for ax, metric in zip(axes, METRICS, strict=True):
        for label, rows in curves.items():
            xs, ys = [r[x] for r in rows], [r[metric] for r in rows]
            err = [[y - r[f"{metric}_ci"][0] for r, y in zip(rows, ys, strict=True)],
                   [r[f"{metric}_ci"][1] - y for r, y in zip(rows, ys, strict=True)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=label)
            if annotate:
                for r, xv, yv in zip(rows, xs, ys, strict=True):
                    ax.annotate(f"{r[annotate]:g}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for ref, style in zip(references, ("--", ":", "-."), strict=False):
            ax.axhline(ref[metric], color="gray", linestyle=style, label=ref["images_from"])
        better = " (higher is better)" if metric == METRICS[0] else " (lower is better)"
        ax.set(xlabel=xlabel, ylabel=DISPLAY_NAMES[metric] + better)
        if logx:
            ax.set_xscale("log")
            if all_x and all_x[-1] < 10 * all_x[0]:
                ax.set_xticks(all_x)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_step_sweep(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """The step sweep as quality vs sampling seconds (log), points labelled with their step count."""
    references, samples = split_rows(rows)
    keys = dict.fromkeys((r["eta"], r.get("x0_limit", "-")) for r in samples if "eta" in r)
    curves = {f"DDIM (eta = {eta:g}{'' if limit == '-' else ', x0 ' + limit})":
              [r for r in samples if r.get("eta") == eta and r.get("x0_limit", "-") == limit] for eta, limit in keys}
    ddpm = [r for r in samples if r["images_from"].startswith("DDPM")]
    curves |= {"DDPM (ancestral)": ddpm} if ddpm else {}
    return plot_tradeoff(curves, "seconds", path, title, "sampling seconds (log scale)", references, logx=True,
                         annotate="steps")


def plot_flow_comparison(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """The flow comparison as quality against network calls per image (log), one curve per sampler (and eta)."""
    references, samples = split_rows(rows)
    curves: dict[str, list[dict]] = {}
    for r in samples:
        name = r["images_from"].rsplit("-", 1)[0] + (f" (eta = {r['eta']:g})" if "eta" in r else "")
        curves.setdefault(name, []).append(r)
    return plot_tradeoff(curves, "network_calls", path, title, "network calls per image (log scale)", references,
                         logx=True)


def plot_guidance_sweep(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """The guidance sweep: quality against the guidance scale w."""
    references, samples = split_rows(rows)
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
