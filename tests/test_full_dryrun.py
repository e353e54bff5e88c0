"""Every training run of `make figures PROFILE=full` builds at full size and takes 2 optimisation steps on the CPU.

The runs go through the functions the full notebooks call, with the full presets and only the overrides of
`bench.full_presets` (steps, warm-up, CPU-sized batch and sequence length, evaluation sizes); GPT-2 has random
weights and the images are synthetic (see that module). A failure here means a full preset cannot run. Each test
prints its run's parameter count and time (`pytest -rP` shows them).
"""

import dataclasses
import math
import shutil
import time

import pytest

from bench.full_presets import GAN_KL_WEIGHT, REDUCED, RUNS, random_lm, run_preset, write_synthetic_images
from fm.dpo import dpo_config
from fm.sft import sft_config
from gm.eval import classifier_config
from gm.ldm import ldm_config
from gm.vae import gan_config, vae_config

pytestmark = pytest.mark.full_dryrun

GPT2_PARAMETERS = 124_439_808  # GPT-2 small, input and output embeddings tied
# What a run may change besides REDUCED: the schedule, bookkeeping, the offline data, the GAN switch. No model size.
RUN_OVERRIDES = {"steps", "warmup_steps", "progress", "bf16", "data_source", "gan_weight", "gan_loss_start"}
FULL_CONFIGS = {"sft": lambda _: sft_config("full"), "dpo": lambda _: dpo_config("full"),
                "vae": lambda d: vae_config(d, "full"),
                "vae_gan": lambda d: gan_config(GAN_KL_WEIGHT, 0.1, "full", d, gan_mode="adaptive"),
                "classifier": lambda d: classifier_config(d, "full"), "ldm": lambda d: ldm_config(d, "full")}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The synthetic data dir, written once; removed at the end (the GPT-2 checkpoints take GBs)."""
    root = tmp_path_factory.mktemp("full_dryrun")
    write_synthetic_images(root / "data")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _scratch_dirs(scratch, monkeypatch, request):
    """Checkpoints, caches and figures of a test in its own scratch folder, deleted after the test."""
    folder = scratch / request.node.name.replace("/", "_")
    for variable, name in (("HW3_CKPT_DIR", "checkpoints"), ("HW3_CACHE_DIR", "cache"), ("HW3_FIG_DIR", "fig")):
        monkeypatch.setenv(variable, str(folder / name))
    monkeypatch.setenv("HW3_DATA_DIR", str(scratch / "data"))
    yield
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def gpt2():
    """One random GPT-2 (124M) for SFT and then DPO, as notebook 1_3 starts from 1_2's model."""
    cfg = sft_config("full")
    return random_lm(cfg.model, getattr(cfg, "attn_impl", None))


@pytest.mark.parametrize(("run", "dataset"), RUNS, ids=[r if d is None else f"{r}-{d}" for r, d in RUNS])
def test_full_preset_takes_two_steps(run, dataset, gpt2):
    start = time.perf_counter()
    result = run_preset(run, dataset, steps=2, lm=gpt2 if run in ("sft", "dpo") else None)
    print(f"full dry run {result.name}: {result.parameters:,} parameters, {time.perf_counter() - start:.1f} s")

    last = result.train_rows[-1]
    assert last["step"] == 2 and all(math.isfinite(v) for v in last.values()), last
    full = dataclasses.asdict(FULL_CONFIGS[run](dataset))
    changed = set(REDUCED[run]) | RUN_OVERRIDES
    assert {k: v for k, v in dataclasses.asdict(result.config).items() if k not in changed} == {
        k: v for k, v in full.items() if k not in changed}, "the run is not the full preset"
    if run in ("sft", "dpo"):
        assert result.parameters == GPT2_PARAMETERS and result.tokens_per_step > 0
    if run == "vae_gan":
        assert "d_loss" in last, "the discriminator never stepped"
