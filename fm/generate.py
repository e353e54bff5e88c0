"""Autoregressive sampling with a KV cache, for our `GPT` and for any transformers causal LM.

Both kinds of model are driven the same way: `model(ids, attention_mask=, position_ids=, use_cache=, <cache>=)`, where
<cache> is `past_key_values` for our GPT and `cache` for transformers >= 5 (found from the forward signature).
Left-padded batches work: positions are counted over real tokens and padding keys are masked.

`sample_completions` is the text-level entry: replies to prompts, sampled in left-padded batches, together with the
exact token ids sampled (what a log-probability of the sample, e.g. a KL estimate, must score).
"""

from __future__ import annotations

import inspect
import statistics
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from common.device import timed
from fm.data import encode
from fm.model import position_ids_from_mask
from fm.tokenizer import padding_id


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th are kept), set the rest to -inf. logits (..., V)."""
    if k is None or k >= logits.size(-1):
        return logits
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to >= p; others -inf.

    logits (..., V). The most likely token is always kept, so p -> 0 gives greedy decoding and p = 1 changes nothing.
    """
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p  # enough mass already: this token is not needed
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token for each row of logits (B, V) -> (B,). temperature 0 = greedy (argmax).

    Sampling is by the inverse CDF: one uniform number per row, located in the row's cumulative probabilities. It
    draws from the same distribution as `torch.multinomial`, which on CPU draws one exponential number per
    vocabulary entry (V = 49,152 for SmolLM2: ~15 % of a sampling run's time went there). A token of probability 0
    (filtered out) is never chosen: its cumulative probability equals its predecessor's.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # rounding: cdf[-1] ~ 1
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def context_length(model: nn.Module) -> int | None:
    """Longest sequence `model` accepts: our GPT's block_size or a transformers config's position limit (None if
    its config names neither)."""
    config = getattr(model, "config", None)
    for name in ("block_size", "n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample up to `max_new_tokens` tokens after `input_ids` (B, T); returns (B, T + new) on the model's device.

    attention_mask (B, T): 0 marks left padding. `eos_token_id`: one stop id or several (as transformers accepts); once
    a row has produced one, its later tokens are the first stop id, and generation stops when every row has.
    `generator` makes sampling reproducible (seed it on the model's device).
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (B, T) long tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = context_length(model)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds context {limit}")
    device = next(model.parameters()).device
    tokens = input_ids.to(device)
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(tokens.shape)}")
    stop = None
    if eos_token_id is not None:
        stop = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
        if stop.numel() == 0:
            raise ValueError("eos_token_id is an empty list; pass None for no stop token")
    cache_name = _cache_kwarg(model)
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    cache = None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    try:
        for _ in tqdm(range(max_new_tokens), desc="generate", disable=not progress, leave=False):
            step_ids = tokens[:, -1:] if cache is not None else tokens
            position_ids = position_ids_from_mask(mask, step_ids.shape[1])
            kwargs = {cache_name: cache} if cache is not None else {}
            if keep_last:  # only the last position is sampled from: the prompt pass skips V-wide logits of the rest
                kwargs["logits_to_keep"] = 1
            out = model(step_ids, attention_mask=mask, position_ids=position_ids, use_cache=use_cache, **kwargs)
            if use_cache:
                cache = getattr(out, cache_name)
            next_ids = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)
            if stop is not None:
                next_ids = next_ids.masked_fill(finished, stop[0])
                finished |= torch.isin(next_ids, stop)
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_ids[:, None])], dim=1)
            if stop is not None and finished.all():
                break
    finally:
        model.train(was_training)
    return tokens


# ---------------------------------------------------------------------------------------------- replies to prompts
@dataclass
class Completions:
    """Sampled replies and the ids behind them, one entry per prompt.

    completion_ids[i] are the sampled ids up to and including the stop id (EOS or a token with a line break), or
    `max_new_tokens` ids when no stop came; replies[i] is their text before that stop, stripped.
    """

    prompts: list[str]
    replies: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)


# tokenizer -> ((vocabulary size, EOS id), its line-end ids): decoding the whole vocabulary takes ~0.2 s, and 1.4
# samples with the same tokenizer a dozen times; a tokenizer that gains tokens (a pad) is decoded again
_LINE_ENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def line_end_ids(tokenizer) -> list[int]:
    """EOS and every token id whose text holds a line break: where a one-line chat reply ends (the next
    "\n\nHuman:" turn starts with one)."""
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    key = (n, tokenizer.eos_token_id)
    known = _LINE_ENDS.get(tokenizer)
    if known is None or known[0] != key:
        decode = getattr(tokenizer, "batch_decode", None)
        texts = decode([[i] for i in range(n)]) if decode else [tokenizer.decode([i]) for i in range(n)]
        eos = tokenizer.eos_token_id
        known = _LINE_ENDS[tokenizer] = (key, (eos, *(i for i, t in enumerate(texts) if "\n" in t and i != eos)))
    return list(known[1])


