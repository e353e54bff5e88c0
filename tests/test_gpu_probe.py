"""The GPU probe (`bench/gpu_probe.py`) on a CPU: tiny presets, 2 steps; and its extrapolation arithmetic."""

import os

import pytest

from bench.full_presets import RUNS, PresetRun
from bench.gpu_probe import NOTEBOOK_RUNS, main, preset_steps, run_seconds


def test_probe_runs_every_training_loop_and_writes_the_table(tmp_path):
    before = dict(os.environ)
    out = tmp_path / "gpu_probe.md"
    assert main(["--profile", "smoke", "--steps", "2", "--out", str(out)]) == 0
    assert dict(os.environ) == before  # the scratch dirs are not left in the environment
    text = out.read_text()
    assert text.startswith("GPU probe on CPU")
    for name in ("sft", "dpo", "vae (mnist)", "vae_gan (cifar10)", "classifier (cifar10)", "ldm (mnist)"):
        assert f"| {name} |" in text
    assert "tokens/s" in text and "images/s" in text
    assert set(NOTEBOOK_RUNS) <= {line.split(" | ")[0].strip("| ") for line in text.splitlines()}


def _result(run, dataset, seconds):
    rows = [{"step": 1, "step_time": 100.0}, {"step": 2, "step_time": seconds}]  # the first step is left out
    return PresetRun(run, dataset, None, 1, rows, 8, None, "bf16", None)


def test_training_time_is_preset_steps_times_step_time():
    results = {(run, dataset): _result(run, dataset, 0.5 if run == "vae_gan" else 0.25) for run, dataset in RUNS}
    steps, _ = preset_steps("sft", None, "full")
    assert run_seconds(results, "sft", None, "full") == pytest.approx(steps * 0.25)
    steps, gan_steps = preset_steps("vae_gan", "cifar10", "full")
    assert gan_steps == steps > 0  # warm-started from 2.1: the whole 2.2 run is the adversarial phase
    assert run_seconds(results, "vae_gan", "cifar10", "full") == pytest.approx(steps * 0.5)
