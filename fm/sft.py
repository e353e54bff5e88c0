"""Supervised fine-tuning of a causal LM on Human/Assistant dialogues, on the package's one training loop.

SFT adds only its loss (`sft_loss`, the mean cross-entropy on the assistant tokens) and its data to the generic
pieces of `common.steps` (`make_step_fn`, `make_eval_fn`) and `fm.training` (config base, run folder, trainer).
Gradient accumulation normalises by the supervised tokens of the whole accumulated batch, so it equals one batch.

    cfg = sft_config("quick")
    run = train_sft(cfg)                   # trains, saves to checkpoints/sft/quick_<config digest>/
    sft = load_or_train_sft("quick")       # what DPO calls: that run loaded (sft.model, sft.tokenizer), or trained

Several GPUs: `torchrun --nproc_per_node=8 -m fm.sft train --profile full` (or HW3_NPROC=8, which makes `train_sft`
launch that itself); see `common.dist`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common import dist, get_device, get_profile, make_config, seed_everything
from common.config import check
from common.params import count_parameters
from common.run import Run, read_logs
from common.steps import Batch, make_eval_fn, make_step_fn
from common.trainer import EvalFn, StepFn, Trainer
from fm.attention import ATTN_IMPLS
from fm.data import collate, encode, format_prompt, load_dialogues, resolve_source, tokenize_dialogues
from fm.generate import generate
from fm.lora import apply_lora, merge_lora
from fm.losses import causal_lm_loss, supervised_tokens
from fm.pretrained import load_lm
from fm.tokenizer import padding_id
from fm.training import LMTrainConfig, check_block_size, is_saved, make_trainer, run_folder, save_trained

HOMEWORK_PROMPT = format_prompt([("Human", "Hello, my name is Kate. What is your name?")])
PROMPTS = (
    HOMEWORK_PROMPT,
    format_prompt([("Human", "What do you like to do on weekends?")]),
    format_prompt([("Human", "I had a really long day at work today.")]),
    format_prompt([("Human", "Can you recommend a good movie?")]),
)
DECODING = dict(max_new_tokens=50, temperature=0.9, top_k=200)  # the homework's sampling settings


@dataclass
class SFTConfig(LMTrainConfig):
    """SFT run: the shared fields of `fm.training.LMTrainConfig` (block_size counts tokens per example, batch_size
    examples per micro-batch) plus the model, the data selection and LoRA."""

    model: str = "auto"  # fm.pretrained.load_lm name: tiny | smollm2-135m | gpt2 | auto | a local directory
    only_last: bool = False  # supervise only the last assistant reply of each example
    windows: bool = True  # a long dialogue gives consecutive block-size examples, not only its opening
    train_examples: int = 0  # use the first n training dialogues (0 = all)
    eval_examples: int = 64  # validation examples, taken evenly from the windows of as many validation dialogues
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    attn_impl: str = "manual"  # our GPT's attention: manual (task 1.1) | sdpa (fused kernel; GPU runs)

    def __post_init__(self):
        super().__post_init__()
        check(self.eval_examples > 0, f"SFTConfig.eval_examples must be positive, got {self.eval_examples}")
        for name in ("train_examples", "lora_rank"):
            check(getattr(self, name) >= 0, f"SFTConfig.{name} must be >= 0, got {getattr(self, name)}")
        check(self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        check(self.attn_impl in ATTN_IMPLS, f"SFTConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        check(self.train_examples == 0 or self.train_examples >= self.examples_per_step,
              f"train_examples ({self.train_examples}) must cover one batch of {self.examples_per_step}")


PRESETS = {
    # CI: the random tiny GPT, a few steps on a handful of dialogues.
    "smoke": dict(model="tiny", run_name="smoke", block_size=64, train_examples=32, eval_examples=8, batch_size=4,
                  steps=4, lr=1e-3, warmup_steps=1, eval_interval=2),
    # CPU: SmolLM2-135M-Instruct offline (GPT-2 when the hub answers), LoRA on all attention and MLP projections.
    "quick": dict(model="auto", run_name="quick", block_size=128, train_examples=400, eval_examples=32, batch_size=4,
                  steps=60, lr=5e-4, warmup_steps=5, eval_interval=20, lora_rank=16, lora_alpha=32.0),
    # GPU: GPT-2 (124M) on HH-RLHF dialogues, effective batch 32 x 512 tokens.
    "full": dict(model="gpt2", run_name="full", block_size=512, eval_examples=512, batch_size=8, grad_accum=4,
                 steps=2000, lr=5e-5, warmup_steps=100, weight_decay=0.01, eval_interval=200, ckpt_interval=200,
                 attn_impl="sdpa", log_interval=10),
}


def sft_config(profile: str | None = None, **overrides) -> SFTConfig:
    """The SFT config of `profile` (default $HW3_PROFILE or quick) with `overrides`."""
    return make_config(SFTConfig, PRESETS, profile, **overrides)


def sft_dir(cfg: SFTConfig) -> Path:
    """Run folder of `cfg`, named by its training-relevant fields: the fine-tuned model; logs and checkpoint in run/."""
    return run_folder("sft", cfg)


# ---------------------------------------------------------------------------------------------- loss
def sft_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy on the supervised (assistant) tokens of a collated batch.

    batch: input_ids, attention_mask, labels, each (B, T); labels are IGNORE_INDEX off the replies. Returns the
    0-d loss and {"loss": the same, detached}.
    """
    ### BEGIN SOLUTION
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    loss = causal_lm_loss(logits, batch["labels"])
    return loss, {"loss": loss.detach()}
    ### END SOLUTION


