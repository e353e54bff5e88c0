"""The step and evaluation functions of a `common.trainer.Trainer` for a model trained on a batch loss (the LM
runs: SFT and DPO): gradient accumulation weighted by the items a loss averages over, the same batches in any number
of processes, and evaluation over fixed batches shared out among the ranks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from common import dist
from common.data import batch_indices
from common.trainer import EvalFn, StepFn, Trainer

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def batch_rows(batch: Batch) -> int:
    """Rows (examples) of a batch: the default count of the items a loss averages over."""
    return next(iter(batch.values())).shape[0]


def make_step_fn(
    trainer: Trainer,
    model: nn.Module,
    loss_fn: LossFn,
    batch_fn: Callable[[list[int]], Batch],
    *,
    n_examples: int,
    batch_size: int,
    grad_accum: int = 1,
    seed: int = 0,
    optimizer: str = "policy",
    items_fn: Callable[[Batch], int] = batch_rows,
) -> StepFn:
    """A `Trainer.fit` step: `grad_accum` micro-batches of `batch_size` examples, backward, one optimizer step.

    `loss_fn(model, batch) -> (loss, metrics)` returns the mean over the batch's items, which `items_fn` counts
    (rows by default; supervised tokens for SFT). Micro-batch k, with n_k of the step's N items, is weighted by
    n_k / N, so the step's loss and gradients are those of one batch of `batch_size * grad_accum` examples (as
    TRL's SFTTrainer normalises by the items of the whole accumulated batch). Each micro-batch needs >= 1 item.

    The examples of a step are `common.data.batch_indices(n_examples, batch_size * grad_accum, step, seed)`, so a
    resumed run sees the same data; `batch_fn(indices)` builds their batch on the host (moved to the trainer's
    device here). Metrics: the same weighted means of what `loss_fn` returns, left as detached device tensors (no
    host sync here; the Trainer reads them at log steps), `tokens_per_s` (real tokens, from the host-side
    attention masks) and `grad_norm`.

    With R ranks (`trainer.world`) the step's batch is the same: every rank computes its indices and takes its
    consecutive 1 / R of them, in micro-batches of at most `batch_size` (with grad_accum a multiple of R: grad_accum / R
    whole micro-batches of the one-process run). N, the items of the whole step, is summed over the ranks, and a
    micro-batch is weighted by R * n_k / N: DDP's backward averages the gradients over the ranks, which makes the sum
    over all micro-batches of n_k / N times their gradients, as in one process. All but a rank's last micro-batch
    run under DDP's `no_sync()`.
    """
    world, examples = trainer.world, batch_size * grad_accum
    if examples % world:
        raise ValueError(f"the step's batch_size x grad_accum = {examples} examples is not divisible by the {world} "
                         f"processes; make it a multiple of NPROC={world} (each rank takes an equal share)")
    local = examples // world  # examples of this rank
    net = trainer.wrapped(model)

    def step_fn(step: int) -> dict[str, torch.Tensor | float]:
        start = time.perf_counter()
        indices = batch_indices(n_examples, examples, step, seed)  # the global batch, on every rank
        chunks = indices[trainer.rank * local : (trainer.rank + 1) * local].split(batch_size)
        batches = [batch_fn(chunk.tolist()) for chunk in chunks]
        items = [int(items_fn(batch)) for batch in batches]  # host tensors: no device sync
        total = trainer.sum_over_ranks({"items": sum(items)})["items"]  # of the global batch
        metrics: dict[str, torch.Tensor | float] = {}
        for i, (batch, n) in enumerate(zip(batches, items, strict=True)):
            weight = n * world / total
            with trainer.no_sync(optimizer, last=i == len(batches) - 1):
                with trainer.autocast():
                    loss, values = loss_fn(net, {k: v.to(trainer.device) for k, v in batch.items()})
                (loss * weight).backward()
            for key, value in values.items():
                metrics[key] = metrics.get(key, 0.0) + value.detach() * weight
        metrics["grad_norm"] = trainer.optimizer_step(optimizer)
        if all("attention_mask" in batch for batch in batches):
            tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
            metrics["tokens_per_s"] = tokens / (time.perf_counter() - start)
        return metrics

    return step_fn


def make_eval_fn(
    trainer: Trainer,
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    prefix: str = "val_",
    items_fn: Callable[[Batch], int] = batch_rows,
) -> EvalFn:
    """An eval function for `Trainer.fit`: the metrics of `loss_fn` over fixed `batches`, keys prefixed.

    Each metric is the mean over all items of the batches (batch means weighted by `items_fn`, as in
    `make_step_fn`), so it does not depend on how the evaluation set is cut into batches. With several ranks, each
    evaluates its consecutive part of the batches (`common.dist.split_range`) and the weighted sums are summed over
    the ranks: the same numbers, in 1 / N of the time.
    """
    if not batches:
        raise ValueError("make_eval_fn needs at least one validation batch")
    items = [int(items_fn(batch)) for batch in batches]
    total = sum(items)
    mine = range(len(batches)) if trainer.world == 1 else dist.split_range(len(batches))

    def eval_fn(step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for i in mine:
            with trainer.autocast():
                _, values = loss_fn(model, {k: v.to(trainer.device) for k, v in batches[i].items()})
            for key, value in values.items():
                metrics[prefix + key] = metrics.get(prefix + key, 0.0) + float(value) * (items[i] / total)
        return dist.sum_gathered(metrics) if trainer.world > 1 else metrics

    return eval_fn
