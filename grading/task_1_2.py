"""Public checks of task 1.2, supervised fine-tuning: the loss mask (fm/data.py) and the SFT loss (fm/sft.py)."""

import torch

from course.checks import Check, call

IGNORE = -100  # transformers' label for "no loss here"
DIALOGUE = [["Human", "Hello, my name is Kate. What is your name?"], ["Assistant", "I am Sam, nice to meet you."],
            ["Human", "What do you do?"], ["Assistant", "I answer questions."]]
PIECES = [[[[1, 2], False], [[3], False], [[4, 5, 0], True]], [[[6], False], [[7], False], [[8, 0], True]]]
TOKENIZER = {"tok": ("gpt2_tokenizer", None)}


def _batch(seed: int) -> dict:
    """Three examples of 3 prompt tokens and a reply, padded (collated by the grader, not by the submission)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 13, (n,), generator=gen) for n in (9, 6, 4)]
    T = max(len(r) for r in rows)
    input_ids = torch.zeros(3, T, dtype=torch.long)
    labels = torch.full((3, T), IGNORE)
    attention_mask = torch.zeros(3, T, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)], attention_mask[i, : len(ids)] = ids, 1
        labels[i, 3 : len(ids)] = ids[3:]
    table = torch.randn(13, 13, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "table": table}


def _fits(inputs: dict, outputs: dict) -> str | None:
    first, last = outputs["first"], outputs["last"]
    return None if last < 0.5 * first else f"30 Adam steps took the loss from {first:.4g} to {last:.4g}, not below half"


BATCH = {"input_ids": "$input_ids", "labels": "$labels", "attention_mask": "$attention_mask"}
CHECKS = [
    Check("sft_labels on hand-made pieces", call("fm.data.sft_labels", PIECES), atol=0, rtol=0),
    Check("sft_labels with only_last", call("fm.data.sft_labels", PIECES, only_last=True), atol=0, rtol=0),
    Check("the loss mask covers exactly the assistant replies and their EOS",
          call("fm.data.tokenize_dialogue", "@tok", DIALOGUE, 256, objects=TOKENIZER)),
    Check("only_last supervises only the last reply",
          call("fm.data.tokenize_dialogue", "@tok", DIALOGUE, 256, only_last=True, objects=TOKENIZER)),
    *(Check(f"sft_loss is the next-token cross-entropy on the supervised tokens (batch {seed}), and its gradient",
            call("fm.sft.sft_loss", "@lm", BATCH, objects={"lm": ("bigram", "table")}, grad={"of": "out.0"}),
            lambda seed=seed: _batch(seed)) for seed in (0, 1)),
    Check("a few steps of sft_loss fit a batch", {"adapter": "fit", "loss": "sft", "seed": 0, "lr": 0.1, "steps": 30},
          lambda: _batch(2), prop=_fits),
]
