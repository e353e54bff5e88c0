"""Public checks of task 2.3, Gaussian diffusion (gm/diffusion.py): the forward process, the posterior, the loss and
the DDPM and DDIM reverse steps, on the DDPM schedule (1000 linear betas) unless a check says otherwise."""

import torch

from course.checks import Check, call

DIFFUSION = "gm.diffusion.GaussianDiffusion"
DATA = (2.0, 0.5)  # 1-D data x0 ~ N(2, 0.5^2), for the samplers' check


def _tensors(seed: int, shape: tuple[int, ...] = (5, 4), **extra) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"x0": torch.randn(shape, generator=gen), "xt": torch.randn(shape, generator=gen),
            "noise": torch.randn(shape, generator=gen), **extra}


def _loss_inputs() -> dict:
    t = torch.randint(0, 100, (8,), generator=torch.Generator().manual_seed(3))
    return _tensors(3, (8, 2, 4, 4), t=t, y=torch.arange(8))


def _forward_noise_statistics(inputs: dict, outputs: dict) -> str | None:
    """q_sample(x0 = 1.5, t) without noise: mean sqrt(abar_t) 1.5 and variance 1 - abar_t."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64), 0)[inputs["t"]].item()
    x = outputs["out"].double()
    mean_error, var_error = abs(x.mean().item() - abar**0.5 * 1.5), abs(x.var().item() - (1 - abar))
    if mean_error > 0.01 or var_error > 0.02 * (1 - abar) + 1e-5:
        return (f"200,000 draws at t = {inputs['t']} have mean off by {mean_error:.3g} and variance off by "
                f"{var_error:.3g}: without `noise`, draw standard normal noise")
    return None


def _recovers_gaussian(inputs: dict, outputs: dict) -> str | None:
    x = outputs["x"]
    if abs(x.mean().item() - DATA[0]) > 0.02 or abs(x.std().item() / DATA[1] - 1) > 0.03:
        return (f"with the exact denoiser, 20,000 samples of N({DATA[0]}, {DATA[1]}^2) came out with mean "
                f"{x.mean().item():.4g} and std {x.std().item():.4g}")
    return None


STEP = f"{DIFFUSION}.step"
CHECKS = [
    Check("q_sample with given noise, one t per example", call(f"{DIFFUSION}.q_sample", "$x0", "$t", "$noise", init={}),
          lambda: _tensors(0, (4, 2, 3), t=torch.tensor([0, 10, 500, 999]))),
    Check("q_sample with given noise and an int t", call(f"{DIFFUSION}.q_sample", "$x0", 500, "$noise", init={}),
          lambda: _tensors(1)),
    *(Check(f"q_sample draws the noise when none is given (t = {t})",
            call(f"{DIFFUSION}.q_sample", "$x0", t, init={}, seed=t),
            lambda t=t: {"x0": torch.full((200_000, 1), 1.5), "t": t}, prop=_forward_noise_statistics)
      for t in (0, 100, 999)),
    *(Check(f"q_posterior: mean, variance and log-variance at t = {t}",
            call(f"{DIFFUSION}.q_posterior", "$x0", "$xt", t, init={}), lambda t=t: _tensors(10 + t), rtol=1e-4)
      for t in (1, 10, 500, 999)),
    Check("q_posterior at t = 0 returns x0 with zero variance and a finite log-variance",
          call(f"{DIFFUSION}.q_posterior", "$x0", "$xt", 0, init={}), lambda: _tensors(2), rtol=1e-4),
    *(Check(f"p_losses is the MSE to the {prediction} target; the model gets (x_t, t, y)",
            call(f"{DIFFUSION}.p_losses", "@model", "$x0", "$t", "$y", noise="$noise",
                 init={"timesteps": 100, "prediction": prediction}, objects={"model": ("half_model", None)}),
            _loss_inputs) for prediction in ("eps", "v")),
    *(Check(f"DDPM step (eta = 1) at t = {t}",
            call(STEP, "$noise", t, t - 1, "$xt", init={}, eta=1.0, generator={"generator": 3}),
            lambda t=t: _tensors(20 + t), rtol=1e-4) for t in (0, 1, 500, 999)),
    *(Check(f"DDIM step (eta = 0) from t = {t} to {t_prev}",
            call(STEP, "$noise", t, t_prev, "$xt", init={}, eta=0.0, generator={"generator": 1}),
            lambda t=t: _tensors(30 + t), rtol=1e-4) for t, t_prev in ((999, 899), (500, 0), (40, -1))),
    Check("DDIM step with noise (eta = 0.7)",
          call(STEP, "$noise", 600, 400, "$xt", init={}, eta=0.7, generator={"generator": 5}), lambda: _tensors(4),
          rtol=1e-4),
    *(Check(f"{sampler} sampling with the exact denoiser recovers Gaussian data",
            {"adapter": "sample", "data": DATA, "shape": [20_000, 1], "sampler": sampler, "steps": steps, "seed": 0},
            prop=_recovers_gaussian) for sampler, steps in (("ddpm", None), ("ddim", 100))),
]
