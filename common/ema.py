"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy `shadow` of `model`, updated as theta_ema <- d * theta_ema + (1 - d) * theta.

    d = min(decay, (1 + n) / (10 + n)) at the n-th update (n = 0, 1, ...), the warm-up of TensorFlow's
    ExponentialMovingAverage and diffusers' EMAModel: without it the random initial weights keep a share decay^n
    (0.995^400 = 13 % after 400 steps), which ruined the samples of a short run although its raw weights were good.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The d of the next update."""
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for ema_p, p in zip(self.shadow.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), weight)
        for ema_b, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"shadow", "num_updates"}:
            raise ValueError("not an EMA state (a dict of 'shadow' and 'num_updates'); checkpoints written before the "
                             "EMA warm-up hold only the weights: delete the run folder to retrain")
        self.shadow.load_state_dict(state["shadow"])
        self.num_updates = state["num_updates"]
