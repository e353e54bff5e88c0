"""Hidden checks of task 1.3 (never in the student release)."""

import torch

from course.checks import Check, call

LOGPS = ("$pc", "$pr", "$rc", "$rr")


def _batch() -> dict:
    gen = torch.Generator().manual_seed(11)
    return {k: torch.randn(9, generator=gen, dtype=torch.float64) * 3 - 30 for k in ("pc", "pr", "rc", "rr")}


def _large_margins() -> dict:
    big = torch.tensor([-1000.0, 1000.0])
    return {"pc": big, "pr": -big, "rc": torch.zeros(2), "rr": torch.zeros(2)}


CHECKS = [
    Check("label smoothing on a float64 batch", call("fm.dpo.dpo_loss", *LOGPS, beta=0.37, label_smoothing=0.15),
          _batch, atol=1e-12, rtol=1e-12),
    Check("finite for large margins (log-sigmoid, not log of a sigmoid)", call("fm.dpo.dpo_loss", *LOGPS, beta=1.0),
          _large_margins, atol=1e-3, rtol=1e-6),
    Check("ipo_loss on a float64 batch", call("fm.dpo.ipo_loss", *LOGPS, beta=0.6), _batch, atol=1e-10, rtol=1e-10),
]