def sft_items(batch: Batch) -> int:
    """What `sft_loss` averages over: the supervised tokens of the batch (host tensors, so no device sync)."""
    return int(supervised_tokens(batch["labels"]))


# ---------------------------------------------------------------------------------------------- SFT
@dataclass
class SFTSetup:
    """Everything `Trainer.fit` needs for one SFT run (what `train_sft` runs; tests drive it directly)."""

    cfg: SFTConfig
    model: nn.Module
    tokenizer: object
    trainer: Trainer
    train: list[dict]  # tokenized training examples (input_ids, labels)
    batch_fn: Callable[[list[int]], Batch]  # training examples at these indices, collated
    step_fn: StepFn
    eval_fn: EvalFn


@dataclass
class SFTRun(Run[SFTConfig, nn.Module]):
    """An SFT run: `model` is the fine-tuned LM (LoRA merged, eval mode), saved in `folder` = `sft_dir(config)`;
    the rows are the trainer's logs (in `folder/run/`)."""

    tokenizer: object


def validation_examples(cfg: SFTConfig, tokenizer) -> list[dict]:
    """The `cfg.eval_examples` tokenized validation examples (input_ids, labels) of `cfg`'s data source, taken evenly
    from the windows of as many held-out dialogues: the validation loss of every SFT run and `perplexity` use them."""
    dialogues = load_dialogues("validation", resolve_source(cfg.data_source))[: cfg.eval_examples]
    val = tokenize_dialogues(tokenizer, dialogues, cfg.block_size, cfg.only_last, cfg.windows)
    return val[:: max(1, len(val) // cfg.eval_examples)][: cfg.eval_examples]  # spread over those dialogues


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, cfg: SFTConfig) -> dict[str, float]:
    """Per-token perplexity of `model` on the assistant replies of `validation_examples(cfg, tokenizer)`: exp of the
    mean next-token loss over all their supervised tokens (the SFT validation loss, pooled over tokens rather than
    batches). Returns {"perplexity", "loss" (nats/token), "tokens", "examples"}. Any causal LM with `tokenizer`'s
    vocabulary works: the pretrained, SFT and DPO models are scored on the same tokens."""
    val = validation_examples(cfg, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(val), cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate(val[i : i + cfg.batch_size], padding_id(tokenizer)).items()}
        loss, _ = sft_loss(model, batch)
        n = sft_items(batch)
        total, tokens = total + loss.item() * n, tokens + n
    model.train(was_training)
    return {"perplexity": math.exp(total / tokens), "loss": total / tokens, "tokens": tokens, "examples": len(val)}


def build_sft(cfg: SFTConfig, model: nn.Module | None = None, tokenizer=None) -> SFTSetup:
    """Load model and data for `cfg` (or use the given `model`/`tokenizer`), add LoRA, make the trainer.

    The run folder is keyed by `cfg` alone: a given `model` should be the one `cfg.model` names.
    """
    seed_everything(cfg.seed)
    if model is None or tokenizer is None:
        model, tokenizer = load_lm(cfg.model, attn_impl=cfg.attn_impl)
    check_block_size(cfg.block_size, model)
    pad_id = padding_id(tokenizer)
    source = resolve_source(cfg.data_source)
    train_dialogues = load_dialogues("train", source)
    if cfg.train_examples:
        train_dialogues = train_dialogues[: cfg.train_examples]
    train = tokenize_dialogues(tokenizer, train_dialogues, cfg.block_size, cfg.only_last, cfg.windows)
    val = validation_examples(cfg, tokenizer)
    if len(train) < cfg.examples_per_step or not val:
        raise ValueError(f"too few examples after tokenization: {len(train)} train, {len(val)} validation")

    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    if dist.is_main_process():
        print(f"SFT of {type(model).__name__}: {trainable:,} of {total:,} parameters trainable "
              f"({'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'}); "
              f"{len(train)} train / {len(val)} validation examples of <= {cfg.block_size} tokens")

    model.to(get_device(cfg.device))
    trainer = make_trainer(cfg, model, sft_dir(cfg) / "run", desc="sft")
    batch_fn = lambda indices: collate([train[i] for i in indices], pad_id)
    step_fn = make_step_fn(trainer, model, sft_loss, batch_fn, n_examples=len(train), batch_size=cfg.batch_size,
                           grad_accum=cfg.grad_accum, seed=cfg.seed, items_fn=sft_items)
    val_batches = [collate(val[i : i + cfg.batch_size], pad_id) for i in range(0, len(val), cfg.batch_size)]
    eval_fn = make_eval_fn(trainer, model, sft_loss, val_batches, items_fn=sft_items)
    return SFTSetup(cfg, model, tokenizer, trainer, train, batch_fn, step_fn, eval_fn)


def train_sft(cfg: SFTConfig, resume: bool = False, model: nn.Module | None = None, tokenizer=None) -> SFTRun:
    """Fine-tune, merge LoRA, and save the model to `sft_dir(cfg)` (where `load_or_train_sft` finds it).

    `model`/`tokenizer` default to `load_lm(cfg.model)`; a given model is trained in place. With `resume`, training
    continues from the checkpoint in `sft_dir(cfg)/run/` (same result as an uninterrupted run).

    With HW3_NPROC=N > 1 (and not already under torchrun), the run trains in N processes (`python -m fm.sft train`,
    which loads `cfg.model` itself), then this call loads the finished run that rank 0 saved.
    """
    if dist.launch_requested():
        dist.launch_run("fm.sft", cfg, sft_config(get_profile()), get_profile(), resume)
        resume = True  # below: the finished checkpoint loads, no step runs
    setup = build_sft(cfg, model, tokenizer)
    setup.trainer.fit(setup.step_fn, setup.eval_fn, resume=resume)
    model = merge_lora(setup.model).eval()
    out = sft_dir(cfg)
    save_trained(model, setup.tokenizer, cfg, out)
    return SFTRun(cfg, out, model, setup.trainer.train_log.rows, setup.trainer.eval_log.rows, setup.tokenizer)


def load_or_train_sft(profile: str | None = None, **overrides) -> SFTRun:
    """The SFT run of `sft_config(profile, **overrides)`: loaded from its run folder if saved there, else trained.

    The folder is named by the config, so other overrides (e.g. another lr) find or train another model.
    """
    cfg = sft_config(profile, **overrides)
    out = sft_dir(cfg)
    if is_saved(out):
        print(f"loading the SFT model from {out}")
        model, tokenizer = load_lm(out, device=cfg.device, attn_impl=cfg.attn_impl)
        return SFTRun(cfg, out, model, *read_logs(out / "run"), tokenizer)
    print(f"no SFT model in {out}; training it ({cfg.steps} steps)")
    return train_sft(cfg)


def main(argv: list[str] | None = None) -> None:
    """`python -m fm.sft train --profile full [--set key=json ...] [--resume]`, in one process or under torchrun."""
    args = dist.train_args(argv, "Supervised fine-tuning of fm.sft (one run of notebook 1_2)")
    with dist.distributed():
        train_sft(sft_config(args.profile, **args.overrides), resume=args.resume)


# ---------------------------------------------------------------------------------------------- samples
@torch.no_grad()
def generate_replies(model: nn.Module, tokenizer, prompts: Sequence[str] = PROMPTS, seed: int = 0,
                     **decoding) -> list[str]:
    """Sampled reply to each prompt (default: the homework's settings, DECODING), decoded without EOS.

    Each prompt is sampled with its own generator seeded by `seed`, so the replies do not depend on the order.
    """
    decoding = {**DECODING, **decoding}
    device = next(model.parameters()).device
    model.eval()
    replies = []
    for prompt in prompts:
        ids = torch.tensor([encode(tokenizer, prompt)], device=device)
        out = generate(model, ids, eos_token_id=tokenizer.eos_token_id,
                       generator=torch.Generator(device=device).manual_seed(seed), **decoding)
        new = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        replies.append(tokenizer.decode(new).strip())
    return replies


if __name__ == "__main__":
    sys.exit(main())
