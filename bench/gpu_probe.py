"""How long would `make figures PROFILE=full` train on this GPU? Times a few steps of every full training run.

    python -m bench.gpu_probe [--steps 30] [--out fig/gpu_probe.md] [--nproc 8]

Each training run of the full notebooks (`bench.full_presets.RUNS`: SFT, DPO, VAE, VAE+GAN, classifier, LDM) takes
`--steps` steps at the preset's full model and batch size, with bf16 autocast where its config has a `bf16` field
(fp32 otherwise, as the notebooks would run it), random weights and synthetic images (see `bench.full_presets`).
Every step is logged, so its time includes the device sync; the first step (allocation, kernel selection) is not
counted. The table gives s/step, tokens/s or images/s, the peak of `torch.cuda.max_memory_allocated`, and the
training time of each run and notebook at the preset's step counts. Evaluation, sampling, checkpoints and data
preparation (e.g. DPO's reference log-probs over the training pairs) are not in these times. With 30 steps the
probe takes a few minutes on one GPU.

On a CPU (a test) it runs the same loops with the CPU-sized batches of `bench.full_presets.REDUCED`.

With `--nproc N` the probe starts itself under `torchrun --standalone --nproc_per_node=N` and every run trains in N
processes (DDP, one GPU each; the classifier on rank 0 alone, see `gm.eval.load_or_train_classifier`): the same
global batch per step, so s / step against the one-GPU table is the speed-up; rank 0 writes the table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.full_presets import (
    GAN_KL_WEIGHT,
    NOTEBOOKS,
    RUNS,
    PresetRun,
    run_preset,
    write_synthetic_images,
)
from common import dist, fig_dir, get_device
from common.plotting import markdown_table
from fm.dpo import dpo_config
from fm.sft import sft_config
from gm.data import TRAIN_SIZE
from gm.eval import classifier_config
from gm.ldm import ldm_config
from gm.vae import gan_config, vae_config

# How many runs of each kind every full notebook trains (the loops of the notebooks).
NOTEBOOK_RUNS: dict[str, list[tuple[str, str | None, int]]] = {
    "1_2_sft": [("sft", None, 1)],
    "1_3_dpo": [("dpo", None, 1)],
    "2_1_vae": [("vae", "mnist", 3), ("vae", "cifar10", 3)],  # KL weights 1, 1e-3, 1e-6 per data set
    "2_2_gan": [("vae_gan", "cifar10", 9)],  # gan_weight 1e-1 ... 1e-5, 0, 1, 10 and the fixed-mode check
    "2_3_ldm": [("classifier", "mnist", 1), ("classifier", "cifar10", 1), ("ldm", "mnist", 1), ("ldm", "cifar10", 1)],
}


def preset_steps(run: str, dataset: str | None, profile: str) -> tuple[int, int]:
    """(optimizer steps, steps with the GAN term) of the `profile` preset of a run."""
    if run == "sft":
        return sft_config(profile).steps, 0
    if run == "dpo":
        return dpo_config(profile).steps, 0
    if run == "classifier":
        return classifier_config(dataset, profile).steps, 0
    if run == "ldm":
        return ldm_config(dataset, profile).steps, 0
    cfg = gan_config(GAN_KL_WEIGHT, 0.1, profile, dataset) if run == "vae_gan" else vae_config(dataset, profile)
    steps = cfg.num_steps(TRAIN_SIZE[dataset])
    return steps, steps if run == "vae_gan" else 0  # a 2.2 run is all adversarial phase (warm start)


def run_seconds(results: dict[tuple[str, str | None], PresetRun], run: str, dataset: str | None,
                profile: str) -> float:
    """Training seconds of one run at the preset's step count; a GAN run trains the plain VAE until the GAN starts."""
    steps, gan_steps = preset_steps(run, dataset, profile)
    if run != "vae_gan":
        return steps * results[run, dataset].seconds_per_step
    return (steps - gan_steps) * results["vae", dataset].seconds_per_step + gan_steps * results[
        run, dataset].seconds_per_step


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def report(results: dict[tuple[str, str | None], PresetRun], steps: int, profile: str, device: torch.device) -> str:
    """The markdown of `fig/gpu_probe.md`: a table per run, then one per notebook."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
        batches = "the preset's full batch"
    else:
        where = f"CPU ({torch.get_num_threads()} threads)"
        batches = "the CPU-sized batches of bench.full_presets.REDUCED"
    if dist.world_size() > 1:
        where = f"{dist.world_size()} processes (DDP) of {where}"
    rows = []
    for (run, dataset), result in results.items():
        preset, gan_steps = preset_steps(run, dataset, profile)
        unit, per_step = (("tokens/s", result.tokens_per_step) if result.tokens_per_step is not None
                          else ("images/s", result.examples_per_step))
        rows.append({
            "run": result.name, "notebook": NOTEBOOKS[run], "parameters": f"{result.parameters:,}",
            "examples / step": result.examples_per_step, "precision": result.precision,
            "s / step": f"{result.seconds_per_step:.4f}", "steps / s": f"{1 / result.seconds_per_step:.2f}",
            "throughput": f"{per_step / result.seconds_per_step:,.0f} {unit}",
            "peak memory (GiB)": "-" if result.peak_memory is None else f"{result.peak_memory / 2**30:.1f}",
            "preset steps": f"{preset:,}" + (f" (GAN from step {preset - gan_steps:,})" if gan_steps else ""),
            "training time": _duration(run_seconds(results, run, dataset, profile)),
        })
    notebooks = []
    for notebook, runs in NOTEBOOK_RUNS.items():
        seconds = sum(n * run_seconds(results, run, dataset, profile) for run, dataset, n in runs)
        listed = ", ".join(f"{n} x {run if dataset is None else f'{run} ({dataset})'}" for run, dataset, n in runs)
        notebooks.append({"notebook": notebook, "training runs": listed, "training time": _duration(seconds)})
    total = sum(n * run_seconds(results, r, d, profile) for runs in NOTEBOOK_RUNS.values() for r, d, n in runs)
    notebooks.append({"notebook": "all", "training runs": "", "training time": _duration(total)})
    header = (f"GPU probe on {where}, torch {torch.__version__}: every training run of the {profile} profile for "
              f"{steps} steps at {batches}, random weights, synthetic images; s / step leaves out the first step. "
              "Training times are preset steps x s / step, without evaluation, sampling, checkpoints and data "
              "preparation (DPO's reference log-probs); 1_4 and 2_4 are not probed.")
    return f"{header}\n\n{markdown_table(rows)}\n\nPer notebook ({profile} profile)\n\n{markdown_table(notebooks)}"


@contextlib.contextmanager
def scratch_environment() -> Iterator[Path]:
    """A temporary folder with the synthetic data dir, and HW3_*_DIR pointing into it until the block ends. Under
    torchrun every rank uses rank 0's folder, which rank 0 fills and removes."""
    saved = dict(os.environ)
    root = Path(dist.gather(tempfile.mkdtemp(prefix="gpu_probe_") if dist.is_main_process() else None)[0])
    for variable, name in (("HW3_DATA_DIR", "data"), ("HW3_CKPT_DIR", "checkpoints"),
                           ("HW3_CACHE_DIR", "cache"), ("HW3_FIG_DIR", "fig")):
        os.environ[variable] = str(root / name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the runs use offline data only: no hub probes
    os.environ.pop(dist.NPROC_ENV, None)  # --nproc sets the processes; a run must not launch its own torchrun
    if dist.is_main_process():
        write_synthetic_images(root / "data")
    dist.barrier()
    try:
        yield root
    finally:
        dist.barrier()
        if dist.is_main_process():
            shutil.rmtree(root, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 30 on CUDA, 2 on a CPU)")
    parser.add_argument("--out", type=Path, default=fig_dir() / "gpu_probe.md", help="markdown file to write")
    parser.add_argument("--profile", default="full", choices=("full", "smoke"),
                        help="presets to probe (smoke: the tiny models, for a quick check of the probe itself)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (GPUs) per run: > 1 restarts the probe under torchrun, each run in DDP")
    args = parser.parse_args(argv)
    if args.steps and args.steps < 2:  # (0: the default)
        parser.error("--steps must be >= 2 (the first step is not timed)")
    if args.nproc > 1 and not dist.is_worker():
        # the workers get the other options (torchrun's own parser would take --nproc for its --nproc-per-node)
        dist.launch("bench.gpu_probe", [*(["--steps", str(args.steps)] if args.steps else []), "--out",
                                        str(args.out.resolve()), "--profile", args.profile], nproc=args.nproc)
        return 0
    with dist.distributed():
        return probe(args)


def probe(args: argparse.Namespace) -> int:
    """The probe's work in this process (one of the ranks under torchrun): every run, then rank 0's table."""
    device = get_device()
    cuda = device.type == "cuda"
    steps = args.steps or (30 if cuda else 2)
    results: dict[tuple[str, str | None], PresetRun] = {}
    with scratch_environment():
        for run, dataset in RUNS:
            if cuda:  # the previous run's tensors are freed, so the peak below is this run's alone
                gc.collect()
                torch.cuda.empty_cache()
            result = run_preset(run, dataset, steps=steps, profile=args.profile, reduced=not cuda, bf16=cuda,
                                log_every_step=True)
            last = result.train_rows[-1]
            if last["step"] != steps or not all(math.isfinite(v) for v in last.values()):
                raise RuntimeError(f"{result.name}: the run did not end at step {steps} with finite metrics: {last}")
            if run == "vae_gan" and "d_loss" not in last:
                raise RuntimeError(f"{result.name}: the discriminator never stepped: {last}")
            results[run, dataset] = result
            if dist.is_main_process():
                print(f"gpu_probe: {result.name}: {result.parameters / 1e6:.1f}M parameters, "
                      f"{result.seconds_per_step:.4f} s/step", flush=True)
    if not dist.is_main_process():
        return 0
    text = report(results, steps, args.profile, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
