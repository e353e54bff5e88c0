"""Public checks of task 1.1, multi-head self-attention (fm/attention.py): the homework's reference check (Q, K, V
= torch.rand(1, 1, 3, 4) each after torch.manual_seed(0), error below 1e-6), agreement with PyTorch's attention
under causal and padding masks, the masking, dropout on the weights, return_weights, and the module's KV cache."""

import torch

from course.checks import Check, call

MHSA = "fm.attention.multi_head_self_attention"
DROPOUT0 = {"dropout": ("dropout", 0.0)}


def _homework_qkv(mask: list[list[int]]) -> dict:
    torch.manual_seed(0)
    Q, K, V = torch.rand(1, 1, 3, 4), torch.rand(1, 1, 3, 4), torch.rand(1, 1, 3, 4)
    return {"Q": Q, "K": K, "V": V, "mask": torch.tensor(mask)[None, None]}


def _causal_padded(B: int, h: int, T: int, d: int) -> dict:
    gen = torch.Generator().manual_seed(B * 100 + T)
    Q, K, V = (torch.randn(B, h, T, d, generator=gen) for _ in range(3))
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    pad = (torch.arange(T)[None] >= (T - lengths)[:, None]).long()  # left padding, one real token at least
    return {"Q": Q, "K": K, "V": V, "mask": torch.tril(torch.ones(T, T))[None, None], "pad": pad}


def _scores() -> dict:
    gen = torch.Generator().manual_seed(5)
    return {"scores": torch.randn(2, 3, 4, 4, generator=gen), "mask": torch.tril(torch.ones(4, 4))[None, None],
            "pad": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])}


def _masked_scores(inputs: dict, outputs: dict) -> str | None:
    scores, out = inputs["scores"], outputs.get("out")
    if not isinstance(out, torch.Tensor) or out.shape != scores.shape:
        return f"expected a tensor of shape {tuple(scores.shape)}, received {getattr(out, 'shape', out)!r}"
    forbidden = ~(inputs["mask"].bool() & inputs["pad"].bool()[:, None, None, :]).expand_as(scores)
    if not torch.equal(out[~forbidden], scores[~forbidden]):
        return "allowed scores must stay unchanged"
    if not (out[forbidden] < -1e30).all():
        return "forbidden scores must become (close to) -inf: below -1e30"
    if not torch.isfinite(out).all():
        return "use a finite fill value: a row with every key forbidden must not give NaN after the softmax"
    return None


QKV = ("$Q", "$K", "$V", "$mask", "@dropout")
CHECKS = [
    Check("reference check (all-ones mask)", call(MHSA, *QKV, objects=DROPOUT0),
          lambda: _homework_qkv([[1, 1, 1], [1, 1, 1], [1, 1, 1]]), atol=1e-6, rtol=0),
    Check("reference check (mask [[1,1,0],[0,1,0],[1,1,1]])", call(MHSA, *QKV, objects=DROPOUT0),
          lambda: _homework_qkv([[1, 1, 0], [0, 1, 0], [1, 1, 1]]), atol=1e-6, rtol=0),
    *(Check(f"causal attention, (B, h, T, d) = {shape}", call(MHSA, *QKV, objects=DROPOUT0),
            lambda shape=shape: _causal_padded(*shape)) for shape in ((2, 3, 5, 8), (3, 1, 7, 4), (1, 4, 1, 16))),
    Check("causal and left-padding masks together", call(MHSA, *QKV, objects=DROPOUT0, attention_mask="$pad"),
          lambda: _causal_padded(2, 3, 5, 8)),
    Check("get_masked_attention hides exactly the forbidden scores with a finite fill",
          call("fm.attention.get_masked_attention", "$scores", "$mask", "$pad"), _scores, prop=_masked_scores),
    Check("dropout acts on the (B, h, T, S) attention weights",
          call(MHSA, "$Q", "$K", "$V", "$mask", "@recorder", objects={"recorder": ("recorder", None)}),
          lambda: _causal_padded(2, 2, 5, 4), atol=1e-6),
    Check("return_weights=True returns (out, weights)",
          call(MHSA, *QKV, objects=DROPOUT0, attention_mask="$pad", return_weights=True),
          lambda: _causal_padded(3, 2, 6, 4), atol=1e-6,
          hint="return_weights=True must return (out, weights): MultiHeadSelfAttention and the 1.1 notebook use it"),
    Check("MultiHeadSelfAttention is causal and its KV cache matches a full pass",
          {"adapter": "mhsa_cache", "seed": 0, "init": {"n_embd": 16, "n_head": 4, "block_size": 16}, "split": 4},
          lambda: {"x": torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))}, atol=1e-6),
]
