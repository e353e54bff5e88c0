"""Gaussian diffusion (DDPM): the forward process, its training loss, and the ancestral DDPM and DDIM steps.

Laid out like diffusers: `GaussianDiffusion.step(model_output, t, t_prev, x_t, eta=..., generator=...)` is the pure
scheduler step (maths only, no model call); the loop and classifier-free guidance live in `gm.sampler` (`sample`,
`guided_output`), which runs any process of the `gm.sampler.Process` interface this class implements
(`training_loss`, `time_grid`, `step`). `GaussianDiffusion.sample` is a shortcut to that loop by sampler name.

The denoiser is any callable `model(x_t, t, y)`: x_t (B, ...) noisy inputs, t (B,) long timesteps in [0, T),
y (B,) long labels or None; it returns a tensor shaped like x_t. What that tensor means is set by `prediction`:
"eps" (the noise, the default and the homework's choice) or "v" (v = sqrt(abar) eps - sqrt(1 - abar) x0).
Both are converted to the same (x0, eps) pair, so losses and samplers are written once.

Notation: abar_t = prod_{s<=t} (1 - beta_s) is `alphas_cumprod[t]`; q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gm.sampler import Denoiser, SamplerSpec, StepOutput, guided_output
from gm.sampler import randn as _randn
from gm.sampler import sample as run_sampler

# StepOutput and guided_output moved to gm.sampler; imported here for the code and checks that name them in gm.diffusion
__all__ = ["PREDICTIONS", "SAMPLERS", "SCHEDULES", "GaussianDiffusion", "StepOutput", "beta_schedule", "guided_output",
           "limit_x0"]
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


def limit_x0(x0: Tensor, clip: float, threshold: float | None = None) -> Tensor:
    """Predicted clean samples x0 (B, ...) limited to the data's range [-clip, clip].

    threshold None: clipped (diffusers' `clip_sample`). threshold = p: dynamic thresholding (Saharia et al. 2022,
    Imagen; diffusers' `thresholding` with data range `clip` instead of 1): per sample s = max(clip, p-quantile of
    |x0|), then x0 is clamped to [-s, s] and scaled by clip / s, so a sample that overshoots is shrunk back into
    range instead of saturating at its edges."""
    if threshold is None:
        return x0.clamp(-clip, clip)
    s = _bcast(x0.abs().flatten(1).float().quantile(threshold, dim=1).clamp(min=clip).to(x0.dtype), x0.ndim)
    return torch.maximum(torch.minimum(x0, s), -s) * (clip / s)


def _bcast(values: Tensor, ndim: int) -> Tensor:
    """(B,) per-sample values reshaped to (B, 1, ..., 1) to broadcast against a (B, ...) tensor with `ndim` dims."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def _extract(buffer: Tensor, t: Tensor, ndim: int) -> Tensor:
    """buffer[t] reshaped to broadcast against a (B, ...) tensor with `ndim` dims."""
    return _bcast(buffer[t], ndim)


