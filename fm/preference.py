"""Preference pairs for DPO: (prompt, chosen, rejected) texts, their tokenization, and batches.

A pair is a dict with
    prompt   "Human: ...\\n\\nAssistant:" (possibly several turns, always ending with the assistant header)
    chosen   the preferred reply,    rejected  the dispreferred reply (both without the leading space)
    kind     where the pair comes from: "hh-rlhf", or for the offline fixture the way the rejected reply was made.

Sources:
- "sentiment": on-policy pairs labelled by a known reward, the DPO paper's controlled-sentiment setup (section 6.1):
  for each single-turn chitchat prompt (`chitchat_prompts`), two replies sampled from the SFT policy itself
  (temperature 1, one line of at most `max_new_tokens` tokens), chosen = the one with the higher VADER sentiment
  (`fm.reward.sentiment_reward`), near-ties (|difference| < `margin`) dropped. Built by `sentiment_pairs`, which
  needs the policy and caches the pairs on disk, keyed by the policy's weights and the sampling settings.
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
  It stays as a fast, fixed test set of pairs.
- "auto": "hh" when the Hugging Face hub answers within a few seconds, else "sentiment" (`resolve_pair_source`).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence

import torch
from torch import nn

from common import cache_dir, dist
from common.config import json_digest
from common.io import atomic_path
from common.params import weights_digest
from fm.data import (
    HH_DATASET,
    IGNORE_INDEX,
    Turn,
    collate,
    format_prompt,
    load_dialogues,
    parse_dialogue,
    resolve_auto,
    tokenize_dialogue,
)
from fm.generate import sample_completions
from fm.reward import sentiment_reward

Pair = dict[str, str | float]  # prompt, chosen, rejected, kind (str); sentiment pairs add both rewards (float)
SPLITS = ("train", "validation")
SOURCES = ("auto", "hh", "chitchat", "sentiment")
PROMPT_SPLITS = ("train", "validation", "test")
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


def resolve_pair_source(source: str) -> str:
    """The concrete source for `source`: "auto" is "hh" when the hub answers, else "sentiment"
    (`fm.data.resolve_auto`, which prints which and why). The others are returned as they are."""
    return resolve_auto(source, SOURCES[1:], "sentiment", "preference pairs",
                        "on-policy pairs labelled by the sentiment oracle")


def load_preference_pairs(split: str, source: str = "auto", limit: int | None = None, seed: int = 0) -> list[Pair]:
    """Fixed preference pairs of `split` ("train" | "validation") from `source` ("auto" | "hh" | "chitchat").

    `limit` keeps the first n pairs (of a fixed shuffle with `seed`, so a small limit still mixes all kinds). The
    on-policy "sentiment" pairs depend on a policy: `sentiment_pairs` builds them.
    """
    _check_split(split)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive (or None for all pairs), got {limit}")
    source = resolve_pair_source(source)
    if source == "sentiment":
        raise ValueError("sentiment pairs are sampled from a policy: build them with "
                         "fm.preference.sentiment_pairs(policy, tokenizer, split, n_pairs)")
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


# ---------------------------------------------------------------------------------------------- on-policy pairs
def chitchat_prompts(split: str, seed: int = 0) -> list[str]:
    """Single-turn prompts "Human: <message>\\n\\nAssistant:" from the chitchat messages of 3-20 words, without
    duplicates, in a shuffle fixed by `seed`.

    "train": messages of the SFT training conversations; "validation" and "test": of the held-out conversations
    (`fm.data.load_dialogues("validation")`), even-numbered ones for validation pairs and odd-numbered ones for the
    test prompts of the policy evaluation. A message of an earlier split in PROMPT_SPLITS is left out of the later
    ones (stock phrases such as "what are you studying" recur), so test prompts are never trained or validated on.
    """
    if split not in PROMPT_SPLITS:
        raise ValueError(f"split must be one of {PROMPT_SPLITS}, got {split!r}")
    return list(_shuffled_prompts(split, seed))  # a new list: a caller may slice, extend or shuffle it


@functools.lru_cache(maxsize=8)
def _shuffled_prompts(split: str, seed: int) -> tuple[str, ...]:
    """`chitchat_prompts`, built once per (split, seed): a notebook asks for the same prompts many times (1.4's
    preference comparison 14 times), and each build scans every conversation of the split."""
    earlier = {m for s in PROMPT_SPLITS[: PROMPT_SPLITS.index(split)] for m in _human_messages(s)}
    prompts = [format_prompt([("Human", m)]) for m in _human_messages(split) if m not in earlier]
    random.Random(f"{seed}-{split}").shuffle(prompts)
    return tuple(prompts)


@functools.lru_cache(maxsize=len(PROMPT_SPLITS))
def _human_messages(split: str) -> tuple[str, ...]:
    """The distinct Human messages of 3-20 words of `split`'s conversations (see `chitchat_prompts`), in order."""
    dialogues = load_dialogues("train" if split == "train" else "validation", "chitchat")
    if split != "train":
        dialogues = dialogues[split == "test" :: 2]
    return tuple(dict.fromkeys(
        text for turns in dialogues for role, text in turns if role == "Human" and 3 <= len(text.split()) <= _MAX_WORDS
    ))


