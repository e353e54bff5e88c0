"""What SFT (`fm.sft`) and DPO (`fm.dpo`) share: the base config of their runs, run folders named by that config,
the optimizer + schedule + Trainer they both build, and saving / finding a finished run's model.

A run lives in `checkpoint_dir()/<task>/<run_name>_<digest>/`, the digest being `common.config.config_digest` of
every field not marked `bookkeeping`: changing any training setting starts a new run instead of reusing a stale one. The
folder holds the trained model (`fm.pretrained.save_lm`) and, in `run/`, the Trainer's logs and checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from common import checkpoint_dir, dist, get_device
from common.config import bookkeeping, check, config_digest
from common.optim import build_optimizer, warmup_cosine
from common.trainer import Trainer
from fm.generate import context_length
from fm.pretrained import save_lm

DATA_SOURCES = ("auto", "hh", "chitchat")
SAVED_CONFIG = "train_config.json"  # written after the model: its presence marks a complete save


@dataclass
class LMTrainConfig:
    """The fields SFT and DPO share; each task adds its own (`fm.sft.SFTConfig`, `fm.dpo.DPOConfig`)."""

    # bookkeeping (left out of the digest): the folder's readable prefix, where it runs, when it evaluates, checkpoints
    # and logs (evaluation runs without gradients and draws no random numbers)
    run_name: str = bookkeeping("quick")  # readable prefix of the run folder (see the module docstring)
    data_source: str = "auto"  # one of data_sources
    block_size: int = 128  # tokens per sequence
    batch_size: int = 4  # micro-batch: examples (SFT) or pairs (DPO)
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 100  # optimizer steps
    lr: float = 5e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    eval_interval: int = bookkeeping(25)  # 0: evaluate at the start and the end only
    ckpt_interval: int = bookkeeping(0)  # 0: checkpoint at the end only
    bf16: bool = False
    seed: int = 0
    device: str | None = bookkeeping(None)  # None: common.get_device()
    log_interval: int = bookkeeping(1)  # train metrics are read off the device (a host sync) every log_interval steps
    data_sources: ClassVar[tuple[str, ...]] = DATA_SOURCES  # what data_source may be (DPO adds its on-policy pairs)

    def __post_init__(self):
        name = type(self).__name__
        for key in ("block_size", "batch_size", "grad_accum", "steps"):
            check(getattr(self, key) > 0, f"{name}.{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "weight_decay", "grad_clip", "eval_interval", "ckpt_interval"):
            check(getattr(self, key) >= 0, f"{name}.{key} must be >= 0, got {getattr(self, key)}")
        check(self.lr > 0, f"{name}.lr must be positive, got {self.lr}")
        check(self.warmup_steps < self.steps, f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.data_source in self.data_sources,
              f"{name}.data_source must be one of {self.data_sources}, got {self.data_source!r}")

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def digest(self) -> str:
        """Hash of the training-relevant fields (all but the bookkeeping ones)."""
        return config_digest(self)


def run_folder(task: str, cfg: LMTrainConfig, *tags: str) -> Path:
    """`checkpoint_dir()/<task>/<run_name>_<digest>[_<tag>...]`; `tags` name further inputs (e.g. the SFT run)."""
    return checkpoint_dir() / task / "_".join((cfg.run_name, cfg.digest(), *tags))


def check_block_size(block_size: int, model: nn.Module) -> None:
    """Raise unless sequences of `block_size` tokens fit the model's context."""
    limit = context_length(model)
    if limit is None:
        raise ValueError(f"cannot tell the context length of {type(model).__name__} (its config has no block_size, "
                         "n_positions or max_position_embeddings)")
    if block_size > limit:
        raise ValueError(f"block_size {block_size} exceeds the model's context length {limit}")


def make_trainer(cfg: LMTrainConfig, model: nn.Module, run_dir: Path, desc: str) -> Trainer:
    """The Trainer of one policy: AdamW (`build_optimizer`), linear warm-up then cosine decay, settings of `cfg`."""
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    return Trainer(
        run_dir, {"policy": model}, {"policy": optimizer}, steps=cfg.steps,
        schedulers={"policy": warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)},
        grad_clip=cfg.grad_clip or None, eval_interval=cfg.eval_interval, ckpt_interval=cfg.ckpt_interval,
        device=get_device(cfg.device), bf16=cfg.bf16, desc=desc, log_interval=cfg.log_interval,
    )


def save_trained(model: nn.Module, tokenizer, cfg: LMTrainConfig, out: Path) -> None:
    """Save the trained model with `save_lm` to `out`, then the config (which marks the save complete). Under
    torchrun rank 0 writes (every rank holds the same weights) and the others wait for it."""
    if dist.is_main_process():
        save_lm(model, tokenizer, out)
        (out / SAVED_CONFIG).write_text(json.dumps(asdict(cfg), indent=2))
    dist.barrier()


def is_saved(out: Path) -> bool:
    """Whether `save_trained` finished writing a model to `out`."""
    return (out / SAVED_CONFIG).exists()
