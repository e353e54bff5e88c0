"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al., 2021).

A wrapped layer computes  y = base(x) + (alpha / r) * x A^T B^T  with A: (r, in), B: (out, r). B starts at zero,
so the wrapped model starts as the base model; only A and B are trained. `merge_lora` folds B A into the base
weight and returns plain layers, so a merged model is an ordinary model again (same outputs, no extra cost).

Works on `nn.Linear` (our `GPT`, Llama/SmolLM2: q_proj ... down_proj) and on transformers' `Conv1D` (HF GPT-2,
weight stored as (in, out)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Attention and MLP projections: GPT-2 names (ours and transformers') and Llama names.
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj")


def _features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"LoRA supports nn.Linear and transformers Conv1D layers, got {type(layer).__name__}")


class LoRALinear(nn.Module):
    """A frozen Linear/Conv1D `base` plus a trainable low-rank update of scale alpha / rank."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        in_features, out_features = _features(base)
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update in the base layer's weight layout: (out, in) for Linear, (in, out) for Conv1D."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.T if isinstance(self.base, Conv1D) else delta

    def merged(self) -> nn.Module:
        """The base layer with the update added to its weight (trainable again, like the original layer)."""
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        for p in self.base.parameters():
            p.requires_grad_(True)
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def apply_lora(
    model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0
) -> nn.Module:
    """Freeze `model` and wrap every layer whose name ends in one of `targets` with LoRA, in place.

    Matching is on the last component of the module name (e.g. "transformer.h.0.attn.c_attn" matches "c_attn").
    Returns the model. Raises if no layer matches (a typo in `targets` must not silently train nothing).
    """
    if rank <= 0 or alpha <= 0:
        raise ValueError(f"LoRA needs rank > 0 and alpha > 0, got rank={rank}, alpha={alpha}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; merge_lora it first")
    matches = [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    if not matches:
        raise ValueError(f"no module of {type(model).__name__} is named like the LoRA targets {list(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base layer and unwrap it, in place; all parameters become trainable."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model

