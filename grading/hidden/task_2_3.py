"""Hidden checks of task 2.3 (never in the student release)."""

import torch

from course.checks import Check, call

DIFFUSION = "gm.diffusion.GaussianDiffusion"
COSINE = {"timesteps": 50, "schedule": "cosine"}


def _tensors(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, 2, generator=gen) for k in ("x0", "xt", "noise")}


def _v_prediction() -> dict:
    gen = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 100, dtype=torch.float64), 0)[70]
    xt = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).float()
    v = (abar.sqrt() * noise - (1 - abar).sqrt() * x0).float()
    return {"x0": x0, "xt": xt, "v": v, "t": torch.full((4,), 70)}


CHECKS = [
    Check("the forward process on the cosine schedule", call(f"{DIFFUSION}.q_sample", "$x0", 30, "$noise", init=COSINE),
          lambda: _tensors(40)),
    Check("the posterior on the cosine schedule", call(f"{DIFFUSION}.q_posterior", "$x0", "$xt", 30, init=COSINE),
          lambda: _tensors(41), rtol=1e-4),
    Check("a v-prediction DDIM step to t = -1 reaches x0",
          call(f"{DIFFUSION}.step", "$v", "$t", -1, "$xt", init={"timesteps": 100, "prediction": "v"}, eta=0.0),
          _v_prediction, atol=1e-4, rtol=1e-4),
]
