"""The training runs of `make figures PROFILE=full`, built at full size and run for a few steps.

Run by the GPU probe (`bench/gpu_probe.py`: the full batch, bf16, timed; on a CPU the batch and sequence length
reduced, which tests/test_distributed.py runs for 2 steps in 2 processes); `preset_config` gives a run's config
(tests/test_full_dryrun.py checks it is the full preset). Each run goes through the function its notebook
calls (`train_sft`, `train_dpo`, `train_vae`, `load_or_train_classifier`, `train_ldm`) with the profile's preset
and these overrides only: the step count, a warm-up shorter than it, small evaluation sets, no progress bars, the
offline dialogue data, and, when `reduced`, a CPU-sized batch and sequence length.

Weights are random where the pretrained ones may be unreachable: GPT-2 is built from its config (`fm.model.GPT`),
and the LDM encodes with a randomly initialised VAE of the full preset instead of training one. The images come
from `write_synthetic_images`, a data dir in the official formats (MNIST IDX files, CIFAR-10 python batches) of
random pixels, so no data set is decoded and runs do not depend on what data a machine has.

The caller points HW3_DATA_DIR at that data dir and HW3_CKPT_DIR / HW3_CACHE_DIR / HW3_FIG_DIR at scratch folders.
"""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common import checkpoint_dir, dist
from common.io import atomic_save
from fm.dpo import dpo_config
from fm.dpo_train import train_dpo
from fm.model import GPT, GPTConfig
from fm.model import PRESETS as GPT_PRESETS
from fm.pretrained import load_lm
from fm.sft import sft_config, train_sft
from fm.tokenizer import get_gpt2_tokenizer
from gm.eval import classifier_config, load_or_train_classifier
from gm.ldm import ldm_config, train_ldm
from gm.vae import LDM_KL_WEIGHT, VAEConfig, base_config, build_vae, gan_config, train_vae, vae_config

# (run, data set) in the order of the notebooks; the data set is None for the language-model runs.
RUNS: tuple[tuple[str, str | None], ...] = (
    ("sft", None), ("dpo", None), ("vae", "mnist"), ("vae", "cifar10"), ("vae_gan", "cifar10"),
    ("classifier", "mnist"), ("classifier", "cifar10"), ("ldm", "mnist"), ("ldm", "cifar10"),
)
GAN_KL_WEIGHT = 1e-3  # the kl_weight of 2_2's warm-started GAN sweep
NOTEBOOKS = {"sft": "1_2_sft", "dpo": "1_3_dpo", "vae": "2_1_vae", "vae_gan": "2_2_gan", "classifier": "2_3_ldm",
             "ldm": "2_3_ldm"}
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 1024, 512  # images per split of the synthetic data dir (>= any probed batch)

# Overrides for a CPU: a micro-batch of one or a few examples, 64-token sequences, tiny evaluation sets; they also run
# in 2 processes (tests/test_distributed.py): grad_accum, the image batches and the validation batches split in two.
REDUCED: dict[str, dict[str, Any]] = {
    "sft": dict(batch_size=1, grad_accum=2, block_size=64, train_examples=4, eval_examples=2),
    "dpo": dict(batch_size=1, grad_accum=2, block_size=64, eval_batch_size=1, train_pairs=4, val_pairs=2),
    "vae": dict(batch_size=4, eval_size=4),
    "vae_gan": dict(batch_size=4, eval_size=4),
    "classifier": dict(batch_size=8, eval_size=8),
    "ldm": dict(batch_size=4, eval_size=4, max_train=8),
}
EVAL_SIZES = {"sft": dict(eval_examples=16), "dpo": dict(val_pairs=16), "vae": dict(eval_size=256),
              "vae_gan": dict(eval_size=256), "classifier": dict(eval_size=256), "ldm": dict(eval_size=256)}