class GaussianDiffusion(nn.Module):
    """Forward process, training loss and samplers of a DDPM with `timesteps` steps.

    All schedule tensors are float32 buffers (computed in float64), so `.to(device)` moves them with a model.
    Implements `gm.sampler.Process`: time is the integer step t in [0, T), given to the network as is.
    """

    solvers = ("euler",)  # DDIM is the Euler step of the probability-flow ODE; Heun would need t_prev = -1
    limits_x0 = True  # `step` takes clip_x0 / threshold (`SamplerSpec.clip_x0`)

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
        self.beta_start, self.beta_end = beta_start, beta_end
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

    def extra_repr(self) -> str:
        return (f"timesteps={self.timesteps}, schedule={self.schedule!r}, beta_start={self.beta_start}, "
                f"beta_end={self.beta_end}, prediction={self.prediction!r}")

    @property
    def device(self) -> torch.device:
        return self.betas.device

    # ----------------------------------------------------------------------------------------------- forward process
    def _check_t(self, t: Tensor | int, batch: int, device: torch.device, check_range: bool = True) -> Tensor:
        """t as a (batch,) long tensor on `device`. An int is always range-checked (free); a tensor only with
        `check_range`, since reading its values is a host sync, which the training step must not pay."""
        if isinstance(t, int):
            if not 0 <= t < self.timesteps:
                raise ValueError(f"timesteps must lie in [0, {self.timesteps}), got {t}")
            return torch.full((batch,), t, dtype=torch.long, device=device)
        t = t.to(device).long()
        if t.shape != (batch,):
            raise ValueError(f"t must be an int or a (B,) tensor with B={batch}, got shape {tuple(t.shape)}")
        if check_range and (t.min() < 0 or t.max() >= self.timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.timesteps}), got [{int(t.min())}, {int(t.max())}]")
        return t

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        x0 (B, ...); t an int or (B,) long in [0, T) (a tensor's range is not checked: this runs every training
        step; an out-of-range index fails in the buffer lookup); noise (B, ...) standard normal, drawn if None.
        """
        t = self._check_t(t, x0.shape[0], x0.device, check_range=False)
        ### BEGIN SOLUTION
        noise = torch.randn_like(x0) if noise is None else noise
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)
        ### END SOLUTION

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0) = N(coef1_t x0 + coef2_t x_t, beta_tilde_t I) for x0, xt (B, ...), t in [0, T).

        Returns (mean (B, ...), variance, log-variance), the last two (B, 1, ..., 1) read from the buffers
        `posterior_mean_coef1/2`, `posterior_variance` and `posterior_log_variance_clipped` (beta_tilde_0 = 0, so
        its log is clipped to that of t = 1).
        """
        t = self._check_t(t, x0.shape[0], x0.device)
        ### BEGIN SOLUTION
        coef1, coef2 = _extract(self.posterior_mean_coef1, t, x0.ndim), _extract(self.posterior_mean_coef2, t, x0.ndim)
        mean = coef1 * x0 + coef2 * xt
        return (mean, _extract(self.posterior_variance, t, x0.ndim),
                _extract(self.posterior_log_variance_clipped, t, x0.ndim))
        ### END SOLUTION

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

    def p_losses(self, model: Denoiser, x0: Tensor, t: Tensor | int, y: Tensor | None = None,
                 noise: Tensor | None = None) -> Tensor:
        """Scalar MSE between model(x_t, t, y) at x_t = `q_sample(x0, t, noise)` and its `target` (the noise for
        "eps"), both in float32. x0 (B, ...); t as in `q_sample`; noise drawn if None; y (B,) labels or None."""
        t = self._check_t(t, x0.shape[0], x0.device, check_range=False)
        ### BEGIN SOLUTION
        noise = torch.randn_like(x0) if noise is None else noise
        output = model(self.q_sample(x0, t, noise), t, y)
        if output.shape != x0.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} != input shape {tuple(x0.shape)}")
        return F.mse_loss(output.float(), self.target(x0, noise, t).float())
        ### END SOLUTION

    def sample_time(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """(batch,) long timesteps drawn uniformly from [0, T) on `device` (with `generator`, on its device)."""
        return torch.randint(0, self.timesteps, (batch,), generator=generator,
                             device=generator.device if generator is not None else device).to(device)

    def model_time(self, t: Tensor) -> Tensor:
        """The network is given the integer timestep itself."""
        return t

    def training_loss(self, model: Denoiser, x0: Tensor, y: Tensor | None = None, *, t: Tensor | None = None,
                      noise: Tensor | None = None) -> Tensor:
        """`p_losses` at timesteps drawn uniformly from [0, T) (unless `t` is given) and fresh noise (unless given).
        x0 (B, ...); y (B,) labels or None."""
        t = self.sample_time(x0.shape[0], x0.device) if t is None else t
        return self.p_losses(model, x0, t, y, noise)

    # ------------------------------------------------------------------------------------------------ reverse step
    def _abar_prev(self, t_prev: Tensor) -> Tensor:
        """abar at t_prev, with abar_{-1} = 1 (the clean data)."""
        one = torch.ones_like(t_prev, dtype=self.alphas_cumprod.dtype)
        return torch.where(t_prev >= 0, self.alphas_cumprod[t_prev.clamp(min=0)], one)

    def ddim_sigma(self, t: Tensor, t_prev: Tensor, eta: float) -> Tensor:
        """DDIM's noise scale sigma(t -> t_prev) = eta sqrt((1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev));
        t_prev = -1 means abar_prev = 1 (the final step). With eta = 1 and t_prev = t - 1 this is sqrt(beta_tilde_t)."""
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar_prev(t_prev)
        return eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()

    def ddpm_update(self, x0_hat: Tensor, xt: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral DDPM update x_t -> x_{t-1} ~ q(x_{t-1} | x_t, x0 = x0_hat) (Ho et al. 2020, Algorithm 2).

        x_{t-1} = mean + [t > 0] exp(0.5 log_var) z with (mean, _, log_var) = `q_posterior(x0_hat, xt, t)` (the
        clipped log-variance) and z ~ N(0, I) of xt's shape, dtype and device, drawn with `generator` at every t
        (also t = 0, where it is masked, so every step uses the generator alike). x0_hat, xt (B, ...); t (B,) long.
        """
        ### BEGIN SOLUTION
        mean, _, log_var = self.q_posterior(x0_hat, xt, t)
        nonzero = _bcast((t > 0).to(xt.dtype), xt.ndim)
        return mean + nonzero * (0.5 * log_var).exp() * _randn(xt.shape, xt, generator)
        ### END SOLUTION

    def ddim_update(self, x0_hat: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, eta: float,
                    generator: torch.Generator | None = None) -> Tensor:
        """DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12):

        x_{t_prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,

        abar_prev = `_abar_prev(t_prev)` (1 at t_prev = -1), sigma = `ddim_sigma(t, t_prev, eta)`, the square root's
        argument clamped at 0 against round-off, and z ~ N(0, I) of x0_hat's shape, dtype and device drawn with
        `generator` only when eta > 0 (eta = 0 is deterministic). x0_hat, eps_hat (B, ...); t, t_prev (B,) long.
        """
        ### BEGIN SOLUTION
        abar_prev = _bcast(self._abar_prev(t_prev), x0_hat.ndim)
        sigma = _bcast(self.ddim_sigma(t, t_prev, eta), x0_hat.ndim)
        x_prev = abar_prev.sqrt() * x0_hat + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps_hat
        if eta > 0:
            x_prev = x_prev + sigma * _randn(x0_hat.shape, x0_hat, generator)
        return x_prev
        ### END SOLUTION

    def step(self, model_output: Tensor, t: Tensor | int, t_prev: Tensor | int, x_t: Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None, clip_x0: float | None = None,
             threshold: float | None = None) -> StepOutput:
        """One reverse step x_t -> x_{t_prev} from the model's output at (x_t, t); pure maths, calls no model.

        model_output: (B, ...) like x_t, in this schedule's `prediction` ("eps" or "v"), guidance already applied
        (`guided_output`). t: int or (B,) in [0, T); t_prev: int or (B,) with -1 <= t_prev < t (-1: the clean data).
        eta >= 0 scales DDIM's noise. eta = 1 with t_prev = t - 1 is the ancestral DDPM step (`ddpm_update`, the
        exact posterior); any other pair is a DDIM step (`ddim_update`). clip_x0 (and threshold): x0_hat is limited
        by `limit_x0` and eps re-derived from it, eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), before the
        update (diffusers' DDIMScheduler with `clip_sample` or `thresholding` and `use_clipped_model_output`).
        Returns (prev_sample, pred_x0).
        """
        t = self._check_t(t, x_t.shape[0], x_t.device)
        t_prev = torch.full_like(t, t_prev) if isinstance(t_prev, int) else t_prev.to(t.device).long()
        if t_prev.shape != t.shape or (t_prev >= t).any() or (t_prev < -1).any():
            raise ValueError(f"t_prev must be an int or a ({len(t)},) tensor with -1 <= t_prev < t")
        if model_output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} != sample shape {tuple(x_t.shape)}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        x0_hat, eps_hat = self.split_prediction(x_t, t, model_output)
        if clip_x0 is not None:
            x0_hat = limit_x0(x0_hat, clip_x0, threshold)
            eps_hat = ((x_t - _extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x0_hat)
                       / _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim))
        if eta == 1.0 and torch.equal(t_prev, t - 1):
            return StepOutput(self.ddpm_update(x0_hat, x_t, t, generator), x0_hat)
        return StepOutput(self.ddim_update(x0_hat, eps_hat, t, t_prev, eta, generator), x0_hat)

    # ------------------------------------------------------------------------------------------------------ sampling
    def ddim_timesteps(self, steps: int) -> Tensor:
        """`steps` increasing timesteps evenly spread over [0, T-1], both ends included (all of them if steps = T)."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.timesteps}], got {steps}")
        if steps == 1:
            return torch.tensor([self.timesteps - 1])
        return torch.linspace(0, self.timesteps - 1, steps, dtype=torch.float64).round().long().unique()

    def time_grid(self, steps: int | None) -> list[tuple[int, int]]:
        """(t, t_prev) pairs from T-1 down to (0, -1) over `ddim_timesteps(steps)` (None: all T steps)."""
        seq = self.ddim_timesteps(steps or self.timesteps).tolist()
        return list(zip(seq, [-1, *seq[:-1]], strict=True))[::-1]

    def sampler_name(self, spec: SamplerSpec) -> str:
        """"ddpm" for the default grid (steps None: all T steps) with eta = 1, where `step` takes the exact posterior;
        "ddim" for any step count given (T steps with eta = 1 compute the same, but belong to a DDIM sweep)."""
        return "ddpm" if spec.steps is None and spec.eta == 1.0 else "ddim"

    def sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        y: Tensor | None = None,
        *,
        sampler: str = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
        noise: Tensor | None = None,
        null_label: int | None = None,
    ) -> Tensor:
        """Generate a (shape) batch from x_T ~ N(0, I) (or the given start `noise`) with `gm.sampler.sample`.

        sampler "ddpm": all T ancestral steps (`steps` must be None or T; `eta` is not used: it is 1). "ddim": `steps`
        evenly spaced steps (default T) with noise scale `eta` (0 = deterministic ODE-like sampler, 1 = DDPM-like
        variance). y: (B,) labels or None; guidance_scale w: classifier-free guidance with the label `null_label`
        (default `model.num_classes`).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if sampler == "ddpm" and steps not in (None, self.timesteps):
            raise ValueError(f"the DDPM sampler runs all {self.timesteps} steps; use sampler='ddim' for {steps} steps")
        spec = SamplerSpec(self, steps=None if sampler == "ddpm" else steps, eta=1.0 if sampler == "ddpm" else eta,
                           guidance_scale=guidance_scale, null_label=null_label)
        return run_sampler(model, spec, shape, y, generator=generator, noise=noise, progress=progress)
