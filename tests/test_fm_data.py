"""SFT data: the HH text format, the loss mask (exactly the assistant replies + EOS), cutting, padding, splits."""

import pytest
import torch

from fm.data import (
    IGNORE_INDEX,
    collate,
    format_dialogue,
    format_prompt,
    load_dialogues,
    parse_dialogue,
    tokenize_dialogue,
    tokenize_dialogues,
)
from fm.tokenizer import get_gpt2_tokenizer

DIALOGUE = [
    ("Human", "Hello, my name is Kate. What is your name?"),
    ("Assistant", "I am Sam, nice to meet you."),
    ("Human", "What do you do?"),
    ("Assistant", "I answer questions."),
]


@pytest.fixture(scope="module")
def tok():
    return get_gpt2_tokenizer()


def test_format_matches_the_homework_prompt():
    prompt = format_prompt(DIALOGUE[:1])
    assert prompt == "Human: Hello, my name is Kate. What is your name?\n\nAssistant:"
    text = format_dialogue(DIALOGUE)
    assert text.startswith(prompt + " I am Sam") and text.endswith("\n\nAssistant: I answer questions.")
    assert parse_dialogue(text) == DIALOGUE
    assert parse_dialogue("\n\n" + text) == DIALOGUE  # HH-RLHF rows start with "\n\nHuman: "


def test_roles_must_alternate_from_human():
    with pytest.raises(ValueError, match="alternate"):
        format_dialogue([("Assistant", "hi")])
    with pytest.raises(ValueError, match="alternate"):
        format_dialogue([("Human", "hi"), ("Human", "again")])
    with pytest.raises(ValueError, match="end with a Human"):
        format_prompt(DIALOGUE[:2])


def _split(ex):
    supervised = [t for t, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ex["input_ids"], ex["labels"], strict=True))
    return supervised


def test_loss_mask_covers_exactly_the_assistant_replies(tok):
    ex = tokenize_dialogue(tok, DIALOGUE, block_size=256)
    eos = tok.eos_token
    # the tokens are the HH text with EOS after each reply ...
    assert tok.decode(ex["input_ids"]) == format_dialogue(DIALOGUE).replace("you.", "you." + eos) + eos
    # ... and the supervised ones are exactly the two replies with their EOS, nothing of the prompts
    supervised = _split(ex)
    assert tok.decode(supervised) == f" I am Sam, nice to meet you.{eos} I answer questions.{eos}"
    replies = tok.encode(" I am Sam, nice to meet you.") + tok.encode(" I answer questions.")
    assert len(supervised) == len(replies) + 2
    only_last = tokenize_dialogue(tok, DIALOGUE, block_size=256, only_last=True)
    assert only_last["input_ids"] == ex["input_ids"]
    assert tok.decode(_split(only_last)) == f" I answer questions.{eos}"


def test_long_dialogues_are_cut_at_an_exchange_boundary(tok):
    full = tokenize_dialogue(tok, DIALOGUE, block_size=256)
    first = tokenize_dialogue(tok, DIALOGUE[:2], block_size=256)
    cut = tokenize_dialogue(tok, DIALOGUE, block_size=len(full["input_ids"]) - 1)
    assert cut == first  # the second exchange does not fit whole, so only the first is kept
    assert cut["input_ids"][-1] == tok.eos_token_id
    # an exchange longer than the block is truncated to the block
    short = tokenize_dialogue(tok, DIALOGUE, block_size=20)
    assert len(short["input_ids"]) == 20 and short["input_ids"] == first["input_ids"][:20]
    with pytest.raises(ValueError, match="block_size"):
        tokenize_dialogue(tok, DIALOGUE, block_size=1)


def test_windows_continue_where_the_previous_example_stopped(tok):
    one_exchange = len(tokenize_dialogue(tok, DIALOGUE[:2], block_size=256)["input_ids"])
    first, second = tokenize_dialogues(tok, [DIALOGUE], block_size=one_exchange + 2, windows=True)
    assert first == tokenize_dialogue(tok, DIALOGUE[:2], block_size=256)
    assert second == tokenize_dialogue(tok, DIALOGUE[2:], block_size=256)  # starts at "Human: What do you do?"
    assert tokenize_dialogues(tok, [DIALOGUE], block_size=one_exchange + 2) == [first]


def test_collate_pads_right_and_masks_padding(tok):
    a = tokenize_dialogue(tok, DIALOGUE, block_size=256)
    b = tokenize_dialogue(tok, DIALOGUE[:2], block_size=256)
    batch = collate([a, b], pad_token_id=tok.pad_token_id)
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n_a)
    assert batch["input_ids"][1, :n_b].tolist() == b["input_ids"]
    assert batch["attention_mask"].sum(1).tolist() == [n_a, n_b]
    assert (batch["labels"][1, n_b:] == IGNORE_INDEX).all() and (batch["input_ids"][1, n_b:] == tok.pad_token_id).all()
    assert batch["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([a], pad_token_id=None)


def test_offline_dialogues_split_is_fixed_and_disjoint():
    train, val = load_dialogues("train", "chitchat"), load_dialogues("validation", "chitchat")
    assert len(train) > 1000 and 50 < len(val) < len(train) / 10
    assert load_dialogues("validation", "chitchat") == val
    assert not {format_dialogue(d) for d in val} & {format_dialogue(d) for d in train[:2000]}
    for d in val:
        assert len(d) % 2 == 0 and d[-1][0] == "Assistant"
        assert all(role == ("Human", "Assistant")[i % 2] and text for i, (role, text) in enumerate(d))
    with pytest.raises(ValueError, match="split"):
        load_dialogues("test", "chitchat")
    with pytest.raises(ValueError, match="source"):
        load_dialogues("train", "reddit")
