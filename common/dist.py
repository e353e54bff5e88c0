"""Several processes, one training run: PyTorch's `torch.distributed` (DDP), set up in this one place.

A training function runs unchanged in one process or in each of the N processes that `torchrun` starts (nanoGPT's
manner): rank, world size and local rank come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), the
backend is nccl on CUDA and gloo on a CPU. In one process every helper here is a no-op that returns its input.

- `distributed()`: joins the process group of torchrun's workers (and leaves it at the end); one process: nothing.
- `rank`, `world_size`, `local_rank`, `is_main_process`, `barrier`; `sum_over_ranks` (an all-reduce) and
  `sum_gathered` reduce metrics, `average_` a tensor; `gather` collects a Python object from every rank; `shard` cuts
  a global batch into the rank's part, `split_range` an evaluation set.
- `main_process_first()`: rank 0 runs a block first (computes and writes a cache), the others then run it (read it).
- `launch_requested()` / `launch()`: with HW3_NPROC=N > 1, a training function called in a notebook (one process)
  starts `torchrun --standalone --nproc_per_node=N -m <module> train ...`, waits, then loads the run rank 0 saved.

Every rank must call the collective helpers (`barrier`, `sum_over_ranks`, `gather`, ...) in the same order.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.device import get_device

NPROC_ENV = "HW3_NPROC"  # processes per machine for every training run of a notebook (Makefile: NPROC)
TIMEOUT = timedelta(minutes=60)  # a collective waits this long (rank 0 alone may build a cache meanwhile)
_host_group = None  # gloo group for host-side numbers when the default group is nccl (no GPU sync for a count)


# ---------------------------------------------------------------------------------------------- who am I
def is_worker() -> bool:
    """Whether this process was started by torchrun (its environment names a rank and a world size)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """This process's index on its machine (its GPU); 0 in one process."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_worker() else 0


def is_main_process() -> bool:
    """Rank 0: the one process that logs, shows progress bars and writes files."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


# ---------------------------------------------------------------------------------------------- set up
def check_nproc(nproc: int) -> None:
    """Raise unless `nproc` processes per machine can run here: on CUDA, one GPU each."""
    if nproc < 1:
        raise ValueError(f"{NPROC_ENV} (NPROC) must be >= 1, got {nproc}")
    if get_device().type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"NPROC={nproc} processes need {nproc} GPUs, but this machine has "
                         f"{torch.cuda.device_count()}; set NPROC to at most that (or HW3_DEVICE=cpu for gloo)")


