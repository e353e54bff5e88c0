"""Metrics of generations: distinct-n, and the statistics of a comparison (mean with a confidence interval, win
rate with ties counted half)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.checks import Z_95, mean_ci


def distinct_n(sequences: Sequence[Sequence | str], n: int) -> float:
    """Distinct-n (Li et al., 2016): number of unique n-grams / number of n-grams, pooled over all sequences.

    `sequences` holds token lists (ids or strings); a plain string is split on whitespace. 1.0 means no n-gram
    repeats anywhere in the set; a degenerate, looping generator scores near 0. Sequences shorter than `n`
    contribute nothing; with no n-gram at all the result is 0.0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(sequences, str):
        raise TypeError("distinct_n expects a list of sequences, got a single string; wrap it in a list")
    unique, total = set(), 0
    for seq in sequences:
        tokens = seq.split() if isinstance(seq, str) else list(seq)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        unique.update(grams)
        total += len(grams)
    return len(unique) / total if total else 0.0


def win_scores(rewards_a: Sequence[float] | torch.Tensor, rewards_b: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Per prompt: 1 where a's reward beats b's, 0.5 on a tie, 0 where it loses; (N,) float64."""
    a = torch.as_tensor(rewards_a, dtype=torch.float64).flatten()
    b = torch.as_tensor(rewards_b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"win rate compares rewards on the same prompts: got {a.numel()} and {b.numel()} rewards")
    return (a > b).double() + 0.5 * (a == b).double()


def win_rate(rewards_a: Sequence[float] | torch.Tensor, rewards_b: Sequence[float] | torch.Tensor,
             z: float = Z_95) -> tuple[float, float, float]:
    """Win rate of a over b on paired rewards (ties count half) and its confidence interval, as (rate, low, high).

    The rate is the mean of `win_scores`, so its interval is `mean_ci` of those per-prompt scores.
    """
    return mean_ci(win_scores(rewards_a, rewards_b), z)
