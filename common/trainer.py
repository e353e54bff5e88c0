"""The one training loop of the package, used by SFT, DPO, the VAE/GAN and the latent diffusion model.

A task supplies `step_fn(step) -> metrics`: it fetches the batch of that step, computes losses, calls
`loss.backward()` and then `trainer.optimizer_step(name)` for each optimizer it steps (the VAE+GAN steps two).
The loop owns everything else: train/eval modes, progress bar, CSV metrics, periodic evaluation,
gradient clipping, LR schedules, EMA updates, and checkpoints that resume bit-for-bit (module, optimizer,
scheduler, EMA and RNG states, plus the metric rows so far).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from tqdm.auto import tqdm

from common.device import autocast
from common.ema import EMA
from common.logging import MetricLogger

StepFn = Callable[[int], dict[str, float]]
EvalFn = Callable[[int], dict[str, float]]


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up to the base LR, then cosine decay to `min_ratio` of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


class Trainer:
    def __init__(
        self,
        run_dir: str | Path,
        modules: dict[str, nn.Module],
        optimizers: dict[str, Optimizer],
        *,
        steps: int,
        schedulers: dict[str, LRScheduler] | None = None,
        ema: dict[str, EMA] | None = None,
        grad_clip: float | None = 1.0,
        eval_interval: int = 0,
        ckpt_interval: int = 0,
        device: torch.device | None = None,
        bf16: bool = False,
        desc: str = "train",
        progress: bool = True,
    ):
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        unknown = set(optimizers) - set(modules)
        if unknown:
            raise ValueError(f"optimizers {sorted(unknown)} have no module of the same name in {sorted(modules)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.modules, self.optimizers = modules, optimizers
        self.schedulers = schedulers or {}
        self.ema = ema or {}
        self.steps, self.grad_clip = steps, grad_clip
        self.eval_interval, self.ckpt_interval = eval_interval, ckpt_interval
        self.device = device or next(next(iter(modules.values())).parameters()).device
        self.bf16, self.desc, self.progress = bf16, desc, progress
        self.train_log = MetricLogger(self.run_dir / "train.csv", tensorboard_dir=self.run_dir / "tb")
        self.eval_log = MetricLogger(self.run_dir / "eval.csv")
        self.step = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def autocast(self):
        return autocast(self.device, self.bf16)

    def optimizer_step(self, name: str) -> float:
        """Clip, step and zero the grads of optimizer `name`; advance its schedule and EMA. Returns the grad norm."""
        optimizer = self.optimizers[name]
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.grad_clip:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if name in self.schedulers:
            self.schedulers[name].step()
        if name in self.ema:
            self.ema[name].update(self.modules[name])
        return norm

    def fit(self, step_fn: StepFn, eval_fn: EvalFn | None = None, resume: bool = False) -> Trainer:
        """Run steps `self.step .. steps-1`. With `resume`, continue from the checkpoint in `run_dir` if present."""
        if resume and self.checkpoint_path.exists():
            self.load(self.checkpoint_path)
        if self.step == 0 and eval_fn is not None:
            self._evaluate(eval_fn)
        bar = tqdm(range(self.step, self.steps), initial=self.step, total=self.steps, desc=self.desc,
                   disable=not self.progress, dynamic_ncols=True)
        for step in bar:
            for module in self.modules.values():
                module.train()
            start = time.perf_counter()
            metrics = step_fn(step)
            metrics["step_time"] = time.perf_counter() - start
            first_opt = next(iter(self.optimizers.values()))
            metrics.setdefault("lr", first_opt.param_groups[0]["lr"])
            self.step = step + 1
            self.train_log.log(self.step, **metrics)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if "loss" in k})
            last = self.step == self.steps
            if eval_fn is not None and (last or (self.eval_interval and self.step % self.eval_interval == 0)):
                self._evaluate(eval_fn)
            if last or (self.ckpt_interval and self.step % self.ckpt_interval == 0):
                self.save(self.checkpoint_path)
        bar.close()
        return self

    def _evaluate(self, eval_fn: EvalFn) -> None:
        for module in self.modules.values():
            module.eval()
        with torch.no_grad():
            metrics = eval_fn(self.step)
        self.eval_log.log(self.step, **metrics)
        if self.progress:
            tqdm.write(f"[{self.desc}] step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "ema": {k: e.state_dict() for k, e in self.ema.items()},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "train_rows": self.train_log.rows,
            "eval_rows": self.eval_log.rows,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)  # atomic: an interrupted save never leaves a truncated checkpoint

    def load(self, path: str | Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        missing = set(self.modules) - set(state["modules"])
        if missing:
            raise ValueError(f"checkpoint {path} has no weights for modules {sorted(missing)}")
        for key, module in self.modules.items():
            module.load_state_dict(state["modules"][key])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
        for key, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][key])
        for key, ema in self.ema.items():
            ema.load_state_dict(state["ema"][key])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.train_log.rows = list(state["train_rows"])
        self.eval_log.rows = list(state["eval_rows"])
        self.step = state["step"]
