"""The sampling pipeline: the loop and classifier-free guidance, for any generative process.

Split as diffusers splits model, scheduler and pipeline. A process (`gm.diffusion.GaussianDiffusion`,
`gm.flow.RectifiedFlow`) owns its training loss, its time grid and a pure `step` (maths only, no model call); the
denoiser is any callable `model(x_t, t, y)`; this module owns the loop (`sample`) and the guidance (`guided_output`).
What to run is one typed `SamplerSpec(process, steps, eta, guidance_scale, solver, clip_x0, threshold)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
SOLVERS = ("euler", "heun")


class StepOutput(NamedTuple):
    """What a process's `step` returns: the sample one step back, x_{t_prev} (B, ...), and the clean-data estimate
    x0_hat (B, ...) it was computed from."""

    prev_sample: Tensor
    pred_x0: Tensor


class Process(Protocol):
    """A generative process: how the network is trained and how one sampling step moves back in time.

    Time is the process's own: integer DDPM steps in [0, T) for `GaussianDiffusion`, t in [0, 1] for
    `RectifiedFlow`; `model_time` maps it to what the network is given.
    """

    solvers: tuple[str, ...]  # the `SamplerSpec.solver`s its `step` supports

    @property
    def device(self) -> torch.device: ...

    def sample_time(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """(batch,) training times drawn from the process's time distribution."""

    def model_time(self, t: Tensor) -> Tensor:
        """(B,) process times -> the (B,) time input of the network."""

    def training_loss(self, model: Denoiser, x0: Tensor, y: Tensor | None = None, *, t: Tensor | None = None,
                      noise: Tensor | None = None) -> Tensor:
        """Scalar loss on clean data x0 (B, ...); t (drawn with `sample_time` if None) and noise (drawn if None)
        are given only to fix them, e.g. for a validation loss on the same draws at every evaluation."""

    def time_grid(self, steps: int | None) -> list[tuple[float, float]]:
        """The (t, t_prev) pairs of a `steps`-step sampler, from noise to data (None: the process's default)."""

    def step(self, model_output: Tensor, t: Tensor, t_prev: float, x_t: Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None) -> StepOutput:
        """One step x_t -> x_{t_prev} from the (guided) model output at (x_t, t); pure maths."""

    def sampler_name(self, spec: SamplerSpec) -> str:
        """Short machine name of the sampler `spec` runs on this process ("ddim", "ddpm", "flow_euler", ...)."""


@dataclass(frozen=True)
class SamplerSpec:
    """How to sample: the process, `steps` of its time grid (None: the process's default, e.g. all T steps of a
    DDPM), the noise scale `eta` (DDIM's; 0 = deterministic), the classifier-free guidance scale w (1 = the
    conditional model, 0 = the unconditional one), the `solver` ("euler": one network call per step, the process's
    own `step`; "heun": Heun's second-order correction, two calls per step, for processes whose step is an Euler
    step of an ODE) and the label meaning "no label" (None: `model.num_classes`).

    `clip_x0` and `threshold` limit the predicted clean sample x0_hat at every step, for processes that support it
    (`limits_x0`, the DDPM): clip_x0 = c clips x0_hat to [-c, c] (diffusers' `clip_sample`, range c in the units of
    the sampled tensor: normalised latents here); with `threshold` = p as well, dynamic thresholding (Imagen; diffusers'
    `thresholding` with `dynamic_thresholding_ratio` p): per sample s = max(c, p-quantile of |x0_hat|), x0_hat is
    clamped to [-s, s] and scaled by c / s. The step then re-derives eps from the limited x0_hat."""

    process: Process
    steps: int | None = None
    eta: float = 0.0
    guidance_scale: float = 1.0
    solver: str = "euler"
    null_label: int | None = None
    clip_x0: float | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.solver not in self.process.solvers:
            raise ValueError(f"solver {self.solver!r} is not available for {type(self.process).__name__}; choose "
                             f"one of {self.process.solvers}")
        if self.clip_x0 is not None or self.threshold is not None:
            if not getattr(self.process, "limits_x0", False):
                raise ValueError(f"{type(self.process).__name__} has no clean-sample estimate to clip: clip_x0 and "
                                 "threshold need a process with limits_x0 (GaussianDiffusion)")
            if self.clip_x0 is None or self.clip_x0 <= 0:
                raise ValueError(f"clip_x0 must be > 0 (and is needed by threshold), got {self.clip_x0}")
            if self.threshold is not None and not 0 < self.threshold < 1:
                raise ValueError(f"threshold is a quantile in (0, 1), got {self.threshold}")
        self.process.time_grid(self.steps)  # a bad step count fails here, before any sampling

    @property
    def step_options(self) -> dict[str, float]:
        """Keyword arguments of the process's `step` beyond eta: the x0 limits, when set."""
        return {} if self.clip_x0 is None else {"clip_x0": self.clip_x0, "threshold": self.threshold}

    @property
    def num_steps(self) -> int:
        """Steps of the time grid as run."""
        return len(self.process.time_grid(self.steps))

    @property
    def network_calls(self) -> int:
        """Network evaluations per sample (a guided call of 2B counts once): steps, twice that for Heun."""
        return self.num_steps * (2 if self.solver == "heun" else 1)

    @property
    def name(self) -> str:
        """Machine name with the steps as run: "ddim_50", "ddpm_1000", "flow_heun_5"."""
        return f"{self.process.sampler_name(self)}_{self.num_steps}"

    @property
    def label(self) -> str:
        """Display name: "DDIM-50", "DDPM-1000", "Flow Heun-5", "DDIM-50 x0 clip 3", "DDIM-50 x0 thr. 0.995"."""
        kind = self.process.sampler_name(self).replace("_", " ")
        limit = ("" if self.clip_x0 is None else f" x0 clip {self.clip_x0:g}" if self.threshold is None
                 else f" x0 thr. {self.threshold:g}")
        return f"{kind.upper() if ' ' not in kind else kind.title()}-{self.num_steps}{limit}"


