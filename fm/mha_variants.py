"""Two multi-head attention layers from the theory problem "why an output projection?".

MHA1 (the standard layer): each head maps values to `d_head` dims, the heads are concatenated and projected by
W^O (H*d_head x d_out). MHA2: each head maps values straight to `d_out` dims and the heads are summed.

Splitting W^O into row blocks W^O_1..W^O_H (each d_head x d_out) gives concat(head_h) W^O = sum_h head_h W^O_h, and
head_h W^O_h = softmax(.) (V W^V_h) W^O_h = softmax(.) V (W^V_h W^O_h), so MHA2 with W^V_h <- W^V_h W^O_h computes
the same function (`mha1_to_mha2`). The converse needs rank(W^V_h) <= d_head: MHA1 is MHA2 with every value map
factorised through d_head dims, which is why it is cheaper.

Weights follow the problem's notation (row-vector convention, x @ W), no biases:
    w_q: (H, d_q, d_attn)   w_k: (H, d_k, d_attn)   w_v: (H, d_v, d_head) for MHA1, (H, d_v, d_out) for MHA2
    w_o: (H * d_head, d_out) for MHA1 only
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.params import count_parameters as count_parameters  # re-exported: the theory counts with it
from fm.attention import MultiHeadSelfAttention


class _MultiHeadBase(nn.Module):
    """Per-head query/key projections and the attention of every head; subclasses define the values."""

    def __init__(self, d_q: int, d_k: int, d_attn: int, n_heads: int):
        super().__init__()
        for name, value in {"d_q": d_q, "d_k": d_k, "d_attn": d_attn, "n_heads": n_heads}.items():
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.n_heads = n_heads
        self.w_q = nn.Parameter(torch.empty(n_heads, d_q, d_attn))
        self.w_k = nn.Parameter(torch.empty(n_heads, d_k, d_attn))

    def reset_parameters(self) -> None:
        for w in self.parameters():  # fan-in scaling keeps activations O(1)
            nn.init.normal_(w, std=1 / math.sqrt(w.shape[-2]))

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_v: torch.Tensor, causal: bool) -> torch.Tensor:
        """q: (B, Lq, d_q), k: (B, Lk, d_k), v: (B, Lk, d_v) -> (B, H, Lq, w_v.shape[-1]) head outputs."""
        for name, x, w in (("Q", q, self.w_q), ("K", k, self.w_k), ("V", v, w_v)):
            if x.ndim != 3 or x.shape[-1] != w.shape[1]:
                raise ValueError(f"{name} must have shape (B, L, {w.shape[1]}), got {tuple(x.shape)}")
        if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
            raise ValueError(f"batch/length mismatch: Q {tuple(q.shape)}, K {tuple(k.shape)}, V {tuple(v.shape)}")
        qh = torch.einsum("bld,hde->bhle", q, self.w_q)
        kh = torch.einsum("bld,hde->bhle", k, self.w_k)
        vh = torch.einsum("bld,hde->bhle", v, w_v)
        # softmax(q k^T / sqrt(d_attn)) v: SDPA scales by 1/sqrt of the query width, which is d_attn
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)


class MHA1(_MultiHeadBase):
    """Standard MHA: heads of width d_head, concatenated, then the output projection W^O."""

    def __init__(self, d_q: int, d_k: int, d_v: int, d_attn: int, d_head: int, d_out: int, n_heads: int):
        super().__init__(d_q, d_k, d_attn, n_heads)
        self.w_v = nn.Parameter(torch.empty(n_heads, d_v, d_head))
        self.w_o = nn.Parameter(torch.empty(n_heads * d_head, d_out))
        self.reset_parameters()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """-> (B, Lq, d_out)."""
        h = self.heads(q, k, v, self.w_v, causal)  # (B, H, Lq, d_head)
        concat = h.transpose(1, 2).flatten(2)  # (B, Lq, H * d_head), head 1 first
        return concat @ self.w_o


class MHA2(_MultiHeadBase):
    """MHA without output projection: heads of width d_out, summed."""

    def __init__(self, d_q: int, d_k: int, d_v: int, d_attn: int, d_out: int, n_heads: int):
        super().__init__(d_q, d_k, d_attn, n_heads)
        self.w_v = nn.Parameter(torch.empty(n_heads, d_v, d_out))
        self.reset_parameters()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """-> (B, Lq, d_out)."""
        return self.heads(q, k, v, self.w_v, causal).sum(dim=1)


@torch.no_grad()
def mha1_to_mha2(mha1: MHA1) -> MHA2:
    """The MHA2 computing the same function as `mha1`: W^V_h <- W^V_h W^O_h, queries and keys copied."""
    n_heads, d_v, d_head = mha1.w_v.shape
    d_out = mha1.w_o.shape[1]
    mha2 = MHA2(mha1.w_q.shape[1], mha1.w_k.shape[1], d_v, mha1.w_q.shape[2], d_out, n_heads)
    mha2.to(device=mha1.w_q.device, dtype=mha1.w_q.dtype)
    mha2.w_q.copy_(mha1.w_q)
    mha2.w_k.copy_(mha1.w_k)
    w_o_blocks = mha1.w_o.view(n_heads, d_head, d_out)  # row block h of W^O is W^O_h
    mha2.w_v.copy_(mha1.w_v @ w_o_blocks)  # batched over heads: (H, d_v, d_head) @ (H, d_head, d_out)
    return mha2


@torch.no_grad()
def mha1_from_gpt2_attention(attn: MultiHeadSelfAttention) -> MHA1:
    """The MHA1 equal to `fm.attention.MultiHeadSelfAttention` (bias-free) with Q = K = V = x and a causal mask:
    `c_attn` stacks the per-head query, key and value maps (nn.Linear computes x W^T), `c_proj` is W^O."""
    if attn.c_attn.bias is not None:
        raise ValueError("the theory's MHA has no biases; build MultiHeadSelfAttention(..., bias=False)")
    d, n_heads = attn.n_embd, attn.n_head
    d_head = d // n_heads
    weight = attn.c_attn.weight
    mha1 = MHA1(d, d, d, d_head, d_head, d, n_heads).to(device=weight.device, dtype=weight.dtype)
    w_q, w_k, w_v = weight.T.split(d, dim=1)  # each (d, d): x @ w_q gives all heads' queries side by side
    for target, w in ((mha1.w_q, w_q), (mha1.w_k, w_k), (mha1.w_v, w_v)):
        target.copy_(w.reshape(d, n_heads, d_head).transpose(0, 1))  # column block h -> head h
    mha1.w_o.copy_(attn.c_proj.weight.T)
    return mha1


def mha_param_formula(d_q: int, d_k: int, d_v: int, d_attn: int, d_head: int, d_out: int, n_heads: int) -> dict:
    """Closed-form parameter counts: MHA1 = H(d_q d_attn + d_k d_attn + d_v d_head) + H d_head d_out,
    MHA2 = H(d_q d_attn + d_k d_attn + d_v d_out); difference = H(d_v d_out - d_head (d_v + d_out))."""
    qk = n_heads * (d_q + d_k) * d_attn
    mha1 = qk + n_heads * d_v * d_head + n_heads * d_head * d_out
    mha2 = qk + n_heads * d_v * d_out
    return {"MHA1": mha1, "MHA2": mha2, "MHA2 - MHA1": mha2 - mha1}
