"""The training runs of tests/test_distributed.py: run by each of 2 gloo processes on the CPU,

    torchrun --standalone --nproc_per_node=2 -m tests.ddp_runs OUT

and imported by the test for the one-process references (the same functions, in one process). Rank 0 writes what
the test compares into OUT: the parameters and gradients after one step (`<run>.pt`), the resume check
(`resume.json`) and the files rank 1 tried to write (`writes.json`).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from common import dist
from common.steps import make_eval_fn, make_step_fn
from common.trainer import Trainer

STEPS = 1  # one optimizer step: the parameters then differ only by how the batch's gradient was summed


def sft_cfg():
    from fm.sft import sft_config

    return sft_config("smoke", data_source="chitchat", batch_size=1, grad_accum=4, steps=STEPS, warmup_steps=0,
                      train_examples=8, eval_examples=2, lr=1e-3)


def dpo_cfg():
    from fm.dpo import dpo_config

    return dpo_config("smoke", data_source="chitchat", train_pairs=8, val_pairs=2, eval_batch_size=1, batch_size=1,
                      grad_accum=4, steps=STEPS, warmup_steps=0, lr=1e-3)


def vae_gan_cfg():
    from gm.vae import vae_config

    return vae_config("mnist", "smoke", gan_weight=0.1, gan_mode="adaptive", gan_loss_start=0, steps=STEPS,
                      batch_size=4, warmup_steps=0, eval_size=4)


def ldm_cfg():
    from gm.ldm import ldm_config

    return ldm_config("mnist", "smoke", steps=STEPS, batch_size=4, warmup_steps=0, max_train=8, eval_size=4,
                      class_dropout=0.0)


@contextlib.contextmanager
def deterministic_draws() -> Iterator[None]:
    """Noise that is a function of the data: `randn_like(x)` = sin(1000 x) and a constant `randint` (timesteps).

    Under DDP each rank draws its own noise (its RNG is offset by its rank), so a stochastic step equals the one-process
    step only in distribution. With these draws the VAE's posterior sample and the LDM's noise and timesteps of an
    image are the same whichever process takes it, and the test sees the reduction math alone.
    """
    randn_like, randint = torch.randn_like, torch.randint

    def fixed_randint(*args, size=None, generator=None, device=None, dtype=torch.long, **kwargs):
        return torch.full(tuple(size if size is not None else args[-1]), 37, dtype=dtype, device=device)

    torch.randn_like = lambda x, **kwargs: torch.sin(1000 * x.detach())
    torch.randint = fixed_randint
    try:
        yield
    finally:
        torch.randn_like, torch.randint = randn_like, randint


def tiny_lm():
    from fm.pretrained import load_lm

    torch.manual_seed(0)
    return load_lm("tiny")


def one_step(run: str) -> dict[str, dict[str, torch.Tensor]]:
    """After one step of `run` ("sft" | "dpo" | "vae_gan" | "ldm") through the library's own training function, in
    this process or in every rank of a process group: {module: {"params": its state dict, "grads": the step's
    gradient of each trained parameter}}, the gradient read from the checkpoint's Adam(W) state (exp_avg / (1 -
    beta1)). The optimizers hold the parameters in `named_parameters` order (SFT and DPO: matrices first)."""
    if run in ("sft", "dpo"):
        from common.optim import build_optimizer
        from fm.dpo_train import train_dpo
        from fm.sft import train_sft

        if run == "sft":
            cfg = sft_cfg()
            result = train_sft(cfg)
        else:
            cfg, (model, tokenizer) = dpo_cfg(), tiny_lm()
            result = train_dpo(cfg, model=model, tokenizer=tokenizer)
        names = {id(p): n for n, p in result.model.named_parameters()}
        # the trainer's optimizer (`fm.training.make_trainer`) holds them in the groups of `build_optimizer`
        groups = build_optimizer(result.model, cfg.lr, cfg.weight_decay).param_groups
        order = [names[id(p)] for g in groups for p in g["params"]]
        modules, orders, ckpt = {"policy": result.model}, {"policy": order}, result.folder / "run" / "checkpoint.pt"
    elif run == "vae_gan":
        from gm.vae import train_vae

        with deterministic_draws():
            result = train_vae(vae_gan_cfg())
        modules, ckpt = {"vae": result.model, "disc": result.disc}, result.folder / "checkpoint.pt"
        orders = {k: [n for n, _ in m.named_parameters()] for k, m in modules.items()}
    else:
        from gm.ldm import train_ldm
        from gm.vae import LDM_KL_WEIGHT, build_vae, vae_config

        torch.manual_seed(0)
        vae = build_vae(vae_config("mnist", "smoke", kl_weight=LDM_KL_WEIGHT)).eval().requires_grad_(False)
        with deterministic_draws():
            result = train_ldm(ldm_cfg(), vae=vae)
        modules, ckpt = {"ldm": result.model}, result.folder / "checkpoint.pt"
        orders = {"ldm": [f"unet.{n}" for n, _ in result.model.unet.named_parameters()]}
    out = {}
    for name, state in torch.load(ckpt, weights_only=False)["optimizers"].items():
        beta1 = state["param_groups"][0]["betas"][0]
        out[name] = {"params": {k: v.clone() for k, v in modules[name].state_dict().items()},
                     "grads": {orders[name][i]: s["exp_avg"] / (1 - beta1) for i, s in state["state"].items()}}
    return out


EQUALITY_RUNS = ("sft", "dpo", "vae_gan", "ldm")


# ---------------------------------------------------------------------------------------------- resume
class Regression:
    """A tiny regression with dropout (each rank's RNG stream matters) on make_step_fn: 4 micro-batches of 2 per step,
    shared by the ranks, a checkpoint every 3 steps."""

    def __init__(self, run_dir: Path, steps: int = 6):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.trainer = Trainer(run_dir, {"model": self.model}, {"model": opt}, steps=steps, ckpt_interval=3,
                               progress=False)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, generator=gen)
        data = {"x": x, "y": x.sum(1, keepdim=True)}

        def loss_fn(net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
            loss = nn.functional.mse_loss(net(batch["x"]), batch["y"])
            return loss, {"loss": loss.detach()}

        self.step_fn = make_step_fn(self.trainer, self.model, loss_fn, lambda i: {k: v[i] for k, v in data.items()},
                                    n_examples=32, batch_size=2, grad_accum=4, optimizer="model")
        self.eval_fn = make_eval_fn(self.trainer, self.model, loss_fn,
                                    [{k: v[i : i + 8] for k, v in data.items()} for i in range(0, 32, 8)])


def resume_check(root: Path) -> dict:
    """Uninterrupted vs killed at step 5 (checkpoint at 3) and resumed, both under DDP; whether the ranks drew
    different dropout masks."""
    straight = Regression(root / "straight")
    straight.trainer.fit(straight.step_fn, straight.eval_fn)
    killed = Regression(root / "killed")

    def crash(step: int) -> dict:
        if step == 5:
            raise KeyboardInterrupt
        return killed.step_fn(step)

    with contextlib.suppress(KeyboardInterrupt):
        killed.trainer.fit(crash, killed.eval_fn)
    resumed = Regression(root / "killed")
    resumed.trainer.fit(resumed.step_fn, resumed.eval_fn, resume=True)
    same = all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True))
    rows = [[{k: v for k, v in r.items() if k != "step_time"} for r in t.train_log.rows]
            for t in (straight.trainer, resumed.trainer)]
    masks = dist.gather(torch.nn.functional.dropout(torch.ones(64), 0.5).tolist())
    return {"parameters_equal": same, "rows_equal": rows[0] == rows[1], "eval_equal":
            straight.trainer.eval_log.rows == resumed.trainer.eval_log.rows, "steps": [r["step"] for r in rows[1]],
            "ranks_draw_differently": masks[0] != masks[1]}


# ---------------------------------------------------------------------------------------------- one writer
@contextlib.contextmanager
def record_writes(root: Path, writes: list[str]) -> Iterator[None]:
    """Record in `writes` every file or folder this process opens for writing, creates, renames or removes under
    `root` (builtins/io open, os.mkdir, os.replace, os.rename, os.remove)."""
    root = str(root)
    saved = {name: getattr(module, name) for module, name in
             ((builtins, "open"), (os, "mkdir"), (os, "replace"), (os, "rename"), (os, "remove"))}

    def under(path) -> bool:
        return isinstance(path, str | Path) and os.path.abspath(path).startswith(root)

    def watch(name, fn):
        def wrapper(path, *args, **kwargs):
            mode = args[0] if args else kwargs.get("mode", "r")
            creates = {"open": any(c in str(mode) for c in "wax+"), "mkdir": not os.path.exists(path)}.get(name, True)
            if under(path) and creates:  # (`common.paths` calls mkdir(exist_ok=True) on its existing folders)
                writes.append(f"{name} {path}")
            return fn(path, *args, **kwargs)
        return wrapper

    builtins.open = io.open = watch("open", saved["open"])
    for name in ("mkdir", "replace", "rename", "remove"):
        setattr(os, name, watch(name, saved[name]))
    try:
        yield
    finally:
        builtins.open = io.open = saved["open"]
        for name in ("mkdir", "replace", "rename", "remove"):
            setattr(os, name, saved[name])


# ----------------------------------------------------------------------------------------------
def equality(out: Path) -> None:
    """The four one-step runs and the resume check, rank 1's writes recorded."""
    writes: list[str] = []
    scratch = Path(os.environ["HW3_CKPT_DIR"]).parent
    results = {}
    with record_writes(scratch, writes) if dist.rank() == 1 else contextlib.nullcontext():
        for run in EQUALITY_RUNS:
            results[run] = one_step(run)
        resume = resume_check(scratch / "resume")
    rank_writes = dist.gather(writes)
    if dist.is_main_process():
        for run, state in results.items():
            torch.save(state, out / f"{run}.pt")
        (out / "resume.json").write_text(json.dumps(resume))
        (out / "writes.json").write_text(json.dumps(rank_writes[1]))


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    with dist.distributed():
        equality(Path(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
