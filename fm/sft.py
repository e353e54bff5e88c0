"""Supervised fine-tuning of a causal LM on Human/Assistant dialogues, on the package's one training loop.

The pieces are split so that DPO reuses them: a loss function `loss_fn(model, batch) -> (loss, metrics)`,
`make_step_fn` (deterministic batches, gradient accumulation, one optimizer step, tokens/s) and `make_eval_fn`
(mean metrics over fixed validation batches). SFT adds only its loss (`sft_loss`) and data.

    cfg = make_config(SFTConfig, PRESETS, profile="quick")
    result = train_sft(cfg)                      # trains, saves to checkpoints/sft/quick/
    model, tokenizer = load_or_train_sft("quick")  # what DPO calls: loads that model, or trains it first
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from common import checkpoint_dir, get_device, make_config, seed_everything
from common.config import check
from common.data import batch_indices
from common.trainer import EvalFn, StepFn, Trainer, warmup_cosine
from fm.data import IGNORE_INDEX, collate, encode, format_prompt, load_dialogues, resolve_source, tokenize_dialogues
from fm.generate import generate
from fm.lora import apply_lora, count_parameters, merge_lora
from fm.pretrained import load_lm, save_lm

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]

HOMEWORK_PROMPT = format_prompt([("Human", "Hello, my name is Kate. What is your name?")])
PROMPTS = (
    HOMEWORK_PROMPT,
    format_prompt([("Human", "What do you like to do on weekends?")]),
    format_prompt([("Human", "I had a really long day at work today.")]),
    format_prompt([("Human", "Can you recommend a good movie?")]),
)
DECODING = dict(max_new_tokens=50, temperature=0.9, top_k=200)  # the homework's sampling settings


@dataclass
class SFTConfig:
    model: str = "auto"  # fm.pretrained.load_lm name: tiny | smollm2-135m | gpt2 | auto | a local directory
    run_name: str = "quick"  # outputs go to checkpoint_dir()/sft/<run_name>/
    data_source: str = "auto"  # auto | hh | chitchat (fm.data.load_dialogues)
    block_size: int = 128  # tokens per example; dialogues are cut at turn boundaries
    only_last: bool = False  # supervise only the last assistant reply of each example
    windows: bool = True  # a long dialogue gives consecutive block-size examples, not only its opening
    train_examples: int = 0  # use the first n training dialogues (0 = all)
    eval_examples: int = 64  # validation examples, taken evenly from the windows of as many validation dialogues
    batch_size: int = 4  # micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 100  # optimizer steps
    lr: float = 5e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 25
    ckpt_interval: int = 0  # 0: checkpoint at the end only
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    bf16: bool = False
    seed: int = 0
    device: str | None = None  # None: common.get_device()

    def __post_init__(self):
        for name in ("block_size", "batch_size", "grad_accum", "steps", "eval_examples"):
            check(getattr(self, name) > 0, f"SFTConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("train_examples", "warmup_steps", "weight_decay", "grad_clip", "eval_interval",
                     "ckpt_interval", "lora_rank"):
            check(getattr(self, name) >= 0, f"SFTConfig.{name} must be >= 0, got {getattr(self, name)}")
        check(self.lr > 0, f"SFTConfig.lr must be positive, got {self.lr}")
        check(self.warmup_steps < self.steps, f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        check(self.data_source in ("auto", "hh", "chitchat"),
              f"data_source must be auto, hh or chitchat, got {self.data_source!r}")
        check(self.train_examples == 0 or self.train_examples >= self.batch_size * self.grad_accum,
              f"train_examples ({self.train_examples}) must cover one batch of {self.batch_size * self.grad_accum}")


PRESETS = {
    # CI: the random tiny GPT, a few steps on a handful of dialogues.
    "smoke": dict(model="tiny", run_name="smoke", block_size=64, train_examples=32, eval_examples=8, batch_size=4,
                  steps=4, lr=1e-3, warmup_steps=1, eval_interval=2),
    # CPU: SmolLM2-135M-Instruct offline (GPT-2 when the hub answers), LoRA on all attention and MLP projections.
    "quick": dict(model="auto", run_name="quick", block_size=128, train_examples=400, eval_examples=32, batch_size=4,
                  steps=60, lr=5e-4, warmup_steps=5, eval_interval=20, lora_rank=16, lora_alpha=32.0),
    # GPU: GPT-2 (124M) on HH-RLHF dialogues, effective batch 32 x 512 tokens.
    "full": dict(model="gpt2", run_name="full", block_size=512, eval_examples=512, batch_size=8, grad_accum=4,
                 steps=2000, lr=5e-5, warmup_steps=100, weight_decay=0.01, eval_interval=200, ckpt_interval=200),
}


def sft_config(profile: str | None = None, **overrides) -> SFTConfig:
    """The SFT config of `profile` (default $HW3_PROFILE or quick) with `overrides`."""
    return make_config(SFTConfig, PRESETS, profile, **overrides)


def sft_dir(cfg: SFTConfig) -> Path:
    """Where the fine-tuned model of `cfg` is saved (run logs and checkpoint in its `run/` subfolder)."""
    return checkpoint_dir() / "sft" / cfg.run_name


# ---------------------------------------------------------------------------------------------- losses
def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (B, T, V) at t predict labels (B, T) at t + 1; -100 is ignored."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def sft_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT loss of a collated batch (input_ids, attention_mask, labels); metrics: loss and tokens processed."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = causal_lm_loss(logits, batch["labels"])
    return loss, {"loss": loss.item(), "tokens": float(batch["attention_mask"].sum())}


# ---------------------------------------------------------------------------------------------- loop pieces
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
) -> StepFn:
    """A `Trainer.fit` step: `grad_accum` micro-batches of `batch_size` examples, backward, one optimizer step.

    The examples of a step are `common.data.batch_indices(n_examples, batch_size * grad_accum, step, seed)`, so a
    resumed run sees the same data. `batch_fn(indices)` builds a batch of tensors (moved to the trainer's device
    here). Metrics are the micro-batch means of what `loss_fn` returns, except "tokens", which is summed and
    turned into `tokens_per_s`; plus `grad_norm`.
    """

    def step_fn(step: int) -> dict[str, float]:
        start = time.perf_counter()
        indices = batch_indices(n_examples, batch_size * grad_accum, step, seed)
        totals: dict[str, float] = defaultdict(float)
        for chunk in indices.split(batch_size):
            batch = {k: v.to(trainer.device) for k, v in batch_fn(chunk.tolist()).items()}
            with trainer.autocast():
                loss, metrics = loss_fn(model, batch)
            (loss / grad_accum).backward()
            for key, value in metrics.items():
                totals[key] += value if key == "tokens" else value / grad_accum
        totals["grad_norm"] = trainer.optimizer_step(optimizer)
        if "tokens" in totals:
            totals["tokens_per_s"] = totals.pop("tokens") / (time.perf_counter() - start)
        return dict(totals)

    return step_fn


def make_eval_fn(trainer: Trainer, model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch],
                 prefix: str = "val_") -> EvalFn:
    """An eval function for `Trainer.fit`: metrics of `loss_fn` averaged over fixed `batches`, keys prefixed."""
    if not batches:
        raise ValueError("make_eval_fn needs at least one validation batch")

    def eval_fn(step: int) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for batch in batches:
            with trainer.autocast():
                _, metrics = loss_fn(model, {k: v.to(trainer.device) for k, v in batch.items()})
            for key, value in metrics.items():
                if key != "tokens":
                    totals[prefix + key] += value / len(batches)
        return dict(totals)

    return eval_fn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on the trainable parameters; matrices decay, biases and norms do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def context_length(model: nn.Module) -> int:
    """Longest sequence the model accepts: our GPT's block_size or a transformers config's position limit."""
    config = model.config
    for name in ("block_size", "n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot tell the context length of {type(model).__name__}")


# ---------------------------------------------------------------------------------------------- SFT
@dataclass
class SFTSetup:
    """Everything `Trainer.fit` needs for one SFT run (what `train_sft` runs; tests drive it directly)."""

    cfg: SFTConfig
    model: nn.Module
    tokenizer: object
    trainer: Trainer
    batch_fn: Callable[[list[int]], Batch]  # training examples at these indices, collated
    step_fn: StepFn
    eval_fn: EvalFn


@dataclass
class SFTResult:
    model: nn.Module  # LoRA merged, on the training device, eval mode
    tokenizer: object
    trainer: Trainer  # train_log / eval_log hold the metrics
    out_dir: Path


def build_sft(cfg: SFTConfig, model: nn.Module | None = None, tokenizer=None) -> SFTSetup:
    """Load model and data for `cfg` (or use the given `model`/`tokenizer`), add LoRA, make the trainer."""
    seed_everything(cfg.seed)
    if model is None or tokenizer is None:
        model, tokenizer = load_lm(cfg.model)
    if cfg.block_size > context_length(model):
        raise ValueError(f"block_size {cfg.block_size} exceeds the model's context length {context_length(model)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    source = resolve_source(cfg.data_source)
    train_dialogues = load_dialogues("train", source)
    if cfg.train_examples:
        train_dialogues = train_dialogues[: cfg.train_examples]
    train = tokenize_dialogues(tokenizer, train_dialogues, cfg.block_size, cfg.only_last, cfg.windows)
    val = tokenize_dialogues(tokenizer, load_dialogues("validation", source)[: cfg.eval_examples], cfg.block_size,
                             cfg.only_last, cfg.windows)
    val = val[:: max(1, len(val) // cfg.eval_examples)][: cfg.eval_examples]  # spread over those dialogues
    if len(train) < cfg.batch_size * cfg.grad_accum or not val:
        raise ValueError(f"too few examples after tokenization: {len(train)} train, {len(val)} validation")

    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    trainable, total = count_parameters(model)
    print(f"SFT of {type(model).__name__}: {trainable:,} of {total:,} parameters trainable "
          f"({'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'}); "
          f"{len(train)} train / {len(val)} validation examples of <= {cfg.block_size} tokens")

    device = get_device(cfg.device)
    model.to(device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    trainer = Trainer(
        sft_dir(cfg) / "run", {"policy": model}, {"policy": optimizer}, steps=cfg.steps,
        schedulers={"policy": warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)},
        grad_clip=cfg.grad_clip or None, eval_interval=cfg.eval_interval, ckpt_interval=cfg.ckpt_interval,
        device=device, bf16=cfg.bf16, desc="sft",
    )
    batch_fn = lambda indices: collate([train[i] for i in indices], pad_id)
    step_fn = make_step_fn(trainer, model, sft_loss, batch_fn, n_examples=len(train), batch_size=cfg.batch_size,
                           grad_accum=cfg.grad_accum, seed=cfg.seed)
    val_batches = [collate(val[i : i + cfg.batch_size], pad_id) for i in range(0, len(val), cfg.batch_size)]
    eval_fn = make_eval_fn(trainer, model, sft_loss, val_batches)
    return SFTSetup(cfg, model, tokenizer, trainer, batch_fn, step_fn, eval_fn)


def train_sft(cfg: SFTConfig, resume: bool = False, model: nn.Module | None = None, tokenizer=None) -> SFTResult:
    """Fine-tune, merge LoRA, and save the model to `sft_dir(cfg)` (where `load_or_train_sft` finds it).

    `model`/`tokenizer` default to `load_lm(cfg.model)`; a given model is trained in place. With `resume`, training
    continues from the checkpoint in `sft_dir(cfg)/run/` (same result as an uninterrupted run).
    """
    setup = build_sft(cfg, model, tokenizer)
    setup.trainer.fit(setup.step_fn, setup.eval_fn, resume=resume)
    model = merge_lora(setup.model).eval()
    out = sft_dir(cfg)
    save_lm(model, setup.tokenizer, out)
    (out / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=2))  # written last: marks a complete save
    return SFTResult(model, setup.tokenizer, setup.trainer, out)


def load_or_train_sft(profile: str | None = None, **overrides) -> tuple[nn.Module, object]:
    """The SFT model of `profile`: loaded from `checkpoint_dir()/sft/<profile>/` if saved there, else trained."""
    cfg = sft_config(profile, **overrides)
    out = sft_dir(cfg)
    if (out / "sft_config.json").exists():
        print(f"loading the SFT model from {out}")
        model, tokenizer = load_lm(str(out))
        return model.to(get_device(cfg.device)).eval(), tokenizer
    print(f"no SFT model in {out}; training it ({cfg.steps} steps)")
    result = train_sft(cfg)
    return result.model, result.tokenizer


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
