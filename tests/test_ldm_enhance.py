"""Task 2.4 experiments on a tiny latent diffusion model: config validation, the step and guidance sweeps (guidance
scale 1 is the conditional model), EMA vs raw weights, retrained variants with the same budget, cosine schedule
endpoints, and the figures."""

import dataclasses

import pytest
import torch

from gm.diffusion import GaussianDiffusion
from gm.enhance import (
    LDMEnhanceConfig,
    eps_bias,
    eta_table,
    gap_experiments,
    guidance_sweep,
    headline,
    ldm_enhance_config,
    machine_key,
    reference_rows,
    step_sweep,
    weights_comparison,
)
from gm.enhance_plots import log_snr, plot_flow_comparison, plot_guidance_sweep, plot_schedules, plot_step_sweep
from gm.enhance_retrain import (
    compare_rates,
    flow_comparison,
    flow_verdict,
    train_flow,
    train_variant,
    variant_comparison,
)
from gm.eval import Classifier
from gm.ldm import ldm_config, train_ldm
from gm.model import VAE

T = 20  # diffusion steps of the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(run, classifier): a 4-step smoke LDM on a tiny VAE with a perturbed EMA output layer (so the EMA and raw
    weights differ and the conditional and unconditional predictions differ), and an untrained classifier."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HW3_CKPT_DIR", str(tmp_path_factory.mktemp("checkpoints")))
        torch.manual_seed(0)
        vae = VAE(1, z_channels=3, num_channels=8, ch_mult=(1, 2, 2)).eval().requires_grad_(False)
        run = train_ldm(ldm_config("mnist", "smoke", timesteps=T, progress=False), vae=vae)
    torch.manual_seed(1)
    torch.nn.init.normal_(run.ema_model.unet.output[-1].weight, std=0.1)
    return run, Classifier(1, width=4).eval()


def smoke_config(**overrides) -> LDMEnhanceConfig:
    return ldm_enhance_config("smoke", progress=False, **overrides)


def test_config_presets_and_validation():
    for profile in ("smoke", "quick", "full"):
        cfg = ldm_enhance_config(profile)
        assert cfg.profile == profile and 1.0 in cfg.guidance_scales and 0.0 in cfg.guidance_scales
    assert 1000 in ldm_enhance_config("full").ddim_steps and ldm_enhance_config("quick").ddpm
    with pytest.raises(ValueError, match="unknown config key"):
        ldm_enhance_config("smoke", guidance=2.0)
    with pytest.raises(ValueError, match="unknown variant"):
        smoke_config(variants=("sigmoid schedule",))
    with pytest.raises(ValueError, match="guidance scales"):
        smoke_config(guidance_scales=(-1.0, 1.0))
    with pytest.raises(ValueError, match="step counts"):
        smoke_config(ddim_steps=(0, 10))
    with pytest.raises(ValueError, match="ddim_etas"):
        smoke_config(ddim_etas=(-0.5,))
    with pytest.raises(ValueError, match="compare_eta"):
        smoke_config(compare_eta=-1.0)
    with pytest.raises(ValueError, match="flow_calls must be even"):
        smoke_config(flow_calls=(3,))
    assert ldm_enhance_config("quick").flow_calls == (10, 20) and ldm_enhance_config("full").flow_calls == (10, 20, 50)
    assert 10 * ldm_enhance_config("quick").flow_samples_per_class == 500  # 500 images per point


def split(rows):
    """(reference rows, sample rows): only the sample rows are timed."""
    return [r for r in rows if "seconds" not in r], [r for r in rows if "seconds" in r]