def guided_output(model: Denoiser, x_t: Tensor, t: Tensor, y: Tensor | None, guidance_scale: float = 1.0,
                  null_label: int | None = None) -> Tensor:
    """The model's output at (x_t (B, ...), t (B,)) with classifier-free guidance: out_uncond + w (out_cond -
    out_uncond), where out_uncond = model(x_t, t, null_label) and w = `guidance_scale`.

    w = 1 (or y None) calls the conditional model once (exactly the conditional model), w = 0 the unconditional one,
    any other w both in one batch of 2B. null_label: the label meaning "no label", default `model.num_classes`
    (the UNet reserves that index).
    """
    if guidance_scale == 1.0 or y is None:
        return model(x_t, t, y)
    null_label = null_label if null_label is not None else getattr(model, "num_classes", None)
    if null_label is None:
        raise ValueError("guidance_scale != 1 needs a null label (pass null_label or give the model .num_classes)")
    null = torch.full_like(y, null_label)
    if guidance_scale == 0.0:
        return model(x_t, t, null)
    cond, uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise drawn with `generator` (on the generator's device), moved to `like`'s device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


@torch.no_grad()
def sample(model: Denoiser, spec: SamplerSpec, shape: tuple[int, ...], y: Tensor | None = None, *,
           generator: torch.Generator | None = None, noise: Tensor | None = None, progress: bool = True) -> Tensor:
    """Generate a (shape) batch from standard normal noise (or the given start `noise`), with labels y (B,) or None.

    Each step is one guided model call (`guided_output` at the process's `model_time`) and the process's pure
    `step`; Heun adds a second call at the Euler end point and steps with the mean of the two outputs.
    """
    process = spec.process
    device = process.device
    if y is not None and (y.ndim != 1 or y.shape[0] != shape[0]):
        raise ValueError(f"y must have shape ({shape[0]},), got {tuple(y.shape)}")
    y = None if y is None else y.to(device)
    like = torch.empty((), device=device)
    x = randn(tuple(shape), like, generator) if noise is None else noise.to(device).clone()
    if x.shape != tuple(shape):
        raise ValueError(f"start noise has shape {tuple(x.shape)}, expected {tuple(shape)}")

    def output(x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        """(t as a (B,) tensor, the guided model output at (x, t))."""
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long if isinstance(t, int) else x.dtype)
        return t_batch, guided_output(model, x, process.model_time(t_batch), y, spec.guidance_scale, spec.null_label)

    for t, t_prev in tqdm(process.time_grid(spec.steps), desc=spec.label, disable=not progress, leave=False):
        t_batch, out = output(x, t)
        if spec.solver == "heun":
            x_euler = process.step(out, t_batch, t_prev, x).prev_sample
            out = (out + output(x_euler, t_prev)[1]) / 2
        x = process.step(out, t_batch, t_prev, x, eta=spec.eta, generator=generator, **spec.step_options).prev_sample
    return x