def label_pairs(prompts: Sequence[str], replies_a: Sequence[str], replies_b: Sequence[str],
                rewards_a: torch.Tensor, rewards_b: torch.Tensor, margin: float) -> list[Pair]:
    """Preference pairs from two scored replies per prompt: chosen = the higher reward; a pair whose rewards differ by
    less than `margin` (a tie or a near-tie, which the oracle cannot rank) is dropped. rewards_* (N,)."""
    n = len(prompts)
    if n == 0:
        raise ValueError("label_pairs got no prompts")
    if not len(replies_a) == len(replies_b) == len(rewards_a) == len(rewards_b) == n:
        raise ValueError(f"label_pairs needs one reply and one reward per prompt and side: {n} prompts, "
                         f"{len(replies_a)}/{len(replies_b)} replies, {len(rewards_a)}/{len(rewards_b)} rewards")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    pairs = []
    for prompt, a, b, ra, rb in zip(prompts, replies_a, replies_b, rewards_a.tolist(), rewards_b.tolist(), strict=True):
        if abs(ra - rb) < margin or ra == rb:
            continue
        (chosen, r_chosen), (rejected, r_rejected) = sorted(((a, ra), (b, rb)), key=lambda x: -x[1])
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": "sentiment",
                      "chosen_reward": r_chosen, "rejected_reward": r_rejected})
    return pairs


def sentiment_pairs(policy: nn.Module, tokenizer, split: str, n_pairs: int, *, max_new_tokens: int = 40,
                    margin: float = 0.1, batch_size: int = 32, seed: int = 0) -> list[Pair]:
    """`n_pairs` on-policy pairs of `split` ("train" | "validation"), labelled by `fm.reward.sentiment_reward`.

    Prompts of `chitchat_prompts(split, seed)` are taken `batch_size` at a time; each is answered twice by `policy`
    in one batch of 2 x batch_size rows (temperature 1, no top-k/top-p, a one-line reply of <= `max_new_tokens`
    tokens, `fm.generate.sample_completions`, seeded by the batch's position); `label_pairs` keeps the pairs the
    oracle can rank, until n_pairs are kept. The pairs are cached in cache_dir()/preference_pairs/, keyed by the
    policy's weights (`weights_digest`), the prompts and the sampling settings: a rerun skips the sampling, a request
    for fewer pairs takes the first ones, one for more samples only the missing batches, and another policy samples
    anew. Under torchrun each rank answers a consecutive part of every batch's prompts (seeded by their position, as
    one process seeds a batch) and all ranks gather the pairs; rank 0 writes the cache.
    """
    _check_split(split)
    if tokenizer is None or getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("sentiment_pairs needs the policy's tokenizer (with an eos_token_id) to sample replies")
    if n_pairs <= 0 or batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(f"n_pairs, batch_size and max_new_tokens must be positive, got {n_pairs}, {batch_size}, "
                         f"{max_new_tokens}")
    prompts = chitchat_prompts(split, seed)
    settings = dict(policy=weights_digest(policy), split=split, max_new_tokens=max_new_tokens, margin=margin,
                    batch_size=batch_size, seed=seed, temperature=1.0, reward="vader-compound",
                    prompts=json_digest(prompts, 12))
    path = cache_dir() / "preference_pairs" / f"{split}_{json_digest(settings, 12)}.json"
    cached = json.loads(path.read_text()) if path.exists() else {"prompts_sampled": 0, "pairs": []}
    pairs, used = cached["pairs"], cached["prompts_sampled"]
    if len(pairs) >= n_pairs:
        if dist.is_main_process():
            print(f"{n_pairs} {split} sentiment pairs from the cache {path.name}")
        return pairs[:n_pairs]
    while len(pairs) < n_pairs:
        if used >= len(prompts):
            raise ValueError(f"the {len(prompts)} {split} prompts gave only {len(pairs)} pairs with a reward gap >= "
                             f"{margin}; ask for fewer pairs or lower the margin")
        chunk = prompts[used : used + batch_size]
        part = dist.split_range(len(chunk))  # this rank's prompts of the batch (all of them in one process)
        mine, labelled = chunk[part.start : part.stop], []
        if mine:
            out = sample_completions(policy, tokenizer, mine + mine, max_new_tokens, batch_size=2 * len(mine),
                                     seed=seed * 1_000_003 + used + part.start, temperature=1.0)
            rewards = sentiment_reward(out.replies)
            k = len(mine)
            labelled = label_pairs(mine, out.replies[:k], out.replies[k:], rewards[:k], rewards[k:], margin)
        pairs += [pair for part_pairs in dist.gather(labelled) for pair in part_pairs]
        used += len(chunk)
    if not dist.is_main_process():
        dist.barrier()  # while rank 0 writes the cache
        return pairs[:n_pairs]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "prompts_sampled": used, "pairs": pairs}, indent=1))
    dist.barrier()
    print(f"{n_pairs} {split} sentiment pairs: {len(pairs)} kept of {used} prompts answered twice "
          f"(sampled {used - cached['prompts_sampled']} now), cached in {path}")
    return pairs[:n_pairs]


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
