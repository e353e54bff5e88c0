"""The one training loop of the package, used by SFT, DPO, the VAE/GAN and the latent diffusion model.

A task supplies `step_fn(step) -> metrics`: it fetches the batch of that step, computes losses, calls
`loss.backward()` and then `trainer.optimizer_step(name)` for each optimizer it steps (the VAE+GAN steps two).
The loop owns everything else: train/eval modes, progress bar, CSV metrics, periodic evaluation,
gradient clipping, LR schedules, EMA updates, and checkpoints that resume bit-for-bit (module, optimizer,
scheduler, EMA and RNG states, plus the metric rows so far).

Metric values may be Python numbers or detached 0-d tensors. The loop turns them into floats only every
`log_interval` steps (and at the last step), so on a GPU the steps in between queue up without waiting for the
device: the `.item()` of a logged row is the one host sync of its interval (as nanoGPT's `log_interval`).

Under torchrun (several processes, `common.dist`) the same loop runs in every process, as nanoGPT's `train.py`
does: the trained modules are wrapped in DistributedDataParallel (`Trainer.models`), whose backward averages the
gradients over the ranks; a task's step function takes its rank's part of the step's global batch
(`common.steps.make_step_fn`: the same seeded indices on every rank, cut into shards), so N ranks x k micro-batches
make one batch of N x k.
Logged metrics are averaged over the ranks (`*_per_s` rates summed). Only rank 0 shows a progress bar and writes the
CSVs and checkpoints (the others keep the rows in memory); every rank draws its own random numbers (dropout,
augmentation, noise), offset by its rank, and a checkpoint keeps every rank's RNG state, so a resumed run under DDP
is the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from common import dist
from common.device import autocast
from common.ema import EMA
from common.io import atomic_save
from common.logging import MetricLogger, column

Metrics = dict[str, float | torch.Tensor]  # numbers or one-element tensors, made floats when logged
StepFn = Callable[[int], Metrics]
EvalFn = Callable[[int], Metrics]


def as_floats(metrics: Metrics) -> dict[str, float]:
    """`metrics` with every value a Python float. A tensor's `.item()` waits for the device (a host sync)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric {key!r} must be a number or a one-element tensor, got a tensor of shape "
                                 f"{tuple(value.shape)}; reduce it (e.g. .mean()) in the step function")
            value = value.item()
        out[key] = float(value)
    return out


class MemoryLog:
    """A `MetricLogger` without its file: the rows that ranks other than 0 keep (rank 0 alone writes the CSVs)."""

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, step: int, **metrics: float) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def restore(self, rows: Sequence[dict]) -> None:
        self.rows = list(rows)

    def column(self, key: str) -> tuple[list[int], list[float]]:
        return column(self.rows, key)


