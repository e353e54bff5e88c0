"""Several processes, one training run: 2 gloo processes on this CPU, started by torchrun (`tests/ddp_runs.py`).

- One step of SFT, DPO, the VAE+GAN and the LDM through their library functions in 2 processes (SFT and DPO: 2
  micro-batches each, grad_accum=4 in all; VAE+GAN and LDM: 2 images each of a batch of 4) gives the one-process
  step's gradients and parameters.
- A DDP run killed between checkpoints and resumed equals the uninterrupted DDP run; the ranks draw different numbers.
- Rank 1 writes no file; only rank 0 does.
- Every full preset takes 2 steps in 2 processes, at full model size and the CPU batch of `bench.full_presets`
  (the configs tests/test_full_dryrun.py checks): the GPU probe with `--nproc 2`.
- HW3_NPROC=2 makes a training function (as a notebook cell calls it) train under torchrun and load the run.
- The launcher's errors: NPROC above the GPUs, a batch that does not split over the ranks, DPO's pairs per rank.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.full_presets import RUNS, write_synthetic_images
from common import dist
from common.paths import repo_root
from tests.ddp_runs import EQUALITY_RUNS, one_step

pytestmark = pytest.mark.distributed

TOL = 1e-6
# A gradient entry below this is float32 rounding noise of a gradient that is zero in exact arithmetic (a conv bias
# right before a GroupNorm): Adam's first step lr * g / (|g| + 1e-8) turns the noise's sign into a step of up to lr,
# whatever the process count. Parameters are compared where the gradient is larger.
NOISE = 1e-6
# gloo between the processes over the loopback interface (not whatever the host name resolves to)
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if Path("/sys/class/net/lo").exists() else {}


def _run(command: list[str], root: Path, data: Path | None = None) -> None:
    """Run `python <command>` from the repository with HW3_*_DIR under `root` (folders made first, so that only the
    runs' own writes remain to record), the images of `data`, one thread per process; fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HW3_PROFILE": "smoke", **LOOPBACK}
    env.pop("HW3_NPROC", None)
    if data is not None:
        env["HW3_DATA_DIR"] = str(data)
    for variable, name in (("HW3_CKPT_DIR", "checkpoints"), ("HW3_CACHE_DIR", "cache"), ("HW3_FIG_DIR", "fig")):
        env[variable] = str(root / "scratch" / name)
        (root / "scratch" / name).mkdir(parents=True)
    done = subprocess.run([sys.executable, *command], cwd=repo_root(), env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_images(tmp_path_factory.mktemp("ddp_data"))


@pytest.fixture(scope="module")
def equality(tmp_path_factory, data):
    """The output folder of `tests.ddp_runs` in 2 processes."""
    root = tmp_path_factory.mktemp("ddp_equality")
    out = root / "out"
    out.mkdir()
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.ddp_runs", str(out)],
         root, data)
    return out


@pytest.mark.parametrize("run", EQUALITY_RUNS)
def test_two_processes_take_the_one_process_step(run, equality, data, tmp_path, monkeypatch):
    monkeypatch.setenv("HW3_DATA_DIR", str(data))
    monkeypatch.setenv("HW3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HW3_NPROC", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1): the same reduction order in conv backward
    try:
        reference = one_step(run)
    finally:
        torch.set_num_threads(threads)
    ddp = torch.load(equality / f"{run}.pt", weights_only=False)
    assert set(ddp) == set(reference)
    for module, ref in reference.items():
        grads, params = ddp[module]["grads"], ddp[module]["params"]
        assert grads.keys() == ref["grads"].keys() and params.keys() == ref["params"].keys()
        grad_diff = max((grads[k] - g).abs().max().item() for k, g in ref["grads"].items())
        param_diff = max(((params[k] - ref["params"][k]).abs() * (g.abs() > NOISE)).max().item()
                         for k, g in ref["grads"].items())
        print(f"{run}/{module}: max |grad difference| {grad_diff:.2e}, max |parameter difference| {param_diff:.2e} "
              f"(max |grad| {max(g.abs().max().item() for g in ref['grads'].values()):.2e})")
        assert grad_diff <= TOL and param_diff <= TOL
        for key in set(ref["params"]) - set(ref["grads"]):  # buffers (LDM's latent statistics), tied weights
            assert (params[key] - ref["params"][key]).abs().max().item() <= TOL, key


def test_resume_under_ddp_is_the_uninterrupted_run(equality):
    result = json.loads((equality / "resume.json").read_text())
    assert result == {"parameters_equal": True, "rows_equal": True, "eval_equal": True, "steps": [1, 2, 3, 4, 5, 6],
                      "ranks_draw_differently": True}


def test_only_rank_0_writes_files(equality):
    assert json.loads((equality / "writes.json").read_text()) == []
    assert (equality / "sft.pt").is_file()  # rank 0 did write (the runs' checkpoints and the results here)


def test_every_full_preset_takes_two_steps_in_two_processes(tmp_path):
    """The probe fails unless every run ends at step 2 with finite metrics (and the VAE+GAN's discriminator
    stepped); its table names the runs, with GPT-2's full parameter count and the language models' tokens/s."""
    out = tmp_path / "probe.md"
    _run(["-m", "bench.gpu_probe", "--nproc", "2", "--steps", "2", "--out", str(out)], tmp_path)
    text = out.read_text()
    assert text.startswith("GPU probe on 2 processes (DDP) of CPU")
    for run, dataset in RUNS:
        assert f"| {run if dataset is None else f'{run} ({dataset})'} |" in text
    assert "| sft | 1_2_sft | 124,439,808 | 2 |" in text  # GPT-2 at full size, grad_accum 2 split over the ranks
    assert "| dpo | 1_3_dpo | 124,439,808 | 2 |" in text  # the policy (the reference is a frozen copy)
    for run in ("sft", "dpo"):
        line = next(x for x in text.splitlines() if x.startswith(f"| {run} |"))
        assert float(line.split(" tokens/s")[0].split("| ")[-1].replace(",", "")) > 0, line


# ---------------------------------------------------------------------------------------------- errors
def test_bad_process_counts_and_batches_raise(monkeypatch):
    monkeypatch.setenv("HW3_NPROC", "0")
    with pytest.raises(ValueError, match="HW3_NPROC must be a positive integer"):
        dist.requested_nproc()
    monkeypatch.setenv("HW3_NPROC", "3")
    assert dist.launch_requested()  # a notebook process (not a torchrun worker) launches
    monkeypatch.setattr(dist, "get_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="NPROC=3 processes need 3 GPUs, but this machine has 2"):
        dist.check_nproc(3)
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"VAEConfig.batch_size \(128\) is not divisible by the 3 processes"):
        dist.shard_size(128, "VAEConfig.batch_size")


def test_make_step_fn_and_dpo_sampling_reject_uneven_shares(monkeypatch, tmp_path):
    from torch import nn

    from common.steps import make_step_fn
    from common.trainer import Trainer
    from fm.dpo import dpo_config
    from fm.dpo_train import preference_pairs

    model = nn.Linear(2, 1)
    trainer = Trainer(tmp_path, {"m": model}, {"m": torch.optim.SGD(model.parameters(), lr=0.1)}, steps=1,
                      progress=False)
    trainer.world = 2  # as in a 2-process group
    with pytest.raises(ValueError, match=r"batch_size x grad_accum = 3 examples is not divisible by the 2 processes"):
        make_step_fn(trainer, model, lambda m, b: None, lambda i: {}, n_examples=8, batch_size=1, grad_accum=3,
                     optimizer="m")
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    cfg = dpo_config("smoke", data_source="sentiment", sample_batch_size=12)
    with pytest.raises(ValueError, match=r"6 prompts \(pairs\) per generation batch, 1.5 per rank with NPROC=4"):
        preference_pairs(cfg, None, None)


def test_launch_passes_the_config_to_the_module_entry_point(monkeypatch):
    from gm.vae import gan_config, vae_config

    calls = []
    monkeypatch.setattr(dist, "launch", lambda module, args: calls.append((module, args)))
    cfg = gan_config(1e-3, 0.1, "full", "cifar10", gan_mode="adaptive")
    dist.launch_run("gm.vae", cfg, vae_config("cifar10", "full"), "full", resume=True, dataset="cifar10")
    module, args = calls[0]
    assert module == "gm.vae" and args[:5] == ["train", "--profile", "full", "--dataset", "cifar10"]
    assert args[-1] == "--resume"
    parsed = dist.train_args(args[:-1], "test", dataset=True)
    assert vae_config(parsed.dataset, parsed.profile, **parsed.overrides) == cfg  # the workers build the same run


def test_hw3_nproc_trains_under_torchrun_and_loads_what_rank_0_saved(data, tmp_path, monkeypatch):
    """What a notebook cell does with NPROC=2: `train_vae` launches `python -m gm.vae train` in 2 processes, then
    loads the finished run (its checkpoint is at the last step, so this process trains nothing)."""
    from common.logging import read_csv
    from gm.vae import train_vae, vae_config

    for variable, value in (("HW3_NPROC", "2"), ("HW3_DATA_DIR", str(data)), ("OMP_NUM_THREADS", "1"),
                            ("HW3_CACHE_DIR", str(tmp_path / "cache")), *LOOPBACK.items()):
        monkeypatch.setenv(variable, value)
    launched = []
    launch = dist.launch
    monkeypatch.setattr(dist, "launch", lambda module, args: launched.append(args) or launch(module, args))
    run = train_vae(vae_config("mnist", "smoke", eval_size=8), resume=False)
    assert launched == [["train", "--profile", "smoke", "--dataset", "mnist", "--set", "eval_size=8"]]
    assert [r["step"] for r in run.train_rows] == [1, 2, 3, 4]
    assert read_csv(run.folder / "train.csv") == run.train_rows
    # the last checkpoint holds both ranks' RNG states: saved by the 2 processes (a step here would save one without)
    assert len(torch.load(run.folder / "checkpoint.pt", weights_only=False)["rank_rng"]) == 2
