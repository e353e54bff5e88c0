"""Text metrics of generations."""

from __future__ import annotations

from collections.abc import Sequence


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