def left_padded(ids: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as a left-padded (B, T) tensor and its attention mask, ready for `generate`."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad_token_id] * (width - len(x)) + list(x) for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


@torch.no_grad()
def sample_completions(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                       seed: int = 0, **decoding) -> Completions:
    """One one-line reply per prompt, sampled in left-padded batches with the KV cache (`generate`).

    A reply ends at EOS or at its first line break (`line_end_ids`). Prompts are batched in order of their token
    length (less padding to compute; results come back in the given order), and one generator seeded with `seed`
    runs through the batches, so the same prompts and seed give every model the same random numbers. `decoding`:
    temperature, top_k, top_p as in `generate` (temperature 1 and no filter = the model's own distribution).
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("sample_completions needs a non-empty list of prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token_id; a reply could never end")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = line_end_ids(tokenizer)
    stop_set = set(stop)
    prompt_ids = [encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    completion_ids: list[list[int]] = [[] for _ in prompts]
    pad = padding_id(tokenizer)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = left_padded([prompt_ids[i] for i in rows], pad, device)
        width = input_ids.shape[1]
        tokens = generate(model, input_ids, max_new_tokens, eos_token_id=stop, attention_mask=mask,
                          generator=generator, **decoding)
        for i, new in zip(rows, tokens[:, width:].tolist(), strict=True):
            end = next((j for j, t in enumerate(new) if t in stop_set), None)
            completion_ids[i] = new if end is None else new[: end + 1]
    replies = []
    for ids in completion_ids:
        text_ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids
        replies.append(tokenizer.decode(text_ids).split("\n")[0].strip())
    return Completions(list(prompts), replies, prompt_ids, completion_ids)


def kv_cache_work_ratio(prompt_len: int, new_tokens: int) -> float:
    """Token positions run through the weights without the cache over those with it, for n new tokens after a
    p-token prompt: uncached step k runs the whole prefix, p + k - 1 positions, so n p + n (n - 1) / 2 in all; cached,
    the prefill runs p and each later step one, p + n - 1. The ratio tends to (n + 1) / 2 for p << n and to n for
    p >> n; it counts the matrix-vector work of the weights, not attention's (which grows with the prefix either way).
    """
    if prompt_len < 1 or new_tokens < 1:
        raise ValueError(f"need prompt_len >= 1 and new_tokens >= 1, got {prompt_len}, {new_tokens}")
    p, n = prompt_len, new_tokens
    return (n * p + n * (n - 1) / 2) / (p + n - 1)


def kv_cache_benchmark(model: nn.Module, input_ids: torch.Tensor, new_tokens: Sequence[int], repeats: int = 1,
                       **kwargs) -> list[dict]:
    """Greedy `generate` of n new tokens with and without the KV cache, `repeats` times each, for each n in
    `new_tokens`; one row per n.

    Without the cache every step re-runs the whole prefix (quadratic in n); with it a step runs one token against the
    cached keys and values. `input_ids` (B, T) are the prompts; `kwargs` go to `generate` (no `eos_token_id`, so
    every run makes exactly n tokens). The repeats alternate cached and uncached runs, so a slow spell of the machine
    hits both. Row: n, the median seconds and new tokens/s (all B rows counted) of both, the speed-up of the medians,
    the smallest and largest per-repeat speed-up, the work ratio of `kv_cache_work_ratio` and whether every repeat's
    cached and uncached runs produced the same tokens. A short warm-up run first pays the one-off allocations.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = next(model.parameters()).device
    generate(model, input_ids, 2, temperature=0.0, **kwargs)
    rows = []
    for n in new_tokens:
        seconds, outputs, same = {True: [], False: []}, {}, True
        for _ in range(repeats):
            for use_cache in (True, False):
                outputs[use_cache], spent = timed(
                    lambda c=use_cache, n=n: generate(model, input_ids, n, temperature=0.0, use_cache=c, **kwargs),
                    device)
                seconds[use_cache].append(spent)
            same = same and torch.equal(outputs[True], outputs[False])
        cached, uncached = statistics.median(seconds[True]), statistics.median(seconds[False])
        ratios = [u / c for c, u in zip(seconds[True], seconds[False], strict=True)]
        made = n * input_ids.shape[0]
        rows.append({"new_tokens": n, "repeats": repeats, "cached_s": cached, "uncached_s": uncached,
                     "cached_tokens_per_s": made / cached, "uncached_tokens_per_s": made / uncached,
                     "speedup": uncached / cached, "speedup_min": min(ratios), "speedup_max": max(ratios),
                     "work_ratio": kv_cache_work_ratio(input_ids.shape[1], n),
                     "same_tokens": same})
    return rows
