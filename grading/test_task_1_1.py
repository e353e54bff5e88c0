"""Graded tests of task 1.1, multi-head self-attention (fm/attention.py).

First the homework's reference check: with torch.manual_seed(0) and Q, K, V = torch.rand(1, 1, 3, 4) each, the
output must match the two reference outputs with a summed absolute error below 1e-6.
"""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fm.attention import MultiHeadSelfAttention, get_masked_attention, multi_head_self_attention

REFERENCES = {
    "all-ones mask": (
        [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
        [[0.2388347, 0.3764442, 0.4025784, 0.3575858],
         [0.2417322, 0.3746578, 0.4052466, 0.3076115],
         [0.2409207, 0.3766766, 0.4065247, 0.3363450]],
    ),
    "mask [[1,1,0],[0,1,0],[1,1,1]]": (
        [[1, 1, 0], [0, 1, 0], [1, 1, 1]],
        [[0.2798553, 0.4459440, 0.5667919, 0.5700190],
         [0.1852310, 0.3734174, 0.3051000, 0.9320004],
         [0.2409207, 0.3766766, 0.4065247, 0.3363450]],
    ),
}
TOLERANCE = 1e-6


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_check(name):
    mask, reference = REFERENCES[name]
    torch.manual_seed(0)
    Q, K, V = torch.rand(1, 1, 3, 4), torch.rand(1, 1, 3, 4), torch.rand(1, 1, 3, 4)
    try:
        out = multi_head_self_attention(Q, K, V, torch.tensor(mask)[None, None], nn.Dropout(0.0))
    except Exception as err:  # whatever went wrong, the message names the reference check
        pytest.fail(f"reference check failed ({name}): multi_head_self_attention raised {err!r}")
    assert tuple(out.shape) == (1, 1, 3, 4), f"reference check failed ({name}): output shape {tuple(out.shape)}"
    error = (out[0, 0] - torch.tensor(reference)).abs().sum().item()
    assert error < TOLERANCE, (
        f"reference check failed ({name}): summed absolute error {error:.3g} against the homework's reference "
        f"output, must be < {TOLERANCE:g}"
    )


def _padding_mask(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Left padding of a random length per row, at least one real token each: (B, T) of 0/1."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    return (torch.arange(T)[None] >= (T - lengths)[:, None]).long()


@pytest.mark.parametrize("B, h, T, d", [(2, 3, 5, 8), (3, 1, 7, 4), (1, 4, 1, 16)])
def test_equals_scaled_dot_product_attention_with_causal_and_padding_masks(B, h, T, d):
    gen = torch.Generator().manual_seed(B * 100 + T)
    Q, K, V = (torch.randn(B, h, T, d, generator=gen) for _ in range(3))
    causal = torch.tril(torch.ones(T, T))[None, None]
    ours = multi_head_self_attention(Q, K, V, causal, nn.Dropout(0.0))
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(Q, K, V, is_causal=True), atol=1e-5, rtol=1e-5)

    pad = _padding_mask(B, T, gen)
    ours = multi_head_self_attention(Q, K, V, causal, nn.Dropout(0.0), attention_mask=pad)
    assert not torch.isnan(ours).any(), "a padding query must not produce NaN"
    allowed = causal.bool() & pad.bool()[:, None, None, :]
    ref = F.scaled_dot_product_attention(Q, K, V, attn_mask=allowed)
    real = pad.bool()  # padding queries attend to nothing; their output is never used
    torch.testing.assert_close(ours.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


def test_get_masked_attention_hides_exactly_the_forbidden_scores():
    scores = torch.randn(2, 3, 4, 4)
    causal = torch.tril(torch.ones(4, 4))[None, None]
    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = get_masked_attention(scores, causal, pad)
    forbidden = ~(causal.bool() & pad.bool()[:, None, None, :]).expand_as(scores)
    assert out.shape == scores.shape
    assert torch.equal(out[~forbidden], scores[~forbidden]), "allowed scores must stay unchanged"
    assert (out[forbidden] < -1e30).all(), "forbidden scores must become (close to) -inf"
    assert torch.isfinite(out).all(), "use a finite fill value: a row with every key forbidden must not give NaN"


def test_dropout_acts_on_the_attention_weights():
    class Recorder(nn.Module):
        def forward(self, x):
            self.seen = x
            return x

    gen = torch.Generator().manual_seed(1)
    Q, K, V = (torch.randn(2, 2, 5, 4, generator=gen) for _ in range(3))
    causal = torch.tril(torch.ones(5, 5))[None, None]
    recorder = Recorder()
    out = multi_head_self_attention(Q, K, V, causal, recorder)
    weights = recorder.seen
    assert weights.shape == (2, 2, 5, 5), "attention_dropout must be applied to the (B, h, T, S) weights"
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 5))
    assert (weights.triu(1) == 0).all(), "masked positions must get zero weight"
    torch.testing.assert_close(out, weights @ V)
    expected = torch.softmax((Q @ K.transpose(-2, -1) / math.sqrt(4)).masked_fill(~causal.bool(), -1e30), -1)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)


def test_module_is_causal_and_its_kv_cache_matches_a_full_pass():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(n_embd=16, n_head=4, block_size=16).eval()
    x = torch.randn(2, 6, 16)
    full, _ = attn(x)
    changed = x.clone()
    changed[:, 4:] += 1.0
    torch.testing.assert_close(attn(changed)[0][:, :4], full[:, :4])  # the future does not leak into the past
    first, past = attn(x[:, :4], use_cache=True)
    rest, _ = attn(x[:, 4:], layer_past=past)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-6, rtol=1e-5)
