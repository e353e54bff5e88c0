"""The oracle reward of the offline DPO experiment (fm/reward.py)."""

import pytest
import torch

from fm.reward import sentiment_reward


def test_oracle_orders_positive_neutral_negative():
    rewards = sentiment_reward([
        "I love this, it is wonderful and I am so happy!",
        "The train leaves at seven from platform two.",
        "I hate this, it is awful and I am miserable.",
    ])
    assert rewards.dtype == torch.float32 and rewards.shape == (3,)
    positive, neutral, negative = rewards.tolist()
    assert positive > 0.5 and neutral == 0.0 and negative < -0.5
    assert ((rewards >= -1) & (rewards <= 1)).all()


def test_oracle_reads_negation_and_can_be_gamed_by_positive_words():
    good, not_good = sentiment_reward(["This is good.", "This is not good."]).tolist()
    assert good > 0 > not_good
    plain, padded = sentiment_reward(["It is at seven.", "It is at seven, haha great, love it!"]).tolist()
    assert padded > plain + 0.5  # the same answer plus positive words: what a policy can learn to exploit


def test_oracle_rejects_bad_input():
    with pytest.raises(ValueError, match="no replies"):
        sentiment_reward([])
    with pytest.raises(TypeError, match="single string"):
        sentiment_reward("a reply")
    with pytest.raises(TypeError, match="scores strings"):
        sentiment_reward(["fine", 3])
    assert sentiment_reward([""]).tolist() == [0.0]
