"""Hidden graded tests of task 1.2 (not in the student release)."""

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from fm.data import collate, tokenize_dialogue
from fm.sft import sft_loss
from fm.tokenizer import get_gpt2_tokenizer

IGNORE = -100


def test_three_exchanges_supervise_the_three_replies():
    tok = get_gpt2_tokenizer()
    turns = [("Human", "Hi."), ("Assistant", "Hello!"), ("Human", "How are you?"), ("Assistant", "Fine."),
             ("Human", "Bye."), ("Assistant", "See you.")]
    ex = tokenize_dialogue(tok, turns, block_size=256)
    supervised = [t for t, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != IGNORE]
    eos = tok.eos_token
    assert tok.decode(supervised) == f" Hello!{eos} Fine.{eos} See you.{eos}"
    last = tokenize_dialogue(tok, turns, block_size=256, only_last=True)
    assert tok.decode([t for t, label in zip(last["input_ids"], last["labels"], strict=True)
                       if label != IGNORE]) == f" See you.{eos}"


def test_sft_loss_averages_over_all_supervised_tokens_of_the_batch():
    table = nn.Parameter(torch.randn(7, 7, generator=torch.Generator().manual_seed(9)))
    model = lambda input_ids, attention_mask=None: SimpleNamespace(logits=table[input_ids])
    examples = [{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [IGNORE, IGNORE, 3, 4, 5, 6]},
                {"input_ids": [6, 5], "labels": [IGNORE, 5]}]
    batch = collate(examples, pad_token_id=0)
    loss, _ = sft_loss(model, batch)
    terms = [-F.log_softmax(table[p].detach(), -1)[n] for p, n in ((2, 3), (3, 4), (4, 5), (5, 6), (6, 5))]
    torch.testing.assert_close(loss.detach(), torch.stack(terms).mean())  # token mean, not a mean of row means