def test_step_sweep_rows_and_figure(tiny, tmp_path):
    run, classifier = tiny
    cfg = smoke_config(ddim_steps=(2, 5, T), ddim_etas=(0.0,), ddpm=True)
    references, samples = split(step_sweep(run, classifier, cfg))
    assert [r["images_from"] for r in samples] == [f"DDPM-{T}", "DDIM-2", "DDIM-5", f"DDIM-{T}"]
    assert [r["steps"] for r in samples] == [T, 2, 5, T]
    assert samples[0]["speed_up"] == 1.0  # relative to DDPM
    assert {r["guidance"] for r in samples} == {run.config.guidance_scale}  # default: the 2.3 setting
    assert len(references) >= 1 and references[0]["images_from"].startswith("real test images")
    for row in references + samples:
        assert row["n"] == 10 * cfg.samples_per_class and 0 <= row["cond_accuracy"] <= 1 and row["feature_fd"] >= 0
    # Deterministic DDIM from the same start noise: more steps change the images, the same steps repeat them.
    assert samples[1]["feature_fd"] != samples[3]["feature_fd"]
    again = split(step_sweep(run, classifier, smoke_config(ddim_steps=(2,), ddpm=False)))[1]
    assert again[0]["feature_fd"] == samples[1]["feature_fd"]
    assert plot_step_sweep(references + samples, tmp_path / "steps.png", "smoke").stat().st_size > 0
    # Stochastic DDIM (eta = 1) over all T steps is the ancestral DDPM sampler (same noise draws, same variances).
    _, (ddpm, *stochastic) = split(step_sweep(run, classifier, smoke_config(ddim_steps=(5, T), ddim_etas=(1.0,),
                                                                          ddpm=True)))
    assert [(r["steps"], r["eta"]) for r in stochastic] == [(5, 1.0), (T, 1.0)]
    all_steps, few_steps = (abs(r["feature_fd"] - ddpm["feature_fd"]) for r in (stochastic[1], stochastic[0]))
    assert all_steps < 1e-5 * ddpm["feature_fd"] and few_steps > 100 * all_steps
    with pytest.raises(ValueError, match="DDIM steps"):
        step_sweep(run, classifier, smoke_config(ddim_steps=(T + 1,)))


def test_x0_limit_rows_eta_table_and_gap_experiments(tiny, tmp_path):
    run, classifier = tiny
    cfg = smoke_config(ddim_steps=(2, 5), ddim_etas=(0.0, 1.0), x0_clip=0.5, x0_threshold=0.9, longer_training=2.0)
    references, samples = split(step_sweep(run, classifier, cfg))
    limited = [r for r in samples if r["x0_limit"] != "-"]
    assert [(r["steps"], r["eta"], r["x0_limit"]) for r in limited] == [(2, 0.0, "thr. 0.9, 0.5"),
                                                                         (5, 0.0, "thr. 0.9, 0.5")]
    assert all(r["latent_max"] <= 0.5 + 1e-4 for r in limited)  # the last step returns the limited x0
    table = eta_table(references + samples)
    assert [(r["eta"], r["x0 limit"]) for r in table] == [(0.0, "-"), (1.0, "-"), (0.0, "thr. 0.9, 0.5")]
    assert table[1]["5 steps"].startswith(f"{samples[3]['cond_accuracy']:.3f} [")
    assert plot_step_sweep(references + samples, tmp_path / "steps.png", "smoke").stat().st_size > 0
    rows = gap_experiments(run, classifier, cfg)
    gap = split(rows)[1]
    assert [r["experiment"] for r in gap] == ["guidance"] * 2 + ["discretisation"] * 2 + ["x0 limit"] * 2 + [
        "training length x2"] * 3
    assert [r["guidance"] for r in gap[:2]] == [1.0, 1.0] and gap[2]["images_from"] == f"DDPM-{T}"
    assert gap[3]["images_from"] == f"DDIM-{T}" and gap[3]["eta"] == 0.0
    assert gap[-1]["train_steps"] == 2 * run.config.steps
    assert list(headline(rows, ("experiment", "images_from", "eta")))[2] == f"discretisation_ddpm_{T}"
    bias = eps_bias(run, num=32)
    assert [r["t"] for r in bias][0] == T - 1 and all(r["eps_mse"] > 0 for r in bias)
    with pytest.raises(ValueError, match="x0_threshold"):
        smoke_config(x0_threshold=0.9)


