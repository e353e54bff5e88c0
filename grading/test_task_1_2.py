"""Graded tests of task 1.2, supervised fine-tuning: the loss mask (fm/data.py) and the SFT loss (fm/sft.py)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fm.data import collate, format_dialogue, sft_labels, tokenize_dialogue
from fm.sft import sft_loss
from fm.tokenizer import get_gpt2_tokenizer

IGNORE = -100  # transformers' label for "no loss here"
DIALOGUE = [
    ("Human", "Hello, my name is Kate. What is your name?"),
    ("Assistant", "I am Sam, nice to meet you."),
    ("Human", "What do you do?"),
    ("Assistant", "I answer questions."),
]


class BigramLM(nn.Module):
    """The logits at t depend on token t only, so the expected loss is easy to compute by hand."""

    def __init__(self, vocab: int = 13, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def _expected_loss(model: BigramLM, batch: dict) -> torch.Tensor:
    """Mean over supervised positions t >= 1 of -log p(ids[t] | ids[t-1])."""
    terms = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        for t in range(1, len(ids)):
            if labels[t] != IGNORE:
                terms.append(-F.log_softmax(model.table[ids[t - 1]].detach(), -1)[labels[t]])
    return torch.stack(terms).mean()


def _batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in (9, 6, 4):
        ids = torch.randint(0, 13, (n,), generator=gen).tolist()
        labels = [IGNORE] * 3 + ids[3:]  # 3 prompt tokens, then the reply
        examples.append({"input_ids": ids, "labels": labels})
    return collate(examples, pad_token_id=0)


@pytest.fixture(scope="module")
def tok():
    return get_gpt2_tokenizer()


def _supervised(example: dict) -> list[int]:
    pairs = list(zip(example["input_ids"], example["labels"], strict=True))
    assert all(label in (IGNORE, t) for t, label in pairs), "a label must be the token's id or -100"
    return [t for t, label in pairs if label != IGNORE]


def test_loss_mask_covers_exactly_the_assistant_replies_and_their_eos(tok):
    ex = tokenize_dialogue(tok, DIALOGUE, block_size=256)
    eos = tok.eos_token
    assert tok.decode(ex["input_ids"]) == format_dialogue(DIALOGUE).replace("you.", "you." + eos) + eos
    assert tok.decode(_supervised(ex)) == f" I am Sam, nice to meet you.{eos} I answer questions.{eos}"


def test_only_last_supervises_only_the_last_reply(tok):
    every = tokenize_dialogue(tok, DIALOGUE, block_size=256)
    last = tokenize_dialogue(tok, DIALOGUE, block_size=256, only_last=True)
    assert last["input_ids"] == every["input_ids"]
    assert tok.decode(_supervised(last)) == f" I answer questions.{tok.eos_token}"


def test_sft_labels_on_hand_made_pieces():
    exchanges = [[([1, 2], False), ([3], False), ([4, 5, 0], True)], [([6], False), ([7], False), ([8, 0], True)]]
    out = sft_labels(exchanges)
    assert out["input_ids"] == [1, 2, 3, 4, 5, 0, 6, 7, 8, 0]
    assert out["labels"] == [IGNORE, IGNORE, IGNORE, 4, 5, 0, IGNORE, IGNORE, 8, 0]
    assert sft_labels(exchanges, only_last=True)["labels"] == [IGNORE] * 6 + [IGNORE, IGNORE, 8, 0]


def test_sft_loss_is_the_next_token_cross_entropy_on_the_supervised_tokens():
    model, batch = BigramLM(), _batch()
    loss, metrics = sft_loss(model, batch)
    assert loss.dim() == 0, "sft_loss returns a 0-d loss"
    torch.testing.assert_close(loss.detach(), _expected_loss(model, batch))
    assert float(metrics["loss"]) == pytest.approx(loss.item())


def test_sft_loss_ignores_prompt_and_padding_labels():
    model, batch = BigramLM(seed=1), _batch(seed=1)
    loss, _ = sft_loss(model, batch)
    loss.backward()
    used_rows = set()  # rows of the bigram table that predict a supervised token: the only ones with gradient
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        used_rows |= {ids[t - 1] for t in range(1, len(ids)) if labels[t] != IGNORE}
    unused = [r for r in range(13) if r not in used_rows]
    assert unused and model.table.grad[unused].abs().max() == 0, "only supervised positions may have a gradient"


def test_a_few_steps_of_sft_loss_fit_a_batch():
    model, batch = BigramLM(seed=2), _batch(seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    first = sft_loss(model, batch)[0].item()
    for _ in range(30):
        loss, _ = sft_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sft_loss(model, batch)[0].item() < 0.5 * first
