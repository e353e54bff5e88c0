"""Rectified flow / conditional flow matching (Lipman et al. 2023; Liu et al. 2023), a `gm.sampler.Process`.

The straight path from data to noise, x_t = (1 - t) x0 + t eps for t in [0, 1], has the constant velocity
dx_t/dt = eps - x0. The network regresses that velocity at a uniformly drawn t; sampling integrates the ODE
dx/dt = v(x, t) from t = 1 (pure noise) back to t = 0 with Euler steps (one network call each) or Heun's method (the
sampler's "heun" solver: two calls). The network is the same `model(x_t, t, y)` as a DDPM's, given
`time_scale * t` so that its sinusoidal time embedding sees the range of DDPM's integer steps [0, 1000).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gm.sampler import Denoiser, SamplerSpec, StepOutput


class RectifiedFlow(nn.Module):
    """Flow matching on the linear path x_t = (1 - t) x0 + t eps with velocity target eps - x0.

    No learned state: the one buffer (`time_scale`) only gives the process a device, so `.to(device)` moves it with
    the model like `GaussianDiffusion`.
    """

    solvers = ("euler", "heun")

    def __init__(self, time_scale: float = 1000.0):
        super().__init__()
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.register_buffer("time_scale", torch.tensor(float(time_scale)), persistent=False)

    def extra_repr(self) -> str:
        return f"time_scale={self.time_scale.item():g}"

    @property
    def device(self) -> torch.device:
        return self.time_scale.device

    def sample_time(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """(batch,) times drawn uniformly from [0, 1) on `device` (with `generator`, on its device)."""
        return torch.rand(batch, generator=generator,
                          device=generator.device if generator is not None else device).to(device)

    def model_time(self, t: Tensor) -> Tensor:
        """t in [0, 1] -> time_scale * t, the range the UNet's embedding is used to from DDPM."""
        return t * self.time_scale.to(t.device)

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t) x0 + t noise for x0, noise (B, ...) and t (B,)."""
        t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    @staticmethod
    def target(x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity d x_t / dt = noise - x0 the network regresses on."""
        return noise - x0

    def training_loss(self, model: Denoiser, x0: Tensor, y: Tensor | None = None, *, t: Tensor | None = None,
                      noise: Tensor | None = None) -> Tensor:
        """Scalar MSE (float32) between model(x_t, time_scale t, y) and the velocity noise - x0; t ~ U[0, 1) and
        noise ~ N(0, I) drawn unless given. x0 (B, ...); y (B,) labels or None."""
        t = self.sample_time(x0.shape[0], x0.device) if t is None else t.to(x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        velocity = model(self.interpolate(x0, noise, t), self.model_time(t), y)
        if velocity.shape != x0.shape:
            raise ValueError(f"the model's velocity has shape {tuple(velocity.shape)}, the latents {tuple(x0.shape)}")
        return F.mse_loss(velocity.float(), self.target(x0, noise).float())

    def time_grid(self, steps: int | None) -> list[tuple[float, float]]:
        """(t, t_prev) pairs of `steps` equal steps from t = 1 down to 0 (the flow has no default step count)."""
        if steps is None or steps < 1:
            raise ValueError(f"flow sampling needs steps >= 1 (set SamplerSpec.steps), got {steps}")
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        return list(zip(grid[:-1], grid[1:], strict=True))

    def step(self, model_output: Tensor, t: Tensor, t_prev: float, x_t: Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None) -> StepOutput:
        """Euler step of dx/dt = v from t to t_prev: x_{t_prev} = x_t + (t_prev - t) v, with the clean estimate
        x0_hat = x_t - t v (the end of the straight line through x_t). model_output v (B, ...) like x_t; t (B,);
        pure maths. The flow's ODE is deterministic: eta must be 0 (`generator` is not used)."""
        if eta != 0:
            raise ValueError(f"the flow's sampler is a deterministic ODE solver: eta must be 0, got {eta}")
        if model_output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} != sample shape {tuple(x_t.shape)}")
        t = t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        return StepOutput(x_t + (t_prev - t) * model_output, x_t - t * model_output)

    def sampler_name(self, spec: SamplerSpec) -> str:
        """"flow_euler" or "flow_heun"."""
        return f"flow_{spec.solver}"