@dataclass
class PresetRun:
    """What one short run of a preset measured. `train_rows` are the Trainer's logged rows."""

    run: str  # "sft" | "dpo" | "vae" | "vae_gan" | "classifier" | "ldm"
    dataset: str | None
    config: Any  # the config the run used (preset + overrides)
    parameters: int  # parameters of the trained modules
    train_rows: list[dict]
    examples_per_step: int  # images, sequences (SFT) or pairs (DPO) per optimizer step
    tokens_per_step: float | None  # non-padding tokens through forward + backward per step (language models)
    precision: str  # "bf16" or "fp32"
    peak_memory: int | None  # bytes, torch.cuda.max_memory_allocated over the run (CUDA only)

    @property
    def name(self) -> str:
        return self.run if self.dataset is None else f"{self.run} ({self.dataset})"

    @property
    def seconds_per_step(self) -> float:
        """Mean `step_time` of the logged rows, the first one (warm-up: allocation, kernel selection) left out."""
        rows = self.train_rows[1:] or self.train_rows
        return sum(r["step_time"] for r in rows) / len(rows)


def write_synthetic_images(root: str | Path, seed: int = 0) -> Path:
    """Write random MNIST (IDX) and CIFAR-10 (python batches) splits of the official formats under `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    mnist, cifar = root / "mnist", root / "cifar-10-batches-py"
    mnist.mkdir(parents=True, exist_ok=True)
    cifar.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", SYNTHETIC_TRAIN), ("t10k", SYNTHETIC_TEST)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            with gzip.open(mnist / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.tobytes())
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    sizes = [SYNTHETIC_TRAIN // 5] * 5 + [SYNTHETIC_TEST]
    for name, n in zip(names, sizes, strict=True):
        batch = {b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": [i % 10 for i in range(n)]}
        with open(cifar / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def random_lm(name: str, attn_impl: str | None = None, seed: int = 0) -> tuple[nn.Module, object]:
    """(model, tokenizer) for the `model` field of an SFT config: a GPT preset name (e.g. "gpt2") gives our GPT with
    random weights and the GPT-2 tokenizer; anything else is loaded with `fm.pretrained.load_lm`."""
    if name not in GPT_PRESETS:
        return load_lm(name)
    torch.manual_seed(seed)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    extra = {"attn_impl": attn_impl} if attn_impl is not None and "attn_impl" in fields else {}
    return GPT(GPTConfig.from_preset(name, **extra)), get_gpt2_tokenizer()


def random_base_checkpoint(cfg: VAEConfig) -> None:
    """Save a random-weight VAE as the 2.1 checkpoint that the warm-started GAN run `cfg` loads, unless one exists:
    a preset run trains no 2.1 VAE (it runs in scratch checkpoint folders, never the real ones)."""
    base = base_config(cfg)
    path = checkpoint_dir() / "vae" / base.run_name() / "model.pt"
    with dist.main_process_first():  # under torchrun: rank 0 writes it (every rank builds the same weights)
        if not path.is_file():
            atomic_save({"config": dataclasses.asdict(base), "state_dict": build_vae(base).state_dict()}, path)


def _known(make: Callable[..., Any], *args: Any, profile: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The `overrides` that the config `make(*args, profile)` has fields for: optional fields (`bf16`, `progress`,
    `log_interval`, ...) are set where a config has them, so the runs keep working while configs change."""
    fields = {f.name for f in dataclasses.fields(make(*args, profile))}
    return {k: v for k, v in overrides.items() if k in fields}


