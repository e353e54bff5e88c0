"""Setup shared by the theory checks of notebook 0_theory: simulation sizes per profile and the toy data.

The topics live one per module: `gm.theory_reverse` (P1, the DDPM reverse conditional), `gm.theory_ddim` (P2, DDIM's
non-Markovian family), `gm.theory_ou` (P3, denoising score matching for the Ornstein-Uhlenbeck process),
`gm.theory_gauss` (the solutions' 1-D Gaussian exercise) and `fm.theory_mha` (P4, multi-head attention). Time indices
follow the homework: t = 1..T, `betas[t - 1]` is beta_t, and abar_0 = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from common.checks import DTYPE, randn
from common.config import check


@dataclass
class TheoryConfig:
    """Sizes of the simulations: `n_samples` Monte Carlo draws per check, `reverse_steps` T of "Gauss 1-D"."""

    n_samples: int
    reverse_steps: int
    data_var: float = 0.05  # sigma^2 of the 1-D Gaussian data of "Gauss 1-D" (sigma^2 << 1)
    ddim_steps: int = 50  # length of the alpha sequence of the DDIM family (a DDIM-50 subsequence of DDPM's 1000)
    seed: int = 0

    def __post_init__(self):
        check(self.n_samples >= 1000, f"n_samples must be >= 1000 for meaningful Monte Carlo, got {self.n_samples}")
        check(self.reverse_steps >= 2, f"reverse_steps must be >= 2, got {self.reverse_steps}")
        check(0 < self.data_var < 1, f"data_var must lie in (0, 1), got {self.data_var}")
        check(self.ddim_steps >= 2, f"ddim_steps must be >= 2, got {self.ddim_steps}")


PRESETS = {
    "smoke": {"n_samples": 10_000, "reverse_steps": 200},
    "quick": {"n_samples": 100_000, "reverse_steps": 1000},
    "full": {"n_samples": 1_000_000, "reverse_steps": 5000},
}


def toy_data(n: int, generator: torch.Generator) -> Tensor:
    """(n,) draws from a bimodal, non-Gaussian p_data (0.5 N(-1, 0.1^2) + 0.5 N(1, 0.1^2)): the DDPM/DDIM results
    hold conditionally on x_0, for any data distribution."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(DTYPE) * 2 - 1
    return signs + 0.1 * randn(n, generator)