def init() -> torch.device:
    """Join torchrun's process group (once) and return this process's device: cuda:LOCAL_RANK, or the CPU."""
    global _host_group
    device = get_device()
    if not is_worker():
        return device
    if device.type == "cuda":
        check_nproc(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        os.environ["HW3_DEVICE"] = str(device)  # every `get_device()` of this process now names its own GPU
    if not is_initialized():
        dist.init_process_group(backend_for(device), timeout=TIMEOUT)
        _host_group = dist.new_group(backend="gloo", timeout=TIMEOUT) if device.type == "cuda" else None
    return device


def destroy() -> None:
    global _host_group
    if is_initialized():
        dist.destroy_process_group()
    _host_group = None


@contextlib.contextmanager
def distributed() -> Iterator[torch.device]:
    """`init()` for the block, `destroy()` after it: the body of a module's `train` entry point."""
    device = init()
    try:
        yield device
    finally:
        destroy()


def wrap(module: nn.Module) -> nn.Module:
    """`module` in DistributedDataParallel when several processes train (its gradients are averaged over ranks in
    `backward`); the module itself in one process. DDP broadcasts rank 0's parameters and buffers once, here."""
    if world_size() == 1:
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------- collectives
def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def sum_over_ranks(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Each value summed over the ranks (one all-reduce of a float64 vector on the host, through gloo even beside
    nccl, so that a count of host-side items waits for no GPU); in one process, `values` itself."""
    if world_size() == 1 or not values:
        return values
    vector = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu().reshape(()) for v in values.values()])
    dist.all_reduce(vector, group=_host_group)
    return dict(zip(values, vector.tolist(), strict=True))


def average_(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` replaced in place by its mean over the ranks (e.g. a gradient that DDP does not reduce)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def sum_gathered(values: dict[str, float]) -> dict[str, float]:
    """Each key summed over the ranks that have it (a rank with no evaluation batch contributes nothing): for
    evaluation metrics, a gather of small dicts; in one process, `values` itself."""
    if world_size() == 1:
        return values
    out: dict[str, float] = {}
    for part in gather(values):
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out


def gather(obj: Any) -> list[Any]:
    """[rank 0's obj, rank 1's obj, ...] on every rank (pickled; for host-side lists and CPU tensors)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_host_group)
    return out


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first, then the other ranks: rank 0 computes and writes a cache, the others read it."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


# ---------------------------------------------------------------------------------------------- batches
def shard_size(total: int, what: str) -> int:
    """`total` / world size, with a clear error when it does not divide (each rank takes an equal part)."""
    n = world_size()
    if total % n:
        raise ValueError(f"{what} ({total}) is not divisible by the {n} processes; make it a multiple of NPROC={n} "
                         "(or choose an NPROC that divides it)")
    return total // n


def shard(batch: torch.Tensor, what: str = "the batch") -> torch.Tensor:
    """This rank's equal, contiguous part of a global batch (B, ...) -> (B / world, ...); all of it in one process."""
    if world_size() == 1:
        return batch
    k = shard_size(batch.shape[0], what)
    return batch[rank() * k : (rank() + 1) * k]


def split_range(total: int) -> range:
    """This rank's contiguous part of range(total), parts as equal as possible (for evaluation sets)."""
    n, r = world_size(), rank()
    return range(total * r // n, total * (r + 1) // n)


# ---------------------------------------------------------------------------------------------- launching
def requested_nproc() -> int:
    """$HW3_NPROC (default 1): processes per machine for each training run."""
    value = os.environ.get(NPROC_ENV, "1").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{NPROC_ENV} must be a positive integer (processes per machine), got {value!r}")
    return int(value)


def launch_requested() -> bool:
    """Whether a training function called here should run under torchrun: HW3_NPROC > 1 and not a worker yet."""
    return requested_nproc() > 1 and not is_worker()


def config_overrides(cfg: Any, preset: Any) -> list[str]:
    """`--set field=<json>` for each field of the dataclass `cfg` that differs from `preset` (its profile's)."""
    preset_fields = dataclasses.asdict(preset)
    args = []
    for key, value in dataclasses.asdict(cfg).items():
        if value != preset_fields[key]:
            args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def launch(module: str, args: Sequence[str], nproc: int | None = None) -> None:
    """Run `torchrun --standalone --nproc_per_node=<nproc, default $HW3_NPROC> -m <module> <args>` and wait for it.

    Rank 0 of that run saves the checkpoint and model; the caller then loads them (its run resumes at the end)."""
    nproc = nproc or requested_nproc()
    check_nproc(nproc)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    shown = " ".join(["torchrun", *command[3:]])  # the same command, to rerun by hand
    print(f"{nproc} processes: {shown}", flush=True)
    code = subprocess.run(command, check=False).returncode
    if code:
        raise RuntimeError(f"the {nproc}-process run `{shown}` failed (exit code {code}); its output is above. Rerun "
                           f"it by hand, or set {NPROC_ENV}=1 (NPROC=1) to train in this process")


def train_args(argv: Sequence[str] | None, description: str, dataset: bool = False) -> argparse.Namespace:
    """The command line of a module's `train` entry point: `train --profile P [--dataset D] [--set key=json ...]
    [--resume]`. `overrides` holds the parsed --set values."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("command", choices=("train",))
    parser.add_argument("--profile", default=None, help="smoke | quick | full (default: $HW3_PROFILE or quick)")
    if dataset:
        parser.add_argument("--dataset", required=True, help="mnist | cifar10")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="config override, e.g. --set steps=100 --set lr=1e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's checkpoint if present")
    args = parser.parse_args(argv)
    args.overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=JSON, got {item!r}")
        try:
            args.overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            args.overrides[key] = value  # a bare string, e.g. --set data_source=chitchat
    return args


def launch_run(module: str, cfg: Any, preset: Any, profile: str, resume: bool, dataset: str | None = None) -> None:
    """`launch` the `train` entry point of `module` for the config `cfg`: `--profile` (and `--dataset`), plus a
    `--set` for each field where `cfg` differs from `preset` (the profile's config), so the workers build `cfg`."""
    args = ["train", "--profile", profile, *(["--dataset", dataset] if dataset else []),
            *config_overrides(cfg, preset), *(["--resume"] if resume else [])]
    launch(module, args)
