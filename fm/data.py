"""Human/Assistant dialogues for supervised fine-tuning: loading, the text format, and the SFT loss mask.

A dialogue is a list of turns `(role, text)` with role "Human" or "Assistant", alternating and starting with
"Human". Its text is the Anthropic HH format the homework uses:

    Human: Hello, my name is Kate. What is your name?

    Assistant: Nice to meet you, Kate. I am ...

Sources: online, the HH-RLHF dialogues (the "chosen" side of `Anthropic/hh-rlhf`) through `datasets`; offline,
the PyPI package `chitchat-dataset` (7k two-person chats), whose first speaker becomes "Human", split into
train/validation with a fixed seed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from common.hub import hub_reachable
from fm.losses import IGNORE_INDEX

Turn = tuple[str, str]
ROLES = ("Human", "Assistant")
HH_DATASET = "Anthropic/hh-rlhf"
VALIDATION_FRACTION = 0.05
SPLIT_SEED = 1234
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ")


# ---------------------------------------------------------------------------------------------- text format
def format_dialogue(turns: Sequence[Turn]) -> str:
    """'Human: ...\\n\\nAssistant: ...' text of a dialogue (no trailing newline, no end-of-turn token)."""
    _check_turns(turns)
    return "\n\n".join(f"{role}: {text}" for role, text in turns)


def format_prompt(turns: Sequence[Turn]) -> str:
    """Prompt that asks for the next assistant reply: the dialogue (ending with a Human turn) + '\\n\\nAssistant:'."""
    _check_turns(turns)
    if turns[-1][0] != "Human":
        raise ValueError("a prompt must end with a Human turn")
    return format_dialogue(turns) + "\n\nAssistant:"


def parse_dialogue(text: str) -> list[Turn]:
    """Inverse of `format_dialogue` (also reads HH-RLHF's leading '\\n\\nHuman: ')."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"not a Human/Assistant dialogue: {text[:80]!r}")
    return [(role, body.strip()) for role, body in zip(parts[1::2], parts[2::2], strict=True)]


def _check_turns(turns: Sequence[Turn]) -> None:
    if not turns:
        raise ValueError("a dialogue needs at least one turn")
    for i, (role, _) in enumerate(turns):
        if role != ROLES[i % 2]:
            raise ValueError(f"turn {i} has role {role!r}; roles must alternate Human, Assistant, ... from Human")


# ---------------------------------------------------------------------------------------------- tokenization
def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without BOS/EOS, for our GPT-2 tokenizer and for transformers tokenizers."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def tokenize_dialogue(tokenizer, turns: Sequence[Turn], block_size: int, only_last: bool = False) -> dict:
    """Token ids and SFT labels of a dialogue, at most `block_size` tokens.

    Every assistant reply is followed by the tokenizer's EOS token, which is part of the loss so that the model
    learns to end its turn. Labels equal the ids on reply tokens (+ EOS) and are -100 elsewhere (the "Human: ..."
    turns and the "Assistant:" headers); with `only_last`, only the last kept reply is supervised. Long dialogues
    are cut after the last complete (Human, Assistant) exchange that fits; when even the first exchange does not
    fit, it is truncated to `block_size` tokens (its reply then has no EOS). Labels are not shifted: position t
    holds the id of token t, the model's loss does the shift. Returns {"input_ids": [...], "labels": [...]}.
    """
    return _tokenize_head(tokenizer, turns, block_size, only_last)[0]


def _tokenize_head(tokenizer, turns: Sequence[Turn], block_size: int, only_last: bool) -> tuple[dict, int]:
    """`tokenize_dialogue` and the number of turns the example used (an even number, at least 2)."""
    _check_turns(turns)
    if block_size <= 1:
        raise ValueError(f"block_size must be > 1, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; SFT needs one to end assistant turns")
    # (ids, supervised) pieces: each turn contributes a masked header and, for the assistant, a supervised reply.
    exchanges: list[list[tuple[list[int], bool]]] = []
    length = 0
    for i, (role, text) in enumerate(turns):
        sep = "\n\n" if i else ""
        if role == "Human":
            pieces = [(encode(tokenizer, f"{sep}Human: {text}"), False)]
            exchanges.append(pieces)
        else:
            reply = encode(tokenizer, f" {text}") + [tokenizer.eos_token_id]
            pieces = [(encode(tokenizer, f"{sep}Assistant:"), False), (reply, True)]
            exchanges[-1] += pieces
        length += sum(len(ids) for ids, _ in pieces)
        if length > block_size:
            break
    kept, total = [], 0
    for ex in exchanges:
        n = sum(len(ids) for ids, _ in ex)
        if len(ex) < 3 or total + n > block_size:  # stop at an exchange without reply or one that does not fit
            break
        kept.append(ex)
        total += n
    used = 2 * len(kept)
    if not kept:  # the first exchange alone is too long: keep its head, truncated below
        kept, used = exchanges[:1], 2
    example = sft_labels(kept, only_last)
    return {key: ids[:block_size] for key, ids in example.items()}, used


def sft_labels(exchanges: Sequence[Sequence[tuple[list[int], bool]]], only_last: bool = False) -> dict:
    """The SFT loss mask: token ids and labels of tokenized exchanges.

    Each exchange is a list of (ids, supervised) pieces: the "Human: ..." turn and "Assistant:" header are not
    supervised, the reply (+ EOS) is. Labels equal the ids on supervised pieces and are IGNORE_INDEX elsewhere; with
    `only_last`, only the last exchange's reply is supervised. Returns {"input_ids": [...], "labels": [...]} of equal
    length, not shifted (the loss shifts).
    """
    ### BEGIN SOLUTION
    input_ids: list[int] = []
    labels: list[int] = []
    last = len(exchanges) - 1
    for i, exchange in enumerate(exchanges):
        for ids, supervised in exchange:
            input_ids += ids
            labels += ids if supervised and (not only_last or i == last) else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}
    ### END SOLUTION


