"""Numerical checks of theory problem P4: multi-head attention with (MHA1) and without (MHA2) output projection.

MHA1 == MHA2 once each head's value map absorbs its block of W^O (W^V_h <- W^V_h W^O_h), on cross-attention with
unequal widths and on the package's causal GPT-2 attention block; the mapped value maps have rank <= d_head; and the
parameter counts of real modules match `fm.mha_variants.mha_param_formula`. Deterministic checks in float64.
"""

from __future__ import annotations

import torch

from common.checks import DTYPE, Check
from fm.attention import MultiHeadSelfAttention
from fm.mha_variants import MHA1, MHA2, count_parameters, mha1_from_gpt2_attention, mha1_to_mha2, mha_param_formula


def mha_checks(d_model: int = 512, d_head: int = 64, seed: int = 0) -> list[Check]:
    """MHA1 == MHA2 after W^V_h <- W^V_h W^O_h (cross-attention with unequal widths, causal self-attention, and the
    package's GPT-2 attention block), the rank of the mapped value maps (<= d_head), and parameter counts of real
    modules with d_v = d_out = d_q = d_k = `d_model`, d_attn = d_head, H = d_model / d_head against the formula."""
    torch.manual_seed(seed)
    checks = []
    mha1 = MHA1(d_q=24, d_k=20, d_v=16, d_attn=8, d_head=4, d_out=12, n_heads=3).double()
    mha2 = mha1_to_mha2(mha1)
    q, k, v = (torch.randn(2, length, width, dtype=DTYPE) for length, width in ((5, 24), (7, 20), (7, 16)))
    with torch.no_grad():
        diff = (mha1(q, k, v) - mha2(q, k, v)).abs().max().item()
    checks.append(Check("P4 MHA", "max |MHA1 - MHA2|, cross-attention, d_q,d_k,d_v,d_out = 24,20,16,12", 0.0, diff))

    n_heads = d_model // d_head
    gpt2 = MultiHeadSelfAttention(d_model, n_heads, block_size=16, bias=False).double().eval()
    mha1 = mha1_from_gpt2_attention(gpt2)
    mha2 = mha1_to_mha2(mha1)
    x = torch.randn(2, 16, d_model, dtype=DTYPE)
    with torch.no_grad():
        reference = gpt2(x)[0]
        checks += [
            Check("P4 MHA", f"max |fm.attention block - MHA1|, causal, d={d_model}", 0.0,
                  (reference - mha1(x, x, x, causal=True)).abs().max().item()),
            Check("P4 MHA", f"max |fm.attention block - MHA2 (mapped)|, causal, d={d_model}", 0.0,
                  (reference - mha2(x, x, x, causal=True)).abs().max().item()),
        ]
    rank = max(int(torch.linalg.matrix_rank(w)) for w in mha2.w_v.detach())
    checks.append(Check("P4 MHA", f"max rank of mapped W^V_h ({d_model}x{d_model}), bound d_head", d_head, rank))

    dims = {"d_q": d_model, "d_k": d_model, "d_v": d_model, "d_attn": d_head, "d_out": d_model, "n_heads": n_heads}
    formula = mha_param_formula(d_head=d_head, **dims)
    counts = {"MHA1": count_parameters(MHA1(d_head=d_head, **dims)), "MHA2": count_parameters(MHA2(**dims))}
    counts["MHA2 - MHA1"] = counts["MHA2"] - counts["MHA1"]
    label = f"d_v=d_out={d_model}, d_head=d_attn={d_head}, H={n_heads}"
    checks += [Check("P4 MHA", f"parameters {name}, {label}", formula[name], counts[name]) for name in counts]
    checks.append(Check("P4 MHA", "parameters fm.attention block (bias=False) = MHA1", formula["MHA1"],
                        count_parameters(gpt2)))
    return checks
