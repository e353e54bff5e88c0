"""The oracle reward of the offline DPO experiment: VADER sentiment, a known reward that needs no download.

In the DPO paper's controlled-sentiment task (Rafailov et al., 2023, section 6.1) a sentiment classifier plays the
human: it labels which of two replies is preferred, and because the labeller is a known function, the trained
policy can afterwards be scored by it. Here the classifier is VADER (Hutto and Gilbert, 2014; PyPI `vaderSentiment`,
which ships its lexicon): a rule-based scorer that adds up the valence of lexicon words ("great" +3.1, "hate" -2.7,
"lol" +1.8, ...) with rules for negation, intensifiers, "but", capitals and "!", and squashes the sum to [-1, 1].

It is a stand-in, not a judge of good replies: it rewards positive words whether or not they fit the message, so a
policy can raise it by adding "haha, love it, great!" to any reply, and it scores most plain replies exactly 0.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


@functools.lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads the lexicon files inside the package: no network


def sentiment_reward(replies: Sequence[str]) -> torch.Tensor:
    """VADER compound score of each reply, (N,) float32 in [-1, 1]: > 0 positive, 0 neutral (no lexicon word), < 0
    negative. An empty reply scores 0."""
    if isinstance(replies, str):
        raise TypeError("sentiment_reward expects a list of replies, got a single string; wrap it in a list")
    if len(replies) == 0:
        raise ValueError("sentiment_reward got no replies; pass a non-empty list of strings")
    bad = [i for i, r in enumerate(replies) if not isinstance(r, str)]
    if bad:
        raise TypeError(f"sentiment_reward scores strings; items {bad[:5]} are "
                        f"{sorted({type(replies[i]).__name__ for i in bad})}")
    analyzer = _analyzer()
    return torch.tensor([analyzer.polarity_scores(r)["compound"] for r in replies], dtype=torch.float32)