def offset_rng_by_rank(rank: int) -> None:
    """Reseed torch, NumPy and Python on ranks > 0 from the process's seed plus the rank (nanoGPT's `seed_offset`):
    the ranks draw different dropout masks, augmentations and noise. Rank 0 keeps its stream (one process: as
    before)."""
    if rank == 0:
        return
    seed = torch.initial_seed() + 1_000_003 * rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Trainer:
    """Runs `steps` optimisation steps of a task's `step_fn` in `run_dir` (train.csv, eval.csv, checkpoint.pt).

    Train metrics are logged every `log_interval` steps and at the last step; evaluation runs at step 0, every
    `eval_interval` steps and at the end; checkpoints every `ckpt_interval` steps and at the end (0: never between).

    In a process group (`common.dist`) the modules that have an optimizer are wrapped in DDP: a step function runs
    their forward passes through `models[name]` (or `wrapped(module)`). `distributed=False` trains in this process
    alone even then (the evaluation classifier, trained on rank 0 while the others wait).
    """

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
        log_interval: int = 1,
        device: torch.device | None = None,
        bf16: bool = False,
        desc: str = "train",
        progress: bool = True,
        distributed: bool = True,
    ):
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        if log_interval <= 0:
            raise ValueError(f"log_interval must be positive (1 logs every step), got {log_interval}")
        unknown = set(optimizers) - set(modules)
        if unknown:
            raise ValueError(f"optimizers {sorted(unknown)} have no module of the same name in {sorted(modules)}")
        self.world = dist.world_size() if distributed else 1
        self.rank = dist.rank() if distributed else 0
        self.writer = dist.is_main_process()  # the one process that logs to files and saves checkpoints
        self.run_dir = Path(run_dir)
        if self.writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.modules, self.optimizers = modules, optimizers
        # DDP wrappers of the trained modules (the modules themselves in one process): forward passes go through them
        self.models = {k: dist.wrap(m) if self.world > 1 and k in optimizers else m for k, m in modules.items()}
        self.schedulers = schedulers or {}
        self.ema = ema or {}
        self.steps, self.grad_clip = steps, grad_clip
        self.eval_interval, self.ckpt_interval, self.log_interval = eval_interval, ckpt_interval, log_interval
        self.device = device or next(next(iter(modules.values())).parameters()).device
        self.bf16, self.desc, self.progress = bf16, desc, progress and self.writer
        self.train_log: MetricLogger | MemoryLog = MemoryLog()
        self.eval_log: MetricLogger | MemoryLog = MemoryLog()
        if self.writer:
            self.train_log = MetricLogger(self.run_dir / "train.csv", tensorboard_dir=self.run_dir / "tb")
            self.eval_log = MetricLogger(self.run_dir / "eval.csv")
        self.step = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def autocast(self):
        return autocast(self.device, self.bf16)

    def wrapped(self, module: nn.Module) -> nn.Module:
        """The DDP wrapper of `module` if the trainer made one, else `module`: what a training forward calls."""
        return next((self.models[k] for k, m in self.modules.items() if m is module), module)

    def no_sync(self, name: str, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's backward: DDP's `no_sync()` (gradients only accumulate locally) unless it is the
        step's `last` micro-batch, whose backward averages the accumulated gradients over the ranks."""
        model = self.models[name]
        return model.no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def sum_over_ranks(self, values: dict[str, float | torch.Tensor]) -> dict[str, float | torch.Tensor]:
        """`common.dist.sum_over_ranks` when this trainer is distributed; `values` itself otherwise."""
        return dist.sum_over_ranks(values) if self.world > 1 else values

    def _mean_row(self, row: dict[str, float]) -> dict[str, float]:
        """A logged row averaged over the ranks; rates (`*_per_s`) are summed. One process: the row itself."""
        if self.world == 1:
            return row
        return {k: v if k.endswith("_per_s") else v / self.world for k, v in self.sum_over_ranks(row).items()}

    def optimizer_step(self, name: str) -> torch.Tensor:
        """Clip, step and zero the grads of optimizer `name`; advance its schedule and EMA.

        Returns the gradient norm before clipping as a 0-d tensor on the device (no host sync; a metric value).
        """
        optimizer = self.optimizers[name]
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if name in self.schedulers:
            self.schedulers[name].step()
        if name in self.ema:
            self.ema[name].update(self.modules[name])
        return norm

    def fit(self, step_fn: StepFn, eval_fn: EvalFn | None = None, resume: bool = False) -> Trainer:
        """Run steps `self.step .. steps-1`. With `resume`, continue from the checkpoint in `run_dir` if present.

        A logged row holds the metrics of its step, `lr`, and `step_time`: the mean wall seconds per step since the
        previous row, measured around the step functions and the row's host sync (evaluation and checkpoints are
        not counted), so it is the device's time per step on a GPU too.
        """
        if resume and self.checkpoint_path.exists():
            self.load(self.checkpoint_path)
        elif self.world > 1:
            offset_rng_by_rank(self.rank)
        if self.step == 0 and eval_fn is not None:
            self._evaluate(eval_fn)
        bar = tqdm(range(self.step, self.steps), initial=self.step, total=self.steps, desc=self.desc,
                   disable=not self.progress, dynamic_ncols=True)
        busy, unlogged = 0.0, 0  # seconds and steps since the last logged row
        for step in bar:
            for module in self.modules.values():
                module.train()
            start = time.perf_counter()
            metrics = step_fn(step)
            self.step, unlogged = step + 1, unlogged + 1
            last = self.step == self.steps
            if last or self.step % self.log_interval == 0:
                row = self._mean_row(as_floats(metrics))  # host sync: waits for the steps queued since the last row
                busy += time.perf_counter() - start
                row["step_time"] = busy / unlogged
                row.setdefault("lr", next(iter(self.optimizers.values())).param_groups[0]["lr"])
                self.train_log.log(self.step, **row)
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if "loss" in k})
                busy, unlogged = 0.0, 0
            else:
                busy += time.perf_counter() - start
            if eval_fn is not None and (last or (self.eval_interval and self.step % self.eval_interval == 0)):
                self._evaluate(eval_fn)
            if last or (self.ckpt_interval and self.step % self.ckpt_interval == 0):
                self.save(self.checkpoint_path)
        bar.close()
        return self

    def _evaluate(self, eval_fn: EvalFn) -> None:
        for module in self.modules.values():
            module.eval()
        with torch.no_grad():  # an eval_fn of several ranks shards its set and sums over the ranks itself
            metrics = as_floats(eval_fn(self.step))
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
        """Rank 0 writes the checkpoint, with every rank's RNG state ("rank_rng"); the others wait for it."""
        state = self.state_dict()
        if self.world > 1:
            state["rank_rng"] = dist.gather(state["rng"])
        if self.writer:
            atomic_save(state, path)  # an interrupted save never leaves a truncated checkpoint
        if self.world > 1:
            dist.barrier()

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
        if self.world > 1 and len(state.get("rank_rng", [])) == self.world:
            rng = state["rank_rng"][self.rank]  # the same checkpoint, each rank's own stream
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        # The CSVs may hold rows logged after this checkpoint (a run killed between checkpoints): rewrite them.
        self.train_log.restore(state["train_rows"])
        self.eval_log.restore(state["eval_rows"])
        self.step = state["step"]
        if self.world > 1 and len(state.get("rank_rng", [])) != self.world:
            offset_rng_by_rank(self.rank)  # saved by another number of processes: offset rank 0's stream