def tokenize_dialogues(
    tokenizer, dialogues: Sequence[Sequence[Turn]], block_size: int, only_last: bool = False, windows: bool = False
) -> list[dict]:
    """`tokenize_dialogue` over a data set, dropping examples left without any supervised token to predict.

    With `windows`, a dialogue longer than the block gives consecutive examples, each starting at a Human turn where
    the previous one stopped, so that the model also learns from the middle of conversations, not only from their
    openings (which in chit-chat data are mostly greetings).
    """
    examples = []
    for turns in dialogues:
        start = 0
        while start < len(turns) - 1:
            example, used = _tokenize_head(tokenizer, turns[start:], block_size, only_last)
            examples.append(example)
            start = start + used if windows else len(turns)
    # labels[1:]: token 0 is never predicted, so a label there alone would leave the loss nothing to average
    return [ex for ex in examples if any(label != IGNORE_INDEX for label in ex["labels"][1:])]


def collate(examples: Sequence[dict], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one. Returns input_ids, attention_mask, labels: (B, T) int64 tensors."""
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; pass the tokenizer's pad (or eos) token id")
    width = max(len(ex["input_ids"]) for ex in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
    }
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"example {row}: {n} input_ids but {len(ex['labels'])} labels")
        batch["input_ids"][row, :n] = torch.tensor(ex["input_ids"])
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(ex["labels"])
    return batch


# ---------------------------------------------------------------------------------------------- sources
def load_dialogues(split: str, source: str = "auto") -> list[list[Turn]]:
    """Dialogues of `split` ("train" | "validation") from `source` ("auto" | "hh" | "chitchat"; `resolve_source`)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    source = resolve_source(source)
    if source == "hh":
        return _hh_dialogues(split)
    return [list(d) for d in _chitchat_split(split)]


def resolve_source(source: str) -> str:
    """The concrete source, "hh" or "chitchat", for `source` ("auto": `resolve_auto`)."""
    return resolve_auto(source, ("hh", "chitchat"), "chitchat", "dialogues", "chitchat-dataset (offline)")


def resolve_auto(source: str, choices: Sequence[str], offline: str, what: str, offline_label: str) -> str:
    """`source` when it is one of `choices`; for "auto", "hh" when the Hugging Face hub is reachable
    (`common.hub.hub_reachable`: a 3 s probe, skipped when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set), else the
    `offline` source. Prints which (`what`: HH-RLHF or `offline_label`) and why."""
    if source != "auto" and source not in choices:
        raise ValueError(f"unknown {what} source {source!r}; choose one of {('auto', *choices)}")
    if source != "auto":
        return source
    online, why = hub_reachable()
    print(f"{what}: {'HH-RLHF (' + HH_DATASET + ')' if online else offline_label} ({why})")
    return "hh" if online else offline


def _hh_dialogues(split: str) -> list[list[Turn]]:
    import datasets

    rows = datasets.load_dataset(HH_DATASET, split="train" if split == "train" else "test")
    dialogues = []
    for text in rows["chosen"]:
        try:
            turns = parse_dialogue(text)
            _check_turns(turns)
        except ValueError:  # a few HH rows have malformed or non-alternating turns
            continue
        dialogues.append(_trim_to_assistant(turns))
    return [d for d in dialogues if d]


def _chitchat_path() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset.json" if spec else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            "offline dialogues need the PyPI package chitchat-dataset: `pip install --no-deps chitchat-dataset` "
            "(or `make setup`, which installs requirements-offline.txt)"
        )
    return path


@functools.lru_cache(maxsize=1)
def _chitchat_dialogues() -> tuple[tuple[Turn, ...], ...]:
    """All chitchat conversations as alternating turns; a speaker's consecutive messages are joined."""
    data = json.loads(_chitchat_path().read_text())
    dialogues = []
    for key in sorted(data):  # sorted: the split must not depend on the JSON's key order
        turns: list[list[str]] = []
        senders: list[str] = []
        for message in data[key]["messages"]:
            text = " ".join(u["text"].strip() for u in message if u["text"].strip())
            if not text:
                continue
            sender = message[0]["sender"]
            if senders and senders[-1] == sender:
                turns[-1].append(text)
            else:
                senders.append(sender)
                turns.append([text])
        dialogue = _trim_to_assistant([(ROLES[i % 2], " ".join(t)) for i, t in enumerate(turns)])
        if dialogue:
            dialogues.append(tuple(dialogue))
    return tuple(dialogues)


@functools.lru_cache(maxsize=2)
def _chitchat_split(split: str) -> tuple[tuple[Turn, ...], ...]:
    """The train or validation conversations (immutable: `load_dialogues` hands out lists of their turns)."""
    dialogues = list(_chitchat_dialogues())
    random.Random(SPLIT_SEED).shuffle(dialogues)
    n_val = round(len(dialogues) * VALIDATION_FRACTION)
    return tuple(dialogues[:n_val] if split == "validation" else dialogues[n_val:])


def _trim_to_assistant(turns: list[Turn]) -> list[Turn]:
    """Drop a trailing Human turn: an SFT example ends with the reply it teaches."""
    return turns[: len(turns) - len(turns) % 2]
