"""The causal-LM loss, shared by `fm.model.GPT.forward(labels=...)` and SFT (`fm.sft.sft_loss`).

Labels follow transformers' convention: `labels` (B, T) hold the token ids themselves (not shifted), and
IGNORE_INDEX marks positions that are not supervised (prompt tokens, padding).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised tokens (transformers' loss), in float32.

    logits (B, T, V) at position t predict labels (B, T) at t + 1; IGNORE_INDEX labels are skipped. Returns a 0-d
    tensor (NaN when no label is supervised).
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    # Shift the labels, not the logits: slicing (B, T, V) logits would copy them (and zero-fill a copy in backward).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens `causal_lm_loss` averages over: labels (B, T) -> 0-d count of labels[:, 1:] != IGNORE_INDEX."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
