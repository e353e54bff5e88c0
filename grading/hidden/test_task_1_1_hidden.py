"""Hidden graded tests of task 1.1 (not in the student release): the same maths on inputs no student has seen."""

import torch
from torch import nn

from fm.attention import multi_head_self_attention


def _reference(Q, K, V, allowed):
    scores = torch.einsum("bhtd,bhsd->bhts", Q, K) / Q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ V


def test_random_masks_and_a_longer_key_sequence_in_float64():
    gen = torch.Generator().manual_seed(2024)
    B, h, T, S, d = 3, 2, 4, 7, 6  # S > T: queries after 3 cached keys
    Q = torch.randn(B, h, T, d, generator=gen, dtype=torch.float64)
    K, V = (torch.randn(B, h, S, d, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = (torch.rand(1, 1, T, S, generator=gen) < 0.6).long()
    mask[..., 0] = 1  # every query may attend to at least one key
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, 3:5] = 0
    allowed = mask.bool() & pad.bool()[:, None, None, :]
    out = multi_head_self_attention(Q, K, V, mask, nn.Dropout(0.0), attention_mask=pad)
    torch.testing.assert_close(out, _reference(Q, K, V, allowed), atol=1e-10, rtol=1e-10)


def test_the_reference_check_at_another_seed():
    torch.manual_seed(7)
    Q, K, V = torch.rand(2, 3, 5, 8), torch.rand(2, 3, 5, 8), torch.rand(2, 3, 5, 8)
    mask = torch.tril(torch.ones(5, 5))[None, None]
    out = multi_head_self_attention(Q, K, V, mask, nn.Dropout(0.0))
    assert (out - _reference(Q, K, V, mask.bool())).abs().sum().item() < 1e-5
