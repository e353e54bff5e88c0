import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fm.attention import MultiHeadSelfAttention, causal_sdpa, get_masked_attention, multi_head_self_attention

REF_FULL = [
    [0.2388347, 0.3764442, 0.4025784, 0.3575858],
    [0.2417322, 0.3746578, 0.4052466, 0.3076115],
    [0.2409207, 0.3766766, 0.4065247, 0.3363450],
]
REF_MASKED = [
    [0.2798553, 0.4459440, 0.5667919, 0.5700190],
    [0.1852310, 0.3734174, 0.3051000, 0.9320004],
    [0.2409207, 0.3766766, 0.4065247, 0.3363450],
]


def _qkv():
    torch.manual_seed(0)
    Q = torch.rand(1, 1, 3, 4)
    K = torch.rand(1, 1, 3, 4)
    V = torch.rand(1, 1, 3, 4)
    return Q, K, V


@pytest.mark.parametrize(
    "mask, reference",
    [([[1, 1, 1], [1, 1, 1], [1, 1, 1]], REF_FULL), ([[1, 1, 0], [0, 1, 0], [1, 1, 1]], REF_MASKED)],
    ids=["all-ones", "custom"],
)
def test_reference_values(mask, reference):
    out = multi_head_self_attention(*_qkv(), torch.tensor(mask)[None, None], nn.Dropout(0.0))
    assert (out[0, 0] - torch.tensor(reference)).abs().sum().item() < 1e-6


def _padding_mask(B, T, gen):
    """Left padding of a random length per row (at least one real token each)."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    return (torch.arange(T)[None] >= (T - lengths)[:, None]).long()


@pytest.mark.parametrize("B, h, T, d", [(2, 3, 5, 8), (3, 1, 7, 4), (1, 4, 1, 16)])
def test_matches_sdpa_with_causal_and_padding_masks(B, h, T, d):
    gen = torch.Generator().manual_seed(B * 100 + T)
    Q, K, V = (torch.randn(B, h, T, d, generator=gen) for _ in range(3))
    causal = torch.tril(torch.ones(T, T))[None, None]
    ours = multi_head_self_attention(Q, K, V, causal, nn.Dropout(0.0))
    ref = F.scaled_dot_product_attention(Q, K, V, is_causal=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    pad = _padding_mask(B, T, gen)
    ours = multi_head_self_attention(Q, K, V, causal, nn.Dropout(0.0), attention_mask=pad)
    assert not torch.isnan(ours).any()
    allowed = causal.bool() & pad.bool()[:, None, None, :]
    ref = F.scaled_dot_product_attention(Q, K, V, attn_mask=allowed)
    real = pad.bool()  # padding queries attend to nothing; their output is never used
    torch.testing.assert_close(ours.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


def test_masked_scores_are_tiny_only_where_forbidden():
    scores = torch.zeros(2, 1, 3, 3)
    causal = torch.tril(torch.ones(3, 3))[None, None]
    pad = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = get_masked_attention(scores, causal, pad)
    forbidden = ~(causal.bool() & pad.bool()[:, None, None, :])
    assert (out[forbidden] < -1e30).all() and (out[~forbidden] == 0).all()


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(n_embd=16, n_head=2, block_size=8, dropout=0.5)
    x = torch.randn(2, 8, 16)
    attn.eval()
    y1, _ = attn(x)
    y2, _ = attn(x)
    torch.testing.assert_close(y1, y2)
    attn.train()
    y3, _ = attn(x)
    assert not torch.allclose(y1, y3)


def test_module_kv_cache_matches_full_pass():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(n_embd=16, n_head=4, block_size=16).eval()
    x = torch.randn(2, 6, 16)
    full, _ = attn(x)
    first, past = attn(x[:, :4], use_cache=True)
    rest, _ = attn(x[:, 4:], layer_past=past)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-6, rtol=1e-5)


def test_clear_errors_on_bad_shapes():
    Q = torch.rand(1, 2, 3, 4)
    drop = nn.Dropout(0.0)
    with pytest.raises(ValueError, match="disagree"):
        multi_head_self_attention(Q, torch.rand(1, 2, 3, 5), torch.rand(1, 2, 3, 5), torch.ones(1, 1, 3, 3), drop)
    with pytest.raises(ValueError, match="mask must be"):
        multi_head_self_attention(Q, Q, Q, torch.ones(1, 1, 4, 4), drop)
    with pytest.raises(ValueError, match="attention_mask must be"):
        multi_head_self_attention(Q, Q, Q, torch.ones(1, 1, 3, 3), drop, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadSelfAttention(n_embd=10, n_head=3, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        MultiHeadSelfAttention(n_embd=8, n_head=2, block_size=4)(torch.rand(1, 5, 8))
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        MultiHeadSelfAttention(n_embd=8, n_head=2, block_size=4, attn_impl="flash")
    with pytest.raises(ValueError, match="fewer than"):
        causal_sdpa(Q, Q[:, :, :2], Q[:, :, :2])
    with pytest.raises(ValueError, match="attention_mask must be"):
        causal_sdpa(Q, Q, Q, attention_mask=torch.ones(1, 5))


def _manual(Q, K, V, attention_mask=None):
    """The homework's attention with the causal mask offset by the S - T cached keys."""
    T, S = Q.shape[-2], K.shape[-2]
    causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)[None, None]
    return multi_head_self_attention(Q, K, V, causal, nn.Dropout(0.0), attention_mask)


