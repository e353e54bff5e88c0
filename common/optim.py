"""The optimizer and learning-rate schedule of every run: `build_optimizer` (AdamW, Adam or SGD, with nanoGPT's
decay split when a run decays its weights) and `warmup_cosine`."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def build_optimizer(model: nn.Module, lr: float, weight_decay: float | None = None, kind: str = "adamw",
                    **options) -> torch.optim.Optimizer:
    """The optimizer `OPTIMIZERS[kind]` of `model`'s trainable parameters, the one recipe of every run.

    `weight_decay` None: one parameter group, no decay. A number: two groups as nanoGPT's, matrices (conv and linear
    weights, embeddings) decay by it and vectors (biases, norms) do not. `options` go to the optimizer (e.g. betas,
    momentum, nesterov). The group layout is part of a checkpoint's optimizer state, so a run keeps its layout.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {sorted(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay is None:
        return OPTIMIZERS[kind](params, lr=lr, weight_decay=0.0, **options)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return OPTIMIZERS[kind]([g for g in groups if g["params"]], lr=lr, **options)


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up to the base LR, then cosine decay to `min_ratio` of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