def test_guidance_scale_one_is_the_conditional_model(tiny, tmp_path):
    run, classifier = tiny
    cfg = smoke_config(guidance_scales=(0.0, 1.0, 3.0), compare_steps=5)
    rows = guidance_sweep(run, classifier, cfg, fig_prefix=tmp_path / "cfg")
    samples = split(rows)[1]
    assert [r["guidance"] for r in samples] == [0.0, 1.0, 3.0]
    # w = 1 through the guided sampler gives exactly the images of the plain conditional model.
    plain = smoke_config(ddim_steps=(5,), ddim_etas=(cfg.compare_eta,), ddpm=False, guidance_scale=1.0)
    conditional = split(step_sweep(run, classifier, plain))[1]
    w1 = samples[1]
    assert (w1["cond_accuracy"], w1["feature_fd"]) == (conditional[0]["cond_accuracy"], conditional[0]["feature_fd"])
    assert len({r["feature_fd"] for r in samples}) == 3  # w = 0 and w = 3 sample other images
    assert all((tmp_path / f"cfg_w{w:g}.png").is_file() for w in (0, 1, 3))
    numbers = headline(rows, ("guidance",))
    assert list(numbers) == ["0", "1", "3"] and numbers["1"]["fd"] == w1["feature_fd"]
    assert numbers["3"]["n"] == 10 * cfg.samples_per_class and len(numbers["3"]["cond_acc_ci"]) == 2
    assert plot_guidance_sweep(rows, tmp_path / "cfg.png", "smoke").stat().st_size > 0


def test_weights_comparison_samples_the_chosen_weights(tiny):
    run, classifier = tiny
    cfg = smoke_config()
    references, (ema, raw) = split(weights_comparison(run, classifier, cfg))
    assert {r["weights"] for r in references} == {"-"} and (ema["weights"], raw["weights"]) == ("EMA", "raw")
    assert ema["feature_fd"] != raw["feature_fd"]  # the EMA output layer was perturbed
    assert raw["val_loss"] == run.eval_rows[-1]["val_loss"]
    _, same = split(weights_comparison(dataclasses.replace(run, ema_model=run.model), classifier, cfg))
    assert same[0]["feature_fd"] == same[1]["feature_fd"] == raw["feature_fd"]


def test_shared_references_give_the_same_rows(tiny):
    run, classifier = tiny
    cfg = smoke_config(samples_per_class=3)
    refs = reference_rows(run, classifier, cfg)
    assert len(refs.features) == run.config.reference_size and [r["n"] for r in refs.rows] == [30, 30]
    shared, fresh = weights_comparison(run, classifier, cfg, refs=refs), weights_comparison(run, classifier, cfg)
    fd = [(r["feature_fd"], r["kid"], r["kid_ci"]) for r in shared]
    assert fd == [(r["feature_fd"], r["kid"], r["kid_ci"]) for r in fresh]


def test_variants_change_one_setting_and_keep_the_budget(tiny, tmp_path):
    run, classifier = tiny
    cosine = train_variant(run, "cosine schedule", progress=False)
    changed = {k for k, v in dataclasses.asdict(cosine.config).items() if getattr(run.config, k) != v}
    assert changed == {"schedule"}
    assert cosine.model.process.schedule == "cosine" and cosine.folder != run.folder
    assert len(cosine.train_rows) == run.config.steps
    rows = variant_comparison(run, classifier, smoke_config(variants=("cosine schedule", "v-prediction")),
                              fig_prefix=tmp_path / "variant")
    samples = split(rows)[1]
    assert [(r["model"], r["schedule"], r["prediction"]) for r in samples] == [
        ("2.3 model", "linear", "eps"), ("cosine schedule", "cosine", "eps"), ("v-prediction", "linear", "v")]
    assert {r["train_steps"] for r in samples} == {run.config.steps}
    assert (tmp_path / "variant_cosine_schedule_eta0.png").is_file()
    with pytest.raises(ValueError, match="unknown variant"):
        train_variant(run, "sigmoid schedule")


