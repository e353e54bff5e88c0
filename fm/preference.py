"""Preference pairs for DPO: (prompt, chosen, rejected) texts, their tokenization, and batches.

A pair is a dict with
    prompt   "Human: ...\\n\\nAssistant:" (possibly several turns, always ending with the assistant header)
    chosen   the preferred reply,    rejected  the dispreferred reply (both without the leading space)
    kind     where the pair comes from: "hh-rlhf", or for the offline fixture the way the rejected reply was made.

Sources:
- "hh": Anthropic's HH-RLHF (`Anthropic/hh-rlhf` through `datasets`): each row is two transcripts that share all
  but the last assistant reply; its "test" split is our validation split.
- "chitchat": an offline fixture built from the SFT dialogues (`fm.data.load_dialogues(split, "chitchat")`) with
  one preferred behaviour a reader can check: for a single-turn prompt "Human: <message>", the chosen reply is the
  real, on-topic answer the other person wrote, and the rejected one is either
      rude        a rude or dismissive brush-off ("Nobody asked."),
      repetitive  a degenerate loop of the real reply's first words ("i am doing i am doing i am doing ..."),
      off-topic   a real reply to some other message, from another conversation.
  The brush-offs of the validation split are phrasings never seen in training, so validation accuracy on them
  measures whether DPO learned "do not be rude", not a list of strings. Built deterministically from `seed`.
- "auto": "hh" when the Hugging Face hub answers within a few seconds, else "chitchat" (it prints which).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from common.hub import hub_reachable
from fm.data import IGNORE_INDEX, Turn, collate, format_prompt, load_dialogues, parse_dialogue, tokenize_dialogue

Pair = dict[str, str]
SPLITS = ("train", "validation")
SOURCES = ("auto", "hh", "chitchat")
HH_DATASET = "Anthropic/hh-rlhf"
KINDS = ("rude", "repetitive", "off-topic")
KIND_WEIGHTS = (0.4, 0.3, 0.3)
# Rude or dismissive brush-offs. Every fourth one is kept for validation only.
BRUSH_OFFS = (
    "Whatever.", "I don't care.", "Not my problem.", "Why would I tell you that?", "Stop bothering me.",
    "That's a dumb question.", "Who cares?", "Leave me alone.", "Ugh, boring.", "Can you not?",
    "I'm not talking to you.", "Figure it out yourself.", "None of your business.", "You're annoying.",
    "Meh. Go away.", "That's stupid.", "Don't care, next.", "lol no", "Nobody asked.", "Sounds like a you problem.",
    "Ask someone who cares.", "I have better things to do.", "Ugh, not this again.", "Shut up.",
)
_MIN_WORDS, _MAX_WORDS = 4, 20  # chosen replies: complete sentences, short enough for a CPU batch


def brush_offs(split: str) -> tuple[str, ...]:
    """The rude replies of `split`: training and validation use disjoint phrasings."""
    _check_split(split)
    return tuple(b for i, b in enumerate(BRUSH_OFFS) if (i % 4 == 3) == (split == "validation"))


def load_preference_pairs(split: str, source: str = "auto", limit: int | None = None, seed: int = 0) -> list[Pair]:
    """Preference pairs of `split` ("train" | "validation") from `source` ("auto" | "hh" | "chitchat").

    `limit` keeps the first n pairs (of a fixed shuffle with `seed`, so a small limit still mixes all kinds).
    """
    _check_split(split)
    if source not in SOURCES:
        raise ValueError(f"unknown preference source {source!r}; choose one of {SOURCES}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive (or None for all pairs), got {limit}")
    if source == "auto":
        online, why = hub_reachable()
        source = "hh" if online else "chitchat"
        print(f"preference pairs: {HH_DATASET if online else 'offline chitchat fixture'} ({why})")
    pairs = _hh_pairs(split) if source == "hh" else chitchat_pairs(split, seed)
    if limit is not None:
        random.Random(seed).shuffle(pairs)
        pairs = pairs[:limit]
    return pairs


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_hh_row(chosen: str, rejected: str) -> Pair | None:
    """HH-RLHF's two transcripts -> a pair; None when they do not share a prompt ending with an assistant header."""
    header = "\n\nAssistant:"
    cut = chosen.rfind(header) + len(header)
    if cut < len(header) or rejected[:cut] != chosen[:cut]:
        return None
    prompt, good, bad = chosen[:cut].strip(), chosen[cut:].strip(), rejected[cut:].strip()
    if not good or not bad or good == bad:
        return None
    return {"prompt": prompt, "chosen": good, "rejected": bad, "kind": "hh-rlhf"}


