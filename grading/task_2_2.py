"""Public checks of task 2.2, the hinge losses of the VAE + PatchGAN (gm/loss.py)."""

import torch

from course.checks import Check, call


def _logits() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"real": torch.randn(4, 1, 6, 6, generator=gen) * 2, "fake": torch.randn(4, 1, 6, 6, generator=gen) * 2}


def _separates(inputs: dict, outputs: dict) -> str | None:
    if not outputs["last"] < 0.5 * outputs["first"]:
        return f"15 Adam steps took D's hinge loss from {outputs['first']:.4g} to {outputs['last']:.4g}, not below half"
    if not outputs["g_fake"] > outputs["g_real"]:
        return "after training, G's hinge loss must be higher on fakes than on real images"
    return None


CHECKS = [
    Check("d_hinge_loss by hand", call("gm.loss.d_hinge_loss", "$real", "$fake"),
          lambda: {"real": torch.tensor([2.0, 0.5, -1.0]), "fake": torch.tensor([-2.0, 0.0])}, atol=1e-6),
    Check("d_hinge_loss on patch logits, with its gradients",
          call("gm.loss.d_hinge_loss", "$real", "$fake", grad={"of": "out", "inputs": ["real", "fake"]}), _logits),
    Check("g_hinge_loss on patch logits, with its gradient",
          call("gm.loss.g_hinge_loss", "$fake", grad={"of": "out", "inputs": ["fake"]}), _logits),
    Check("the discriminator learns to separate with the hinge loss",
          {"adapter": "fit", "loss": "hinge", "seed": 0, "lr": 2e-3, "betas": [0.5, 0.9], "steps": 15},
          lambda: {"real": torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1)).round(),
                   "fake": torch.full((8, 1, 32, 32), 0.5)}, prop=_separates),
]
