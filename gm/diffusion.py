"""Gaussian diffusion (DDPM) with ancestral DDPM and DDIM samplers and classifier-free guidance.

The denoiser is any callable `model(x_t, t, y)`: x_t (B, ...) noisy inputs, t (B,) long timesteps in [0, T),
y (B,) long labels or None; it returns a tensor shaped like x_t. What that tensor means is set by `prediction`:
"eps" (the noise, the default and the homework's choice) or "v" (v = sqrt(abar) eps - sqrt(1 - abar) x0).
Both are converted to the same (x0, eps) pair, so losses and samplers are written once.

Notation: abar_t = prod_{s<=t} (1 - beta_s) is `alphas_cumprod[t]`; q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
SAMPLERS = ("ddpm", "ddim")


def beta_schedule(schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """(timesteps,) float64 betas. "linear": DDPM's evenly spaced betas; "cosine": Nichol & Dhariwal (2021),
    abar(t) = cos^2((t/T + s) / (1 + s) * pi/2) with s = 0.008, betas clipped at 0.999 (beta_start/end unused)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def _bcast(values: Tensor, ndim: int) -> Tensor:
    """(B,) per-sample values reshaped to (B, 1, ..., 1) to broadcast against a (B, ...) tensor with `ndim` dims."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def _extract(buffer: Tensor, t: Tensor, ndim: int) -> Tensor:
    """buffer[t] reshaped to broadcast against a (B, ...) tensor with `ndim` dims."""
    return _bcast(buffer[t], ndim)


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise drawn with `generator` (on the generator's device), moved to `like`'s device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class GaussianDiffusion(nn.Module):
    """Forward process, training loss and samplers of a DDPM with `timesteps` steps.

    All schedule tensors are float32 buffers (computed in float64), so `.to(device)` moves them with a model.
    """

    def __init__(
        self,
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        schedule: str = "linear",
        prediction: str = "eps",
    ):
        super().__init__()
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        self.timesteps, self.schedule, self.prediction = timesteps, schedule, prediction
        betas = beta_schedule(schedule, timesteps, beta_start, beta_end)
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # Posterior q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, beta_tilde), derived in report section 2.3.
        posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        buffers = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
            "posterior_variance": posterior_variance,
            # beta_tilde_0 = 0: log of the clipped value keeps the t = 0 entry finite (it is never used for noise).
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef2": (1 - betas).sqrt() * (1 - abar_prev) / (1 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    # ----------------------------------------------------------------------------------------------- forward process
    def _check_t(self, t: Tensor | int, batch: int, device: torch.device) -> Tensor:
        t = torch.full((batch,), t, dtype=torch.long, device=device) if isinstance(t, int) else t.to(device).long()
        if t.shape != (batch,):
            raise ValueError(f"t must be an int or a (B,) tensor with B={batch}, got shape {tuple(t.shape)}")
        if t.min() < 0 or t.max() >= self.timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.timesteps}), got [{int(t.min())}, {int(t.max())}]")
        return t

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)."""
        t = self._check_t(t, x0.shape[0], x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance (clipped at t = 0) of q(x_{t-1} | x_t, x0), each broadcastable to x0."""
        t = self._check_t(t, x0.shape[0], x0.device)
        coef1, coef2 = _extract(self.posterior_mean_coef1, t, x0.ndim), _extract(self.posterior_mean_coef2, t, x0.ndim)
        mean = coef1 * x0 + coef2 * xt
        return (mean, _extract(self.posterior_variance, t, x0.ndim),
                _extract(self.posterior_log_variance_clipped, t, x0.ndim))

    # ------------------------------------------------------------------------------------- parameterisation and loss
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network regresses on: the noise ("eps") or v = sqrt(abar) eps - sqrt(1 - abar) x0 ("v")."""
        if self.prediction == "eps":
            return noise
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def split_prediction(self, xt: Tensor, t: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """Network output -> (x0_hat, eps_hat), using x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
        a, s = _extract(self.sqrt_alphas_cumprod, t, xt.ndim), _extract(self.sqrt_one_minus_alphas_cumprod, t, xt.ndim)
        if self.prediction == "eps":
            return (xt - s * output) / a, output
        return a * xt - s * output, s * xt + a * output

    def p_losses(self, model: Denoiser, x0: Tensor, t: Tensor, y: Tensor | None = None,
                 noise: Tensor | None = None) -> Tensor:
        """Scalar MSE between the model output at x_t ~ q(x_t | x0) and its target (the noise for "eps")."""
        t = self._check_t(t, x0.shape[0], x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        output = model(self.q_sample(x0, t, noise), t, y)
        if output.shape != x0.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} != input shape {tuple(x0.shape)}")
        return F.mse_loss(output.float(), self.target(x0, noise, t).float())

    # ------------------------------------------------------------------------------------------------------ sampling
    @staticmethod
    def guided(model: Denoiser, xt: Tensor, t: Tensor, y: Tensor | None, guidance_scale: float = 1.0,
               null_label: int | None = None) -> Tensor:
        """Classifier-free guidance: out_uncond + w (out_cond - out_uncond); y = `null_label` is "no label".

        w = 1 calls the conditional model once (exactly the conditional model), w = 0 the unconditional one.
        """
        if guidance_scale == 1.0 or y is None:
            return model(xt, t, y)
        if null_label is None:
            raise ValueError("guidance_scale != 1 needs a null label (pass null_label or give the model .num_classes)")
        null = torch.full_like(y, null_label)
        if guidance_scale == 0.0:
            return model(xt, t, null)
        cond, uncond = model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def p_sample(self, model: Denoiser, xt: Tensor, t: Tensor | int, y: Tensor | None = None,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                 null_label: int | None = None) -> Tensor:
        """One ancestral DDPM step x_t -> x_{t-1} ~ N(mu(x_t, x0_hat), beta_tilde_t) (no noise at t = 0)."""
        t = self._check_t(t, xt.shape[0], xt.device)
        output = self.guided(model, xt, t, y, guidance_scale, _null_label(model, null_label))
        x0_hat, _ = self.split_prediction(xt, t, output)
        mean, _, log_var = self.q_posterior(x0_hat, xt, t)
        nonzero = _bcast((t > 0).to(xt.dtype), xt.ndim)
        return mean + nonzero * (0.5 * log_var).exp() * _randn(xt.shape, xt, generator)

    def _abar_prev(self, t_prev: Tensor) -> Tensor:
        """abar at t_prev, with abar_{-1} = 1 (the clean data)."""
        one = torch.ones_like(t_prev, dtype=self.alphas_cumprod.dtype)
        return torch.where(t_prev >= 0, self.alphas_cumprod[t_prev.clamp(min=0)], one)

    def ddim_sigma(self, t: Tensor, t_prev: Tensor, eta: float) -> Tensor:
        """DDIM's noise scale sigma(t -> t_prev) = eta sqrt((1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev));
        t_prev = -1 means abar_prev = 1 (the final step). With eta = 1 and t_prev = t - 1 this is sqrt(beta_tilde_t)."""
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar_prev(t_prev)
        return eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()

    @torch.no_grad()
    def ddim_step(self, model: Denoiser, xt: Tensor, t: Tensor, t_prev: Tensor, y: Tensor | None = None,
                  eta: float = 0.0, guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                  null_label: int | None = None) -> Tensor:
        """x_t -> x_{t_prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z."""
        t = self._check_t(t, xt.shape[0], xt.device)
        t_prev = t_prev.to(xt.device).long()
        if t_prev.shape != t.shape or (t_prev >= t).any() or (t_prev < -1).any():
            raise ValueError("t_prev must be a (B,) tensor with -1 <= t_prev < t")
        output = self.guided(model, xt, t, y, guidance_scale, _null_label(model, null_label))
        x0_hat, eps_hat = self.split_prediction(xt, t, output)
        abar_prev = _bcast(self._abar_prev(t_prev), xt.ndim)
        sigma = _bcast(self.ddim_sigma(t, t_prev, eta), xt.ndim)
        x_prev = abar_prev.sqrt() * x0_hat + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps_hat
        if eta > 0:
            x_prev = x_prev + sigma * _randn(xt.shape, xt, generator)
        return x_prev

    def ddim_timesteps(self, steps: int) -> Tensor:
        """`steps` increasing timesteps evenly spread over [0, T-1], both ends included (all of them if steps = T)."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.timesteps}], got {steps}")
        if steps == 1:
            return torch.tensor([self.timesteps - 1])
        return torch.linspace(0, self.timesteps - 1, steps, dtype=torch.float64).round().long().unique()

    @torch.no_grad()
    def sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        y: Tensor | None = None,
        sampler: str = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
        noise: Tensor | None = None,
        null_label: int | None = None,
    ) -> Tensor:
        """Generate a (shape) batch from x_T ~ N(0, I) (or the given start `noise`).

        sampler "ddpm": all T ancestral steps (`steps` must be None or T). "ddim": `steps` evenly spaced steps
        (default T) with noise scale `eta` (0 = deterministic ODE-like sampler, 1 = DDPM-like variance).
        y: (B,) labels or None; guidance_scale w: classifier-free guidance with the label `null_label`
        (default `model.num_classes`).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if sampler == "ddpm" and steps not in (None, self.timesteps):
            raise ValueError(f"the DDPM sampler runs all {self.timesteps} steps; use sampler='ddim' for {steps} steps")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        device = self.betas.device
        if y is not None and (y.ndim != 1 or y.shape[0] != shape[0]):
            raise ValueError(f"y must have shape ({shape[0]},), got {tuple(y.shape)}")
        y = None if y is None else y.to(device)
        x = _randn(tuple(shape), self.betas, generator) if noise is None else noise.to(device).clone()
        if x.shape != tuple(shape):
            raise ValueError(f"start noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
        null_label = _null_label(model, null_label)
        batch = shape[0]
        if sampler == "ddpm":
            for i in tqdm(range(self.timesteps - 1, -1, -1), desc="DDPM", disable=not progress, leave=False):
                x = self.p_sample(model, x, i, y, guidance_scale, generator, null_label)
            return x
        seq = self.ddim_timesteps(steps or self.timesteps).tolist()
        prev = [-1, *seq[:-1]]
        for t, t_prev in tqdm(list(zip(seq, prev, strict=True))[::-1], desc="DDIM", disable=not progress, leave=False):
            t_b = torch.full((batch,), t, device=device, dtype=torch.long)
            t_prev_b = torch.full((batch,), t_prev, device=device, dtype=torch.long)
            x = self.ddim_step(model, x, t_b, t_prev_b, y, eta, guidance_scale, generator, null_label)
        return x


def _null_label(model: Denoiser, null_label: int | None) -> int | None:
    """The explicit null label, else the model's `num_classes` (the UNet reserves that index for "no label")."""
    return null_label if null_label is not None else getattr(model, "num_classes", None)
