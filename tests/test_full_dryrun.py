"""Every training run of `make figures PROFILE=full` is run by `make test` as its full preset at full size.

`bench.full_presets` trains the configs of `preset_config`: the full notebooks' presets with only the schedule,
bookkeeping, the offline data, the GAN switch and (on a CPU) the batch and sequence length of `REDUCED` changed, never
a model's size; that is checked here for every run. tests/test_distributed.py trains each of them for 2 steps in 2
DDP processes (the GPU probe with `--nproc 2`): GPT-2 at 124M parameters, finite metrics at step 2, the
discriminator stepping. Each process there builds and steps the full-size model, so a one-process run of the same
configs would add no check (the one-process code path is the notebooks' smoke runs), only ~35 s.
"""

import dataclasses

import pytest

from bench.full_presets import GAN_KL_WEIGHT, REDUCED, RUNS, preset_config
from fm.dpo import dpo_config
from fm.sft import sft_config
from gm.eval import classifier_config
from gm.ldm import ldm_config
from gm.vae import gan_config, vae_config

# What a run may change besides REDUCED: the schedule, bookkeeping, the offline data, the GAN switch. No model size.
RUN_OVERRIDES = {"steps", "warmup_steps", "progress", "bf16", "data_source", "gan_weight", "gan_loss_start",
                 "log_interval"}
FULL_CONFIGS = {"sft": lambda _: sft_config("full"), "dpo": lambda _: dpo_config("full"),
                "vae": lambda d: vae_config(d, "full"),
                "vae_gan": lambda d: gan_config(GAN_KL_WEIGHT, 0.1, "full", d, gan_mode="adaptive"),
                "classifier": lambda d: classifier_config(d, "full"), "ldm": lambda d: ldm_config(d, "full")}


@pytest.mark.parametrize(("run", "dataset"), RUNS, ids=[r if d is None else f"{r}-{d}" for r, d in RUNS])
@pytest.mark.parametrize("reduced", [True, False], ids=["cpu", "gpu"])
def test_a_preset_run_is_the_full_preset(run, dataset, reduced):
    cfg = preset_config(run, dataset, steps=2, reduced=reduced, log_every_step=True)
    full = dataclasses.asdict(FULL_CONFIGS[run](dataset))
    changed = set(REDUCED[run]) | RUN_OVERRIDES | ({"train_examples", "train_pairs", "eval_examples", "val_pairs",
                                                    "eval_size"} if not reduced else set())
    assert cfg.steps == 2 and {k: v for k, v in dataclasses.asdict(cfg).items() if k not in changed} == {
        k: v for k, v in full.items() if k not in changed}, "the run is not the full preset"
    if reduced:
        assert {k: getattr(cfg, k) for k in REDUCED[run]} == REDUCED[run]


def test_an_unknown_run_or_no_step_is_refused():
    with pytest.raises(ValueError, match="unknown run"):
        preset_config("vae", "svhn", steps=2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        preset_config("sft", steps=0)
