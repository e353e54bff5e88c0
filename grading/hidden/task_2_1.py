"""Hidden checks of task 2.1 (never in the student release)."""

import torch

from course.checks import Check, call


def _float64() -> dict:
    gen = torch.Generator().manual_seed(21)
    return {"mean": torch.randn(3, 2, 5, generator=gen, dtype=torch.float64) * 2,
            "logvar": torch.randn(3, 2, 5, generator=gen, dtype=torch.float64) * 3}


def _train_samples_eval_uses_the_mean(inputs: dict, outputs: dict) -> str | None:
    if torch.equal(outputs["train.0"], outputs["train.1"]):
        return "in training mode the VAE must sample z (two passes gave the same output)"
    if not torch.equal(outputs["eval.0"], outputs["eval.1"]):
        return "in eval mode the VAE must use the mean (two passes differed)"
    return None


CHECKS = [
    Check("the closed form in float64", call("gm.loss.kl_divergence", "$mean", "$logvar"), _float64, atol=1e-10,
          rtol=1e-10),
    Check("the VAE samples in training and uses the mean in eval", {"adapter": "vae_modes", "seed": 0},
          lambda: {"x": torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))},
          prop=_train_samples_eval_uses_the_mean),
]
