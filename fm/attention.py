"""Causal multi-head self-attention (task 1.1), written out so every step can be read and checked.

Two paths compute the same attention (`MultiHeadSelfAttention(attn_impl=...)`, `fm.model.GPTConfig.attn_impl`):
- "manual": `multi_head_self_attention`, the homework's softmax(Q K^T / sqrt(d)) V, which materialises the scores;
- "sdpa": `causal_sdpa`, `torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel (flash or
  memory-efficient attention on a GPU) that never stores the T x S score matrix.

Shapes: B batch, h heads, T query length, S key length (S = T without a KV cache, S = past + T with one), d head size.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

ATTN_IMPLS = ("manual", "sdpa")


def check_attn_impl(attn_impl: str) -> None:
    """Raise a ValueError naming the choices unless `attn_impl` is one of ATTN_IMPLS."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")


def _check_qkv(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> None:
    if not (Q.dim() == K.dim() == V.dim() == 4):
        raise ValueError(f"Q, K, V must be (B, h, T, d); got {tuple(Q.shape)}, {tuple(K.shape)}, {tuple(V.shape)}")
    if K.shape != V.shape or Q.shape[:2] != K.shape[:2] or Q.shape[-1] != K.shape[-1]:
        raise ValueError(
            "Q (B, h, T, d) and K, V (B, h, S, d) disagree: "
            f"Q {tuple(Q.shape)}, K {tuple(K.shape)}, V {tuple(V.shape)}"
        )


def get_masked_attention(
    attention: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask attention scores.

    attention: (B, h, T, S) scores. mask: (1, 1, T, S) causal mask, 0 = "may not attend".
    attention_mask: optional (B, S) padding mask, 0 = padding key.
    Returns the scores with forbidden entries set to the dtype's most negative finite value. A finite value (not -inf)
    keeps a row whose keys are all forbidden (a padding query) free of NaN after softmax; such rows are never used.
    """
    if attention.dim() != 4:
        raise ValueError(f"attention must be (B, h, T, S), got shape {tuple(attention.shape)}")
    B, _, T, S = attention.shape
    if mask.dim() != 4 or mask.shape[:2] != (1, 1) or mask.shape[-2:] != (T, S):
        raise ValueError(f"mask must be (1, 1, {T}, {S}) for scores {tuple(attention.shape)}, got {tuple(mask.shape)}")
    if attention_mask is not None and attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask must be (B, S) = ({B}, {S}), got {tuple(attention_mask.shape)}")
    ### BEGIN SOLUTION
    allowed = mask.to(torch.bool)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)[:, None, None, :]
    return attention.masked_fill(~allowed, torch.finfo(attention.dtype).min)
    ### END SOLUTION


def multi_head_self_attention(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    mask: torch.Tensor,
    attention_dropout: nn.Module,
    attention_mask: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d) masked) V.

    Q: (B, h, T, d); K, V: (B, h, S, d); mask: (1, 1, T, S); attention_mask: optional (B, S).
    `attention_dropout` is applied to the weights (a `nn.Dropout`, so it acts only in training mode).
    Returns (B, h, T, d), and the (B, h, T, S) weights too when `return_weights`.
    """
    _check_qkv(Q, K, V)
    ### BEGIN SOLUTION
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])  # (B, h, T, S)
    weights = F.softmax(get_masked_attention(scores, mask, attention_mask), dim=-1)
    out = attention_dropout(weights) @ V
    return (out, weights) if return_weights else out
    ### END SOLUTION


def causal_sdpa(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention by `F.scaled_dot_product_attention`: the fast path, equal to `multi_head_self_attention`.

    Q: (B, h, T, d); K, V: (B, h, S, d) with S >= T: the queries are the last T of the S positions (the first S - T
    keys come from a KV cache), so query i may attend to keys j <= S - T + i. attention_mask: optional (B, S),
    0 = padding key. dropout_p: dropout on the attention weights; pass 0 outside training. Returns (B, h, T, d).

    Only the plain case (no cache, no padding) uses the kernel's `is_causal`, which aligns the mask top-left; the
    others pass an explicit boolean mask. A query that may attend to no key (left padding) gets 0 or NaN depending
    on the kernel, so such rows attend to every key instead: finite, and, as in the manual path, never used.
    """
    _check_qkv(Q, K, V)
    (B, _, T, _), S = Q.shape, K.shape[2]
    if S < T:
        raise ValueError(f"K, V have {S} positions, fewer than the {T} queries; they must include the queries' own")
    if attention_mask is not None and attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask must be (B, S) = ({B}, {S}), got {tuple(attention_mask.shape)}")
    past = S - T
    if attention_mask is None and (past == 0 or T == 1):  # one new query after a cache may attend to every key
        return F.scaled_dot_product_attention(Q, K, V, dropout_p=dropout_p, is_causal=past == 0)
    allowed = torch.ones(T, S, dtype=torch.bool, device=Q.device).tril(diagonal=past)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, T, S)
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(Q, K, V, attn_mask=allowed, dropout_p=dropout_p)


class MultiHeadSelfAttention(nn.Module):
    """GPT-2 attention block: `c_attn` projects to Q, K, V; `c_proj` mixes the heads back.

    Module names match transformers' GPT-2 so its weights load (after transposing its Conv1D matrices).
    attn_impl: "manual" (`multi_head_self_attention`) or "sdpa" (`causal_sdpa`); see the module docstring.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        block_size: int,
        dropout: float = 0.0,
        bias: bool = True,
        attn_impl: str = "manual",
    ):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        check_attn_impl(attn_impl)
        self.n_embd, self.n_head, self.block_size, self.attn_impl = n_embd, n_head, block_size, attn_impl
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        causal = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", causal[None, None], persistent=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, h, T, C / h)
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layer_past: tuple[torch.Tensor, torch.Tensor] | None = None,
        use_cache: bool = False,
        return_weights: bool = False,
    ):
        """x: (B, T, C); attention_mask: (B, past + T); layer_past: cached (K, V), each (B, h, past, d).

        Returns (y (B, T, C), present (K, V) or None[, weights (B, h, T, past + T)]). `return_weights` always takes
        the manual path, since SDPA does not return the weights.
        """
        B, T, C = x.shape
        if C != self.n_embd:
            raise ValueError(f"expected input (B, T, {self.n_embd}), got {tuple(x.shape)}")
        q, k, v = (self._split_heads(t) for t in self.c_attn(x).split(self.n_embd, dim=2))
        past = 0
        if layer_past is not None:
            past = layer_past[0].shape[-2]
            k = torch.cat([layer_past[0], k], dim=-2)
            v = torch.cat([layer_past[1], v], dim=-2)
        if past + T > self.block_size:
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.block_size}")
        weights = None
        if self.attn_impl == "sdpa" and not return_weights:
            out = causal_sdpa(q, k, v, attention_mask, self.attn_dropout.p if self.training else 0.0)
        else:
            mask = self.causal_mask[:, :, past : past + T, : past + T]
            out = multi_head_self_attention(q, k, v, mask, self.attn_dropout, attention_mask, return_weights)
            out, weights = out if return_weights else (out, None)
        y = self.resid_dropout(self.c_proj(out.transpose(1, 2).reshape(B, T, C)))
        present = (k, v) if use_cache else None
        return (y, present, weights) if return_weights else (y, present)