def test_cosine_schedule_endpoints(tmp_path):
    cosine, linear = GaussianDiffusion(1000, schedule="cosine"), GaussianDiffusion(1000, schedule="linear")
    abar = cosine.alphas_cumprod
    assert abar[0].item() > 0.999 and abar[-1].item() < 1e-4  # x_0 is (almost) data, x_T (almost) pure noise
    assert bool((abar[1:] < abar[:-1]).all())  # strictly decreasing
    snr_cos, snr_lin = log_snr(cosine), log_snr(linear)
    assert bool((snr_cos[1:] < snr_cos[:-1]).all())
    assert snr_cos[500] > snr_lin[500] + 2  # the cosine schedule keeps more signal in the middle of the chain
    assert plot_schedules(tmp_path / "schedules.png", "smoke").stat().st_size > 0


def test_flow_comparison_at_equal_network_calls(tiny, tmp_path):
    run, classifier = tiny
    flow = train_flow(run, progress=False)
    changed = {k for k, v in dataclasses.asdict(flow.config).items() if getattr(run.config, k) != v}
    assert changed == {"process"} and len(flow.train_rows) == run.config.steps  # the same budget
    cfg = smoke_config(flow_calls=(2, 4), compare_etas=(0.0, 1.0))
    rows = flow_comparison(run, classifier, cfg, flow=flow)
    references, samples = split(rows)
    assert [(r["model"], r["images_from"], r.get("eta"), r["network_calls"]) for r in samples] == [
        ("2.3 DDPM", "DDIM-2", 0.0, 2), ("2.3 DDPM", "DDIM-2", 1.0, 2), ("flow", "Flow Euler-2", None, 2),
        ("flow", "Flow Heun-1", None, 2), ("2.3 DDPM", "DDIM-4", 0.0, 4), ("2.3 DDPM", "DDIM-4", 1.0, 4),
        ("flow", "Flow Euler-4", None, 4), ("flow", "Flow Heun-2", None, 4)]
    assert {r["n"] for r in references + samples} == {10 * cfg.flow_samples_per_class}
    assert {r["guidance"] for r in samples} == {run.config.guidance_scale}
    assert len({r["feature_fd"] for r in samples}) == len(samples)  # every sampler draws other images
    assert list(headline(rows, ("images_from", "eta")))[:3] == ["ddim_2_eta0", "ddim_2_eta1", "flow_euler_2"]
    assert plot_flow_comparison(rows, tmp_path / "flow.png", "smoke").stat().st_size > 0
    verdict = flow_verdict(rows)
    assert list(verdict) == ["2", "4"] and verdict["2"]["flow"].startswith("Flow")
    assert verdict["2"]["ddim"].startswith("DDIM-2 eta") and verdict["4"]["flow_is"] in (
        "higher than", "lower than", "not different from")


def test_compare_rates_tells_rows_apart_by_their_intervals():
    row = lambda lo, hi: {"cond_accuracy_ci": (lo, hi)}  # noqa: E731
    assert compare_rates(row(0.9, 0.95), row(0.7, 0.8)) == "higher than"
    assert compare_rates(row(0.7, 0.8), row(0.9, 0.95)) == "lower than"
    assert compare_rates(row(0.7, 0.9), row(0.85, 0.95)) == "not different from"


def test_machine_key_turns_row_labels_into_json_keys():
    assert machine_key("DDIM-50 x0 thr. 0.995") == "ddim_50_x0_thr_0.995"
    assert machine_key("training length x2") == "training_length_x2" and machine_key("EMA") == "ema"
    assert machine_key("2.3 model") == "2.3_model" and machine_key("Flow Euler-10") == "flow_euler_10"
    assert machine_key(0.0, "eta") == "eta0" and machine_key(0.2, "eta") == "eta0.2" and machine_key(4.0) == "4"