def _parameters(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def _count_tokens(model: nn.Module) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Record the attention-mask sums of `model`'s training-mode forward passes (kept on the device: no host sync).
    Copies of `model` (DPO's policy is a deepcopy of the reference) record into the same list."""
    counts: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and kwargs.get("attention_mask") is not None:
            counts.append(kwargs["attention_mask"].sum())

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return counts, handle.remove


def preset_config(run: str, dataset: str | None = None, *, steps: int, profile: str = "full", reduced: bool = True,
                  bf16: bool = False, log_every_step: bool = False) -> Any:
    """The config that `run_preset` trains: the `profile` preset of `run` with this module's overrides only (see
    `run_preset` for the arguments)."""
    if (run, dataset) not in RUNS:
        raise ValueError(f"unknown run {(run, dataset)}; choose one of {RUNS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    overrides: dict[str, Any] = dict(steps=steps, warmup_steps=min(1, steps - 1), progress=False, bf16=bf16,
                                     **(REDUCED[run] if reduced else EVAL_SIZES[run]))
    if log_every_step:
        overrides["log_interval"] = 1
    if run in ("sft", "dpo"):
        overrides["data_source"] = "chitchat"  # offline and deterministic; HH-RLHF needs the hub
        make = sft_config if run == "sft" else dpo_config
        cfg = make(profile, **_known(make, profile=profile, overrides=overrides))
        if reduced:
            return cfg
        examples = steps * cfg.batch_size * cfg.grad_accum  # enough dialogues (pairs) for the steps
        return dataclasses.replace(cfg, **{"train_examples" if run == "sft" else "train_pairs": examples})
    if run == "vae_gan":  # 2_2's run: the adversarial phase, warm-started from a 2.1 checkpoint
        return gan_config(GAN_KL_WEIGHT, 0.1, profile, dataset, gan_mode="adaptive",
                          **_known(vae_config, dataset, profile=profile, overrides=overrides))
    make = {"vae": vae_config, "classifier": classifier_config, "ldm": ldm_config}[run]
    return make(dataset, profile, **_known(make, dataset, profile=profile, overrides=overrides))


def run_preset(run: str, dataset: str | None = None, *, steps: int, profile: str = "full", reduced: bool = True,
               bf16: bool = False, log_every_step: bool = False) -> PresetRun:
    """Train the `profile` preset of `run` on `dataset` for `steps` steps (see the module docstring).

    `reduced`: the CPU-sized batch of REDUCED instead of the preset's. `bf16`: autocast where the config has a `bf16`
    field. `log_every_step`: log_interval 1 (where configs have one), so that every step is timed. SFT and DPO start
    from `random_lm` of the SFT preset's model.
    """
    cfg = preset_config(run, dataset, steps=steps, profile=profile, reduced=reduced, bf16=bf16,
                        log_every_step=log_every_step)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    counts: list[torch.Tensor] = []
    # images, sequences (SFT) or pairs (DPO) per optimizer step
    per_step = cfg.batch_size * cfg.grad_accum if run in ("sft", "dpo") else cfg.batch_size
    if run in ("sft", "dpo"):
        lm_cfg = cfg if run == "sft" else sft_config(cfg.sft_profile)
        model, tokenizer = random_lm(lm_cfg.model, getattr(lm_cfg, "attn_impl", None), cfg.seed)
        counts, remove = _count_tokens(model)
        if run == "sft":
            result = train_sft(cfg, model=model, tokenizer=tokenizer)
            trained, rows = (result.model,), result.train_rows
        else:
            result = train_dpo(cfg, model=model, tokenizer=tokenizer)
            trained, rows = (result.model,), result.train_rows
        remove()
    elif run in ("vae", "vae_gan"):
        if run == "vae_gan":
            random_base_checkpoint(cfg)
        result = train_vae(cfg)
        trained, rows = (result.model, result.disc), result.train_rows
    elif run == "classifier":
        preset = classifier_config(dataset, profile)  # it takes overrides of its preset, not a config
        overrides = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                     if getattr(cfg, f.name) != getattr(preset, f.name)}
        result = load_or_train_classifier(dataset, profile, **overrides)
        trained, rows = (result.model,), result.train_rows
    else:
        vae_cfg = vae_config(dataset, profile, kl_weight=LDM_KL_WEIGHT)
        torch.manual_seed(cfg.seed)
        vae = build_vae(vae_cfg).eval().requires_grad_(False)  # random weights: what matters here is the shapes
        result = train_ldm(cfg, vae=vae)
        trained, rows = (result.model,), result.train_rows
    # tokens of every rank (each counted its own shard's); the examples per step are the global batch's already
    tokens = float(dist.sum_over_ranks({"tokens": torch.stack(counts).sum()})["tokens"]) / steps if counts else None
    precision = "bf16" if getattr(cfg, "bf16", False) else "fp32"
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return PresetRun(run, dataset, cfg, _parameters(*trained), rows, per_step, tokens, precision, peak)
