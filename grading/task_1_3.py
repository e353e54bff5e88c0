"""Public checks of task 1.3, the DPO loss (fm/dpo.py) and the IPO loss beside it."""

import torch

from course.checks import Check, call

LOGPS = ("$pc", "$pr", "$rc", "$rr")
GRAD = {"of": "out.0", "inputs": ["pc", "pr"]}


def _by_hand() -> dict:
    return {k: torch.tensor([v]) for k, v in zip(("pc", "pr", "rc", "rr"), (-10.0, -12.0, -11.0, -11.5), strict=True)}


def _batch(seed: int, n: int = 16, dtype: torch.dtype = torch.float32, scale: float = 5.0, shift: float = -20.0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, generator=gen, dtype=dtype) * scale + shift for k in ("pc", "pr", "rc", "rr")}


def _policy_is_reference() -> dict:
    logps = torch.randn(2, 5, generator=torch.Generator().manual_seed(4)) * 20
    return {"pc": logps[0], "pr": logps[1], "rc": logps[0].clone(), "rr": logps[1].clone()}


CHECKS = [
    Check("dpo_loss by hand (beta 0.5)", call("fm.dpo.dpo_loss", *LOGPS, beta=0.5), _by_hand, atol=1e-6),
    Check("dpo_loss is log 2 when the policy is the reference", call("fm.dpo.dpo_loss", *LOGPS, beta=0.3),
          _policy_is_reference, atol=1e-6),
    Check("dpo_loss on a float64 batch", call("fm.dpo.dpo_loss", *LOGPS, beta=0.2),
          lambda: _batch(3, dtype=torch.float64), atol=1e-10, rtol=1e-10),
    Check("label smoothing gives the conservative DPO loss",
          call("fm.dpo.dpo_loss", *LOGPS, beta=0.5, label_smoothing=0.2), _by_hand, atol=1e-6),
    Check("the gradient raises chosen, lowers rejected; the rewards are detached (requires_grad False)",
          call("fm.dpo.dpo_loss", *LOGPS, grad=GRAD), lambda: _batch(5, n=6, scale=2.0, shift=-5.0)),
    Check("ipo_loss on a batch, with its gradient", call("fm.dpo.ipo_loss", *LOGPS, beta=0.25, grad=GRAD),
          lambda: _batch(6, n=8, scale=1.0, shift=-3.0)),
]
