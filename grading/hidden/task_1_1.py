"""Hidden checks of task 1.1 (never in the student release): the same maths on inputs no student has seen."""

import torch

from course.checks import Check, call

MHSA = "fm.attention.multi_head_self_attention"


def _float64_longer_keys() -> dict:
    gen = torch.Generator().manual_seed(2024)
    B, h, T, S, d = 3, 2, 4, 7, 6  # S > T: queries after 3 cached keys
    Q = torch.randn(B, h, T, d, generator=gen, dtype=torch.float64)
    K, V = (torch.randn(B, h, S, d, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = (torch.rand(1, 1, T, S, generator=gen) < 0.6).long()
    mask[..., 0] = 1
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, 3:5] = 0
    return {"Q": Q, "K": K, "V": V, "mask": mask, "pad": pad}


def _seed7() -> dict:
    torch.manual_seed(7)
    Q, K, V = torch.rand(2, 3, 5, 8), torch.rand(2, 3, 5, 8), torch.rand(2, 3, 5, 8)
    return {"Q": Q, "K": K, "V": V, "mask": torch.tril(torch.ones(5, 5))[None, None]}


CHECKS = [
    Check("float64 inputs, random masks, more keys than queries",
          call(MHSA, "$Q", "$K", "$V", "$mask", "@dropout", objects={"dropout": ("dropout", 0.0)},
               attention_mask="$pad"), _float64_longer_keys, atol=1e-10, rtol=1e-10),
    Check("the reference check at another seed and size",
          call(MHSA, "$Q", "$K", "$V", "$mask", "@dropout", objects={"dropout": ("dropout", 0.0)}), _seed7,
          atol=1e-6, rtol=0),
]
