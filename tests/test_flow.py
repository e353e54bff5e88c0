"""Rectified flow (gm/flow.py) and the sampling pipeline (gm/sampler.py): the path, target, loss and step against
hand computations, exact integration of constant (Euler, Heun) and linear-in-time (Heun) velocity fields, the exact
field of Gaussian data carrying noise to the data, guidance
through the pipeline, the process registry, and a tiny flow LDM trained 2 steps and sampled."""

import pytest
import torch

from gm.diffusion import GaussianDiffusion
from gm.flow import RectifiedFlow
from gm.ldm import PROCESSES, build_ldm, ldm_config, train_ldm
from gm.ldm_eval import generate
from gm.model import VAE
from gm.sampler import SamplerSpec, sample

NULL = 10  # the null label of the toy models below


def test_path_target_and_step_against_hand_computations():
    flow = RectifiedFlow()
    x0, eps, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([0.25])
    torch.testing.assert_close(flow.interpolate(x0, eps, t), torch.tensor([[1.5, 1.25]]))  # 0.75 x0 + 0.25 eps
    torch.testing.assert_close(flow.target(x0, eps), torch.tensor([[2.0, -3.0]]))  # eps - x0
    # Euler from t = 0.5 to 0.25 with v = 2: x = 1 + (0.25 - 0.5) 2 = 0.5; x0_hat = x - t v = 1 - 0.5 * 2 = 0
    out = flow.step(torch.tensor([[2.0]]), torch.tensor([0.5]), 0.25, torch.tensor([[1.0]]))
    assert out.prev_sample.item() == 0.5 and out.pred_x0.item() == 0.0
    with pytest.raises(ValueError, match="eta must be 0"):
        flow.step(torch.tensor([[2.0]]), torch.tensor([0.5]), 0.25, torch.tensor([[1.0]]), eta=1.0)
    with pytest.raises(ValueError, match="model output shape"):
        flow.step(torch.zeros(1, 2), torch.tensor([0.5]), 0.25, torch.zeros(1, 1))


def test_training_loss_is_the_velocity_mse_with_the_scaled_time():
    flow = RectifiedFlow(time_scale=1000.0)
    x0, noise, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.0, 0.1, 0.5, 0.9]), torch.arange(4)
    seen = {}

    def model(x_t, time, labels):
        seen.update(x_t=x_t, time=time, labels=labels)
        return torch.ones_like(x_t)

    loss = flow.training_loss(model, x0, y, t=t, noise=noise)
    torch.testing.assert_close(seen["x_t"], (1 - t[:, None]) * x0 + t[:, None] * noise)
    torch.testing.assert_close(seen["time"], 1000.0 * t)
    assert torch.equal(seen["labels"], y)
    torch.testing.assert_close(loss, ((1 - (noise - x0)) ** 2).mean())
    drawn = flow.sample_time(100_000, "cpu", torch.Generator().manual_seed(0))  # t ~ U[0, 1) when not given
    assert 0 <= drawn.min() and drawn.max() < 1 and abs(drawn.mean().item() - 0.5) < 0.01


def _field(velocity):
    """A model whose velocity depends on the time in [0, 1] only (it receives time_scale * t)."""
    calls = []

    def model(x, time, y=None):
        calls.append(len(x))
        return velocity(time[:, None] / 1000.0).expand_as(x).to(x.dtype)

    return model, calls


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_constant_velocity_is_integrated_exactly(solver):
    """x(0) = x(1) - c for dx/dt = c, whatever the steps; Heun makes two network calls per step."""
    x1 = torch.randn(5, 2, dtype=torch.float64)
    model, calls = _field(lambda t: torch.tensor([0.7, -1.3], dtype=torch.float64) + 0 * t)
    spec = SamplerSpec(RectifiedFlow(), steps=3, solver=solver)
    x0 = sample(model, spec, (5, 2), noise=x1, progress=False)
    torch.testing.assert_close(x0, x1 - torch.tensor([0.7, -1.3], dtype=torch.float64), rtol=0, atol=1e-12)
    assert len(calls) == spec.network_calls == (3 if solver == "euler" else 6)


def test_heun_is_exact_for_a_velocity_linear_in_time_and_euler_is_not():
    """dx/dt = a + b t from t = 1 to 0: x(0) = x(1) - (a + b / 2); the trapezoid rule of Heun is exact here."""
    x1 = torch.zeros(2, 1, dtype=torch.float64)
    model, _ = _field(lambda t: 1.0 + 4.0 * t)
    heun, euler = (sample(model, SamplerSpec(RectifiedFlow(), 4, solver=s), (2, 1), noise=x1, progress=False)
                   for s in ("heun", "euler"))
    torch.testing.assert_close(heun, x1 - 3.0, rtol=0, atol=1e-12)
    # Euler with 4 steps reads the velocity at the start of each step: -(sum over t in 1, .75, .5, .25 of v) / 4
    torch.testing.assert_close(euler, x1 - (1.0 + 4.0 * 0.625), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("solver", "steps", "tol"), [("euler", 100, 0.02), ("heun", 10, 0.01)])
