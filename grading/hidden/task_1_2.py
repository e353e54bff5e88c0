"""Hidden checks of task 1.2 (never in the student release)."""

import torch

from course.checks import Check, call

IGNORE = -100
TURNS = [["Human", "Hi."], ["Assistant", "Hello!"], ["Human", "How are you?"], ["Assistant", "Fine."],
         ["Human", "Bye."], ["Assistant", "See you."]]
TOKENIZER = {"tok": ("gpt2_tokenizer", None)}


def _uneven_batch() -> dict:
    return {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 0, 0, 0, 0]]),
            "labels": torch.tensor([[IGNORE, IGNORE, 3, 4, 5, 6], [IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]),
            "table": torch.randn(7, 7, generator=torch.Generator().manual_seed(9))}


CHECKS = [
    Check("three exchanges supervise the three replies",
          call("fm.data.tokenize_dialogue", "@tok", TURNS, 256, objects=TOKENIZER)),
    Check("three exchanges with only_last", call("fm.data.tokenize_dialogue", "@tok", TURNS, 256, only_last=True,
                                                 objects=TOKENIZER)),
    Check("sft_loss is a mean over the batch's tokens, not of per-row means",
          call("fm.sft.sft_loss", "@lm", {"input_ids": "$input_ids", "labels": "$labels",
                                          "attention_mask": "$attention_mask"},
               objects={"lm": ("bigram", "table")}, grad={"of": "out.0"}), _uneven_batch),
]