def _hh_pairs(split: str) -> list[Pair]:
    import datasets

    rows = datasets.load_dataset(HH_DATASET, split="train" if split == "train" else "test")
    pairs = (split_hh_row(c, r) for c, r in zip(rows["chosen"], rows["rejected"], strict=True))
    return [p for p in pairs if p is not None]


def chitchat_pairs(split: str, seed: int = 0) -> list[Pair]:
    """The offline fixture (see the module doc): one pair per conversation, from a seeded random exchange."""
    rng = random.Random(f"{seed}-{split}")
    exchanges = []  # (human message, real reply), one per conversation
    for turns in load_dialogues(split, "chitchat"):
        candidates = [
            (turns[i][1], turns[i + 1][1])
            for i in range(0, len(turns) - 1, 2)
            if len(turns[i][1].split()) <= _MAX_WORDS and _MIN_WORDS <= len(turns[i + 1][1].split()) <= _MAX_WORDS
        ]
        if candidates:
            exchanges.append(rng.choice(candidates))
    rude = brush_offs(split)
    pairs = []
    for i, (message, reply) in enumerate(exchanges):
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        if kind == "rude":
            rejected = rng.choice(rude)
        elif kind == "repetitive":
            words = reply.split()
            rejected = " ".join(words[: rng.randint(1, 3)] * rng.randint(6, 10))
        else:  # a reply from another conversation: fluent, but not an answer to this message
            rejected = exchanges[(i + rng.randrange(1, len(exchanges))) % len(exchanges)][1]
        if rejected != reply:
            pairs.append({"prompt": format_prompt([("Human", message)]), "chosen": reply, "rejected": rejected,
                          "kind": kind})
    return pairs


# ---------------------------------------------------------------------------------------------- tokenization
def _turns(prompt: str, response: str) -> list[Turn]:
    """The dialogue of `prompt` ("...\\n\\nAssistant:") answered by `response`."""
    if not prompt.rstrip().endswith("Assistant:"):
        raise ValueError(f"a prompt must end with 'Assistant:', got ...{prompt[-40:]!r}")
    return parse_dialogue(prompt.rstrip()[: -len("Assistant:")].rstrip()) + [("Assistant", response.strip())]


def tokenize_response(tokenizer, prompt: str, response: str, block_size: int) -> dict:
    """input_ids and labels of prompt + response (+ EOS), labels -100 except on the response (the SFT format).

    When the whole does not fit in `block_size`, the oldest exchanges of the prompt are dropped first (the reply
    being judged must stay); a single exchange that is still too long is cut at the end.
    """
    return _tokenize_shared_prompt(tokenizer, prompt, [response], block_size)[0]


def tokenize_pair(tokenizer, pair: Pair, block_size: int) -> tuple[dict, dict]:
    """(chosen, rejected) examples as in `tokenize_response`, with the same prompt turns kept for both."""
    chosen, rejected = _tokenize_shared_prompt(tokenizer, pair["prompt"], [pair["chosen"], pair["rejected"]],
                                               block_size)
    return chosen, rejected


def _tokenize_shared_prompt(tokenizer, prompt: str, responses: Sequence[str], block_size: int) -> list[dict]:
    dialogues = [_turns(prompt, r) for r in responses]
    while True:
        full = [tokenize_dialogue(tokenizer, d, 1 << 30, only_last=True) for d in dialogues]
        if max(len(ex["input_ids"]) for ex in full) <= block_size:
            return full
        if len(dialogues[0]) <= 2:  # one exchange left: tokenize_dialogue cuts it to the block
            return [tokenize_dialogue(tokenizer, d, block_size, only_last=True) for d in dialogues]
        dialogues = [d[2:] for d in dialogues]


def is_scored(example: dict) -> bool:
    """Whether a tokenized example kept at least one response token (a too-long prompt can leave none)."""
    return any(label != IGNORE_INDEX for label in example["labels"])



def collate_pairs(pairs: Sequence[tuple[dict, dict]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One concatenated batch: rows 0..B-1 the chosen sides, rows B..2B-1 the rejected ones, right-padded.

    Returns input_ids, attention_mask, labels and loss_mask (1 on response tokens), each (2B, T).
    """
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_token_id)
    batch["loss_mask"] = (batch["labels"] != IGNORE_INDEX).long()
    return batch
