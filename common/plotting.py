"""Figures: loss curves, grouped bar charts, image grids from tensors, markdown tables. No torchvision needed.

Library figures are `matplotlib.figure.Figure` objects, never pyplot's: pyplot's backend belongs to whoever runs the
code (the inline backend in a notebook kernel, Agg in a script without a display), so nothing here switches it. A
notebook shows each PNG saved to fig/ below the cell that saved it (`common.notebook`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6, 4), **kwargs: Any):
    """A pyplot-free `(Figure, axes)` pair, like `plt.subplots` (same `squeeze`, `gridspec_kw`, ... keywords)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Figure, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Save a figure as PNG (creating folders) and return its path.

    The saved image is cropped to what is drawn (`bbox_inches="tight"`): a title or label wider than the figure
    widens the image instead of being cut at its edge. A figure made with pyplot in a notebook cell is closed too, so
    the inline backend does not draw it a second time beside the saved file that the notebook shows.
    """
    fig.tight_layout()  # spacing between panels and labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **{"dpi": 120, "bbox_inches": "tight", **savefig_kwargs})
    if fig.canvas.manager is not None:  # only pyplot's figures have a manager, so pyplot is imported already
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def plot_curves(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str,
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool = False,
) -> Path:
    """Plot named (x, y) series on one axis and save a PNG. `title` should name the profile."""
    fig, ax = new_figure(figsize=(6, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label, marker="o" if len(x) < 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """(N, C, H, W) images in [0, 1] -> (H', W', 3) uint8 array with `nrow` images per row."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid expects (N, 1|3, H, W) images, got shape {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((3, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_labeled_grids(
    panels: dict[str, torch.Tensor],
    path: str | Path,
    title: str,
    nrow: int = 8,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Several image grids side by side, each with a heading (e.g. inputs | reconstructions | samples)."""
    fig, axes = new_figure(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels.items(), strict=True):
        ax.imshow(make_grid(images, nrow=nrow), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if row_labels is not None and ax is axes[0][0]:
            h = images.shape[-2] + 2
            ax.set_yticks([2 + h * i + h / 2 for i in range(len(row_labels))], list(row_labels), fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def markdown_table(rows: Sequence[dict], path: str | Path | None = None, floatfmt: str = ".4g",
                   names: Mapping[str, str] | None = None) -> str:
    """Render dict rows as a GitHub markdown table; also write it to `path` when given. `names` maps the rows'
    machine keys to the column headers shown (a key not in it is shown as is)."""
    if not rows:
        raise ValueError("markdown_table needs at least one row")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    names = names or {}

    def fmt(value: object) -> str:
        return format(value, floatfmt) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(names.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


def plot_grouped_bars(rows: Sequence[dict], label_keys: Sequence[str], panels: dict[str, Sequence[str]],
                      path: str | Path, title: str, errors: dict[str, str] | None = None,
                      names: Mapping[str, str] | None = None) -> Path:
    """One panel per entry of `panels` ({y label: [row keys]}), a group of bars per row, labelled by `label_keys`.

    `errors` maps a row key to the key of its error bar (e.g. a standard error); `names` maps a row key to its
    legend label (a key not in it is shown as is).
    """
    errors, names = errors or {}, names or {}
    labels = ["\n".join(str(r[k]) for k in label_keys) for r in rows]
    x = np.arange(len(rows))
    panel_width = min(7.0, max(4.0, 0.7 * len(rows) + 1.5))
    fig, axes = new_figure(1, len(panels), figsize=(panel_width * len(panels), 4.2), squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels.items(), strict=True):
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            err = [r[errors[key]] for r in rows] if key in errors else None
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, [r.get(key, np.nan) for r in rows], width=width, yerr=err,
                   capsize=3, label=names.get(key, key))
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(x, labels, fontsize=6 if len(rows) > 4 else 8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