def test_the_exact_velocity_carries_noise_to_gaussian_data(solver, steps, tol):
    """For x0 ~ N(m, s^2) the exact field E[eps - x0 | x_t] (x_t = (1 - t) x0 + t eps, Var x_t = (1 - t)^2 s^2 + t^2)
    moves N(0, 1) at t = 1 to N(m, s^2) at t = 0; Heun gets there with a tenth of Euler's steps."""
    m, s = 2.0, 0.5

    def velocity(x, time, y=None):
        t = (time / 1000.0)[:, None].double()
        var = (1 - t) ** 2 * s**2 + t**2
        centred = x.double() - (1 - t) * m
        return (t / var * centred - (m + (1 - t) * s**2 / var * centred)).to(x.dtype)

    spec = SamplerSpec(RectifiedFlow(), steps, solver=solver)
    x = sample(velocity, spec, (20_000, 1), generator=torch.Generator().manual_seed(0), progress=False)
    assert x.mean().item() == pytest.approx(m, abs=tol) and x.std().item() == pytest.approx(s, rel=2 * tol)


def test_guidance_combines_the_conditional_and_unconditional_velocities():
    """With velocity = the label, guidance w integrates u + w (c - u) exactly; w = 1 calls the model on B rows."""
    def model(x, time, y):
        calls.append(len(x))
        return y[:, None].to(x.dtype).expand_as(x)

    x1, y = torch.zeros(3, 2, dtype=torch.float64), torch.tensor([1, 2, 3])
    for w, rows in ((1.0, 3), (0.0, 3), (2.5, 6)):
        calls = []
        x0 = sample(model, SamplerSpec(RectifiedFlow(), 2, guidance_scale=w, null_label=NULL), (3, 2), y, noise=x1,
                    progress=False)
        guided = NULL + w * (y - NULL)
        torch.testing.assert_close(x0, x1 - guided[:, None].double().expand_as(x1))
        assert calls == [rows, rows]


def test_sampler_spec_names_and_validation():
    flow, ddpm = RectifiedFlow(), GaussianDiffusion(timesteps=20)
    assert (SamplerSpec(flow, 10).name, SamplerSpec(flow, 5, solver="heun").label) == ("flow_euler_10", "Flow Heun-5")
    assert (SamplerSpec(ddpm, None, eta=1.0).name, SamplerSpec(ddpm, 5).label) == ("ddpm_20", "DDIM-5")
    with pytest.raises(ValueError, match="flow sampling needs steps"):
        SamplerSpec(flow)
    with pytest.raises(ValueError, match="solver 'heun' is not available for GaussianDiffusion"):
        SamplerSpec(ddpm, 5, solver="heun")
    with pytest.raises(ValueError, match="DDIM steps"):
        SamplerSpec(ddpm, 21)
    with pytest.raises(ValueError, match="eta"):
        SamplerSpec(ddpm, 5, eta=-1.0)


def test_the_registry_builds_the_process_of_the_config():
    assert set(PROCESSES) == {"ddpm", "flow"}
    cfg = ldm_config("mnist", "smoke", process="flow")
    model = build_ldm(cfg, 3, torch.zeros(3), torch.ones(3))
    assert isinstance(model.process, RectifiedFlow) and model.process.time_scale.item() == cfg.timesteps
    assert isinstance(build_ldm(ldm_config("mnist", "smoke"), 3, torch.zeros(3), torch.ones(3)).process,
                      GaussianDiffusion)


def test_a_flow_ldm_trains_two_steps_and_samples():
    torch.manual_seed(0)
    vae = VAE(1, z_channels=3, num_channels=8, ch_mult=(1, 2, 2)).eval().requires_grad_(False)
    cfg = ldm_config("mnist", "smoke", process="flow", steps=2, batch_size=8, max_train=16, eval_interval=2,
                     eval_size=8, progress=False)
    run = train_ldm(cfg, vae=vae)
    assert isinstance(run.model.process, RectifiedFlow) and len(run.train_rows) == 2
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in run.eval_rows)
    labels = torch.tensor([0, 1, 2])
    spec = SamplerSpec(run.model.process, 2, guidance_scale=2.0, solver="heun")
    images = generate(run, labels, spec, generator=torch.Generator().manual_seed(0), progress=False)
    assert images.shape == (3, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    again = generate(run, labels, spec, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(images, again)  # the same start noise, a deterministic ODE