@pytest.mark.parametrize("past", [0, 3], ids=["no-cache", "cache"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
@pytest.mark.parametrize("T", [1, 6])
def test_sdpa_path_equals_manual(T, padded, past):
    gen = torch.Generator().manual_seed(10 * T + past + padded)
    B, h, d, S = 3, 2, 8, past + T
    Q = torch.randn(B, h, T, d, generator=gen, requires_grad=True)
    K, V = (torch.randn(B, h, S, d, generator=gen, requires_grad=True) for _ in range(2))
    pad = _padding_mask(B, S, gen) if padded else None
    if padded:
        pad[0] = 1  # one row without padding
    fast, ref = causal_sdpa(Q, K, V, pad), _manual(Q, K, V, pad)
    assert not torch.isnan(fast).any()
    real = torch.ones(B, T, dtype=torch.bool) if pad is None else pad[:, -T:].bool()  # padding queries are never used
    torch.testing.assert_close(fast.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)

    weight = torch.randn(B, T, h, d, generator=gen)  # a loss over the real queries only
    grads = [torch.autograd.grad((out.transpose(1, 2)[real] * weight[real]).sum(), (Q, K, V)) for out in (fast, ref)]
    for g_fast, g_ref in zip(*grads, strict=True):
        assert not torch.isnan(g_fast).any()
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)


def test_sdpa_module_equals_manual_with_cache_and_padding():
    torch.manual_seed(0)
    manual = MultiHeadSelfAttention(n_embd=16, n_head=4, block_size=16, dropout=0.3).eval()
    sdpa = MultiHeadSelfAttention(n_embd=16, n_head=4, block_size=16, dropout=0.3, attn_impl="sdpa").eval()
    sdpa.load_state_dict(manual.state_dict())
    x = torch.randn(2, 7, 16)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    outputs = []
    for attn in (manual, sdpa):  # prefill 5 positions, then decode 2 one at a time; eval mode: no dropout
        first, past = attn(x[:, :5], attention_mask=pad[:, :5], use_cache=True)
        second, past = attn(x[:, 5:6], attention_mask=pad[:, :6], layer_past=past, use_cache=True)
        third, _ = attn(x[:, 6:], attention_mask=pad, layer_past=past)
        outputs.append(torch.cat([first, second, third], dim=1)[pad.bool()])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    _, _, weights = sdpa(x, return_weights=True)  # SDPA has no weights: the manual path gives them
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))


def test_sdpa_dropout_only_in_training_mode():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(n_embd=16, n_head=2, block_size=8, dropout=0.5, attn_impl="sdpa")
    x = torch.randn(2, 8, 16)
    attn.eval()
    y1, _ = attn(x)
    torch.testing.assert_close(attn(x)[0], y1)
    attn.train()
    assert not torch.allclose(attn(x)[0], y1)
