"""Log-probabilities of responses under a causal LM, and preference pairs as DPO's training data.

- `sequence_logps`: summed log-probability of the response tokens of each sequence.
- `concatenated_logps`: chosen and rejected through the policy in the same forward calls (rows grouped by length).
- `build_preference_data`: tokenized pairs with the frozen SFT model's log-probs, computed once (on a CPU a reference
  forward pass in every step would cost a third of the step) and cached on disk (`reference_data`).

`fm.dpo` trains on them; `fm.dpo_analysis` scores policies with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from common import cache_dir, dist
from common.config import json_digest
from common.io import atomic_save
from common.params import weights_digest
from common.steps import Batch
from fm.preference import Pair, collate_pairs, is_scored, tokenize_pair
from fm.tokenizer import padding_id


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked tokens of each sequence.

    logits (B, T, V) from a causal LM on `labels` (B, T) (the input ids); loss_mask (B, T) is 1 on the response
    tokens. Position t's logits predict token t+1 (the usual one-token shift), so the first token is never scored.
    Returns (B,) in float32 (or the logits' dtype if wider).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V), labels (B, T) and loss_mask (B, T); got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)} and {tuple(loss_mask.shape)}"
        )
    logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    targets, mask = labels[:, 1:], loss_mask[:, 1:].to(logits.dtype)
    targets = targets.masked_fill(mask == 0, 0)  # masked positions may hold -100; any valid id will do
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1)


LENGTH_GROUPS = 2  # forward calls per concatenated batch, rows grouped by length (see `concatenated_logps`)


def concatenated_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs of the concatenated batch, both sides in the same forward calls.

    `batch` holds input_ids, attention_mask and loss_mask of shape (2B, T), right-padded: rows 0..B-1 are the chosen
    responses, rows B..2B-1 the rejected ones (see `collate_pairs`). The rows are sorted by length and run in
    LENGTH_GROUPS forward calls, each cut to its own longest row: a CPU pays for every padded token, and with random
    pairs about a third of one (2B, T) block is padding (two groups cut the work by ~20 %). Reading the lengths is
    one host sync per batch. Returns (chosen_logps, rejected_logps), each (B,).
    """
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(f"a concatenated batch has chosen then rejected rows, so an even row count; got {n}")
    lengths = batch["attention_mask"].sum(-1)
    order = torch.argsort(lengths, stable=True)
    parts = []
    for rows in order.chunk(min(LENGTH_GROUPS, n)):
        width = int(lengths[rows].max())
        ids, mask = batch["input_ids"][rows, :width], batch["attention_mask"][rows, :width]
        logits = model(input_ids=ids, attention_mask=mask).logits
        parts.append(sequence_logps(logits, ids, batch["loss_mask"][rows, :width]))
    logps = torch.cat(parts)[torch.argsort(order)]
    return logps[: n // 2], logps[n // 2 :]


# ---------------------------------------------------------------------------------------------- data with references
@torch.no_grad()
def pair_logps(model: nn.Module, examples: Sequence[tuple[dict, dict]], pad_token_id: int, batch_size: int,
               desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (chosen, rejected), each (N,) on the CPU, of tokenized pairs in consecutive chunks of `batch_size`."""
    device = next(model.parameters()).device
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    chosen, rejected = [], []
    for chunk in tqdm(chunks, desc=desc, disable=desc is None, dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_token_id).items()}
        c, r = concatenated_logps(model, batch)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


@dataclass
class PreferenceData:
    """Tokenized pairs with the reference model's log-probs, computed once (the cached reference)."""

    examples: list[tuple[dict, dict]]
    kinds: list[str]
    reference_chosen: torch.Tensor  # (N,)
    reference_rejected: torch.Tensor  # (N,)
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> Batch:
        """The concatenated batch of pairs `indices` (see `collate_pairs`) with their reference log-probs."""
        batch = collate_pairs([self.examples[i] for i in indices], self.pad_token_id)
        batch["reference_chosen_logps"] = self.reference_chosen[list(indices)]
        batch["reference_rejected_logps"] = self.reference_rejected[list(indices)]
        return batch


def build_preference_data(pairs: Sequence[Pair], tokenizer, reference: nn.Module, block_size: int, batch_size: int,
                          desc: str = "reference log-probs") -> PreferenceData:
    """Tokenize `pairs` and cache the reference's log-probs of them (chunks of `batch_size`, in order).

    The pairs are kept in order of their longer side's length (a stable sort), so consecutive chunks, those of the
    reference pass and of the validation batches, hold sequences of similar length and little padding. Under torchrun
    each rank computes a consecutive part of the chunks (the same chunks), and every rank gathers all of them.
    """
    tokenized = []
    for pair in pairs:
        chosen, rejected = tokenize_pair(tokenizer, pair, block_size)
        if is_scored(chosen) and is_scored(rejected):
            tokenized.append(((chosen, rejected), str(pair.get("kind", ""))))
    if not tokenized:
        raise ValueError(f"no preference pair keeps a response token within block_size={block_size}")
    tokenized.sort(key=lambda t: max(len(t[0][0]["input_ids"]), len(t[0][1]["input_ids"])))
    examples, kinds = [t[0] for t in tokenized], [t[1] for t in tokenized]
    chunks = dist.split_range(-(-len(examples) // batch_size))  # this rank's chunks of the reference pass
    mine = examples[chunks.start * batch_size : chunks.stop * batch_size]
    parts = dist.gather(pair_logps(reference.eval(), mine, padding_id(tokenizer), batch_size,
                                   desc=desc if dist.is_main_process() else None) if mine else None)
    chosen, rejected = (torch.cat([p[i] for p in parts if p is not None]) for i in (0, 1))
    return PreferenceData(examples, kinds, chosen, rejected, padding_id(tokenizer))


def reference_data(pairs: Sequence[Pair], tokenizer, reference: nn.Module, block_size: int, batch_size: int,
                   desc: str = "reference log-probs") -> PreferenceData:
    """`build_preference_data`, cached in cache_dir()/reference_logps/ under a hash of the pairs, the block and batch
    sizes and the reference's weights: the runs of one SFT model on the same pairs (1.3's, 1.4's) pay it once. The
    batch size is part of the key because validation batches must be the reference pass's chunks (exact ties at
    step 0)."""
    key = json_digest([list(pairs), block_size, batch_size, weights_digest(reference)], 16)
    path = cache_dir() / "reference_logps" / f"{key}.pt"
    if path.exists():
        return PreferenceData(**torch.load(path, weights_only=True))
    data = build_preference_data(pairs, tokenizer, reference, block_size, batch_size, desc)
    if dist.is_main_process():  # one writer; the gather above kept every rank from reading a half-written file
        atomic_save(vars(data), path)
    dist.barrier()
    return data
