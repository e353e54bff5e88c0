"""Public checks of task 2.1, the VAE's KL divergence (gm/loss.py) and reparameterization (gm/model.py)."""

import torch

from course.checks import Check, call

REPARAMETERIZE = "gm.model.VAE.reparameterize"


def _gaussian(shape: tuple[int, ...], seed: int, mean_scale: float = 1.0, logvar_scale: float = 1.0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"mean": torch.randn(shape, generator=gen) * mean_scale,
            "logvar": torch.randn(shape, generator=gen) * logvar_scale}


def _posterior() -> dict:
    return {"mean": torch.tensor([[-1.0, 0.0, 2.0]]).expand(100_000, 3).contiguous(),
            "logvar": torch.tensor([[0.0, -2.0, 1.0]]).expand(100_000, 3).contiguous()}


def _samples_posterior(inputs: dict, outputs: dict) -> str | None:
    z = outputs["out"]
    if z.shape != inputs["mean"].shape:
        return f"expected shape {tuple(inputs['mean'].shape)}, received {tuple(z.shape)}"
    mean_error = (z.mean(0) - inputs["mean"][0]).abs().max().item()
    std_error = (z.std(0) - torch.exp(0.5 * inputs["logvar"][0])).abs().max().item()
    if mean_error > 0.03 or std_error > 0.05:
        return (f"100,000 samples have mean off by {mean_error:.3g} and std off by {std_error:.3g} (allowed 0.03 and "
                "0.05): z must be mean + exp(logvar / 2) * standard normal noise")
    return None


def _gradients(inputs: dict, outputs: dict) -> str | None:
    """dz/dmean = 1, dz/dlogvar = 0.5 (z - mean): the noise is the only random part."""
    z, g_mean, g_logvar = outputs["out"], outputs.get("grad.mean"), outputs.get("grad.logvar")
    if g_mean is None or g_mean.shape != z.shape or g_logvar is None or g_logvar.shape != z.shape:
        return "z must depend differentiably on mean and logvar"
    if not torch.allclose(g_mean, torch.ones_like(z)):
        return "dz/dmean must be 1"
    if not torch.allclose(g_logvar, 0.5 * (z - inputs["mean"]), atol=1e-6):
        return "dz/dlogvar must be 0.5 (z - mean)"
    return None


CHECKS = [
    Check("kl_divergence matches the closed form and sums the non-batch dims",
          call("gm.loss.kl_divergence", "$mean", "$logvar"), lambda: _gaussian((4, 3, 8, 8), 0), atol=1e-4),
    Check("kl_divergence is zero at the prior", call("gm.loss.kl_divergence", "$mean", "$logvar"),
          lambda: {"mean": torch.zeros(2, 5), "logvar": torch.zeros(2, 5)}, atol=0, rtol=0),
    Check("kl_divergence on (B, D) inputs", call("gm.loss.kl_divergence", "$mean", "$logvar"),
          lambda: _gaussian((3, 6), 1, 0.8, 0.7), atol=1e-5),
    Check("reparameterize samples the posterior", call(REPARAMETERIZE, "$mean", "$logvar", seed=0), _posterior,
          prop=_samples_posterior),
    Check("reparameterize passes gradients to mean and logvar",
          call(REPARAMETERIZE, "$mean", "$logvar", seed=1, grad={"of": "out", "inputs": ["mean", "logvar"]}),
          lambda: _gaussian((5, 4), 2), prop=_gradients),
]
