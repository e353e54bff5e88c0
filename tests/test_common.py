import json

import numpy as np
import pytest
import torch
from torch import nn

from common import make_config
from common.data import batch_indices
from common.ema import EMA
from common.logging import read_csv
from common.optim import warmup_cosine
from common.params import count_parameters
from common.plotting import make_grid, markdown_table
from common.steps import make_eval_fn, make_step_fn
from common.trainer import Trainer


def _fit(run_dir, steps, resume=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 1))  # dropout: RNG state matters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=10)
    ema = EMA(model, decay=0.9)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True)
    trainer = Trainer(run_dir, {"model": model}, {"model": opt}, steps=steps, schedulers={"model": sched},
                      ema={"model": ema}, ckpt_interval=5, progress=False)

    def step_fn(step):
        idx = batch_indices(len(x), 8, step, seed=0)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        trainer.optimizer_step("model")
        return {"loss": loss.item()}

    def eval_fn(step):
        return {"val_loss": nn.functional.mse_loss(model(x), y).item()}

    trainer.fit(step_fn, eval_fn, resume=resume)
    return trainer, model, ema


def test_trainer_lowers_loss_and_logs(tmp_path):
    trainer, _, _ = _fit(tmp_path, steps=10)
    rows = read_csv(tmp_path / "train.csv")
    assert len(rows) == 10 and {"loss", "lr", "step_time"} <= set(rows[0])
    evals = read_csv(tmp_path / "eval.csv")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 10
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_resume_equals_uninterrupted(tmp_path):
    _, straight, straight_ema = _fit(tmp_path / "a", steps=10)
    _fit(tmp_path / "b", steps=5)  # stops after the checkpoint at step 5
    trainer, resumed, resumed_ema = _fit(tmp_path / "b", steps=10, resume=True)
    assert trainer.step == 10
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(straight_ema.shadow.parameters(), resumed_ema.shadow.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [r["loss"] for r in read_csv(tmp_path / "a" / "train.csv")] == [
        r["loss"] for r in read_csv(tmp_path / "b" / "train.csv")
    ]


def test_ema_warm_up_forgets_the_initial_weights():
    """d_n = min(decay, (1 + n) / (10 + n)): the first update keeps 10 % of the start, and after 400 updates towards
    fixed weights the start's share is far below the 0.995^400 = 13 % of a plain EMA."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.995)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert ema.shadow.weight.item() == pytest.approx(0.9)
    for _ in range(399):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(401 / 410) and ema.num_updates == 400
    assert 1 - ema.shadow.weight.item() < 0.01 < 0.995**400
    restored = EMA(model, decay=0.995)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 400 and torch.equal(restored.shadow.weight, ema.shadow.weight)
    with pytest.raises(ValueError, match="EMA state"):
        restored.load_state_dict(ema.shadow.state_dict())
    restored.num_updates = 10_000
    assert restored.current_decay() == 0.995  # the warm-up ends at the configured decay


def test_make_config_rejects_unknown_keys():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 1e-3

    presets = {"smoke": {}, "quick": {"lr": 1e-2}, "full": {}}
    assert make_config(Cfg, presets, "quick").lr == 1e-2
    assert make_config(Cfg, presets, "quick", lr=5.0).lr == 5.0
    with pytest.raises(ValueError, match="unknown config key.*'lrr'"):
        make_config(Cfg, presets, "quick", lrr=1)
    with pytest.raises(ValueError, match="unknown profile"):
        make_config(Cfg, presets, "fast")


def test_batch_indices_cover_an_epoch_without_repeats():
    seen = torch.cat([batch_indices(10, 3, s, seed=4) for s in range(3)])
    assert len(set(seen.tolist())) == 9
    assert torch.equal(batch_indices(10, 3, 7, seed=4), batch_indices(10, 3, 7, seed=4))
    with pytest.raises(ValueError):
        batch_indices(2, 3, 0)


def test_grid_and_table():
    grid = make_grid(torch.rand(5, 1, 4, 4), nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype.name == "uint8"
    with pytest.raises(ValueError, match="shape"):
        make_grid(torch.rand(4, 4))
    assert markdown_table([{"a": 1, "b": 0.5}]).splitlines()[2] == "| 1 | 0.5 |"
    # machine keys shown by their display names; a key without one as is
    assert markdown_table([{"kl_se": 1, "b": 2}], names={"kl_se": "KL s.e."}).splitlines()[0] == "| KL s.e. | b |"


@pytest.mark.parametrize("suptitle", [False, True], ids=["axes title", "suptitle"])
def test_a_title_wider_than_the_figure_is_saved_whole(tmp_path, suptitle):
    """save_figure widens the image to hold a long title: the PNG is at least as wide as the title's text, and its
    outermost pixel columns are background (a clipped title would run through them)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from common.plotting import new_figure, save_figure

    fig, ax = new_figure(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    title = "a title much wider than its three-inch figure, as a loss curve's (adaptive mode, quick profile)"
    text = fig.suptitle(title) if suptitle else ax.set_title(title)
    title_px = text.get_window_extent(FigureCanvasAgg(fig).get_renderer()).width * 120 / fig.dpi  # saved at 120 dpi
    assert title_px > 3 * 120  # the case under test: the title alone is wider than the figure
    image = np.asarray(Image.open(save_figure(fig, tmp_path / "long.png")).convert("L"))
    assert image.shape[1] >= title_px
    assert image[:, 0].min() == 255 and image[:, -1].min() == 255


def _count_connections(monkeypatch) -> list[tuple]:
    """Record (address, timeout) of every socket.create_connection of common.hub, then make the real call."""
    import socket

    from common import hub

    calls, connect = [], socket.create_connection

    def counting(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(hub.socket, "create_connection", counting)
    return calls


def test_hub_probe_answers_at_once_when_offline(monkeypatch):
    """Offline by its environment variable: no connection is even tried."""
    from common.hub import hub_reachable

    calls = _count_connections(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    reachable, reason = hub_reachable(timeout=5.0)
    assert not reachable and "HF_DATASETS_OFFLINE" in reason
    assert calls == []


def test_hub_probe_fails_fast_when_the_host_refuses(monkeypatch):
    """One connection attempt, bounded by the probe's timeout, and no retry."""
    from common.hub import OFFLINE_VARIABLES, hub_reachable

    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # local host, nothing listens on 443: refused at once
    calls = _count_connections(monkeypatch)
    reachable, reason = hub_reachable(timeout=2.0)
    assert not reachable and "127.0.0.1" in reason
    assert calls == [(("127.0.0.1", 443), 2.0)]


def test_hub_snapshot_offline_names_the_repo_and_the_hint(monkeypatch, tmp_path):
    from common.hub import hub_snapshot

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(RuntimeError, match=r"cannot load 'nobody/no-such-model'.*HF_HUB_OFFLINE.*Try a local folder\."):
        hub_snapshot("nobody/no-such-model", hint="Try a local folder.")


def test_count_parameters_counts_tied_weights_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.LayerNorm(4))
    model[1].weight = model[0].weight  # tied, as GPT-2's lm_head
    model[2].requires_grad_(False)
    assert count_parameters(model) == 40 + 8
    assert count_parameters(model, trainable_only=True) == 40


def test_step_and_eval_helpers_weight_batches_by_their_items(tmp_path):
    """The helpers average over items, not batches: a step of 2 micro-batches equals one batch of all its items,
    and evaluation does not depend on how the set is cut into batches."""
    weight = nn.Parameter(torch.tensor(2.0))
    model = nn.ParameterList([weight])
    trainer = Trainer(tmp_path, {"policy": model}, {"policy": torch.optim.SGD(model.parameters(), lr=1.0)}, steps=1,
                      grad_clip=None, progress=False)
    data = torch.arange(1.0, 9.0)
    items = lambda batch: int(batch["n"].sum())  # example i holds data[i] items
    batch_fn = lambda indices: {"x": data[indices], "n": data[indices]}

    def loss_fn(module, batch):  # mean over the batch's items of weight * x
        loss = (module[0] * batch["x"] * batch["n"]).sum() / batch["n"].sum()
        return loss, {"loss": loss.detach()}

    step = make_step_fn(trainer, model, loss_fn, batch_fn, n_examples=8, batch_size=2, grad_accum=2, items_fn=items)
    metrics = step(0)
    chosen = batch_indices(8, 4, 0)
    expected = (data[chosen] ** 2).sum() / data[chosen].sum()
    torch.testing.assert_close(metrics["loss"], 2.0 * expected)
    torch.testing.assert_close(weight.detach(), 2.0 - expected)  # SGD lr 1: minus the whole batch's gradient
    batches = [batch_fn([0, 1, 2]), batch_fn([3]), batch_fn([4, 5, 6, 7])]
    evaluated = make_eval_fn(trainer, model, loss_fn, batches, items_fn=items)(0)
    assert evaluated["val_loss"] == pytest.approx(float(weight.detach() * (data**2).sum() / data.sum()))


def test_merge_json_keeps_the_keys_an_update_does_not_name(tmp_path):
    from common.io import merge_json

    path = tmp_path / "summary.json"
    merge_json(path, {"vae": {"mnist": {"1": {"kl_nats": 20.0}}}, "gan": {"mode": "fixed"}})
    merged = merge_json(path, {"vae": {"mnist": {"1e-3": {"kl_nats": 40.0}}}, "ldm": {"n": 1000}})
    assert merged == {"vae": {"mnist": {"1": {"kl_nats": 20.0}, "1e-3": {"kl_nats": 40.0}}},
                      "gan": {"mode": "fixed"}, "ldm": {"n": 1000}}
    assert json.loads(path.read_text()) == merged
    path.write_text("[1, 2]")
    with pytest.raises(TypeError, match="JSON objects"):
        merge_json(path, {"a": 1})


def test_wilson_interval_hand_computed_and_at_the_edges():
    from common.checks import wilson_interval

    lo, hi = wilson_interval(8, 10)  # p = 0.8, z = 1.96: centre 0.7166, half-width 0.2232 (textbook values)
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(6, 5)


def test_data_dir_is_resolved_from_the_package_not_the_working_directory(monkeypatch, tmp_path):
    """HW3_DATA_DIR wins; without it, ../shared/data beside the tree when it exists, else data/ in the tree, from
    whatever folder JupyterLab or a script was started in."""
    from common import paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HW3_DATA_DIR", str(tmp_path / "mine"))
    assert paths.data_dir() == tmp_path / "mine"
    monkeypatch.delenv("HW3_DATA_DIR")
    tree = tmp_path / "course" / "hw3"
    monkeypatch.setattr(paths, "repo_root", lambda: tree)
    assert paths.data_dir() == tree / "data"
    (tmp_path / "course" / "shared" / "data").mkdir(parents=True)
    assert paths.data_dir() == tmp_path / "course" / "shared" / "data"


def test_config_digest_reads_the_bookkeeping_mark():
    """A bookkeeping field leaves the digest alone; any other field changes it; an added field counts only away
    from its default."""
    from dataclasses import dataclass, replace

    from common.config import added_field, bookkeeping, config_digest, digest_fields

    @dataclass
    class Cfg:
        lr: float = 1e-3
        device: str | None = bookkeeping(None)
        mode: str = added_field("a")

    base = Cfg()
    assert digest_fields(base) == {"lr": 1e-3}
    assert config_digest(replace(base, device="cuda")) == config_digest(base)
    assert config_digest(replace(base, lr=2e-3)) != config_digest(base)
    assert digest_fields(replace(base, mode="b")) == {"lr": 1e-3, "mode": "b"}
    assert len(config_digest(base)) == 8 and len(config_digest(base, length=12)) == 12


def test_make_config_merges_profile_then_data_set_then_overrides():
    from dataclasses import dataclass

    from common.config import make_config

    @dataclass
    class Cfg:
        dataset: str = "mnist"
        steps: int = 1
        lr: float = 1.0

    presets = {"quick": dict(lr=0.5, by_dataset={"cifar10": dict(steps=7)}), "smoke": dict(by_dataset={"x": {"s": 1}})}
    assert make_config(Cfg, presets, "quick") == Cfg("mnist", 1, 0.5)  # the field's default data set: no entry
    assert make_config(Cfg, presets, "quick", dataset="cifar10") == Cfg("cifar10", 7, 0.5)
    assert make_config(Cfg, presets, "quick", dataset="cifar10", steps=3).steps == 3
    with pytest.raises(ValueError, match="unknown config key"):
        make_config(Cfg, presets, "smoke", dataset="x")


def test_recent_results_computes_each_key_once_and_drops_the_least_recently_used():
    from common.memo import RecentResults

    calls = []
    memo = RecentResults(kept=2)

    def square(x):
        return lambda: calls.append(x) or x * x

    assert [memo.get(k, square(k)) for k in (2, 3, 2)] == [4, 9, 4] and calls == [2, 3]
    memo.get(4, square(4))  # 3 was used least recently: dropped
    assert 2 in memo and 4 in memo and 3 not in memo and len(memo) == 2
    assert memo.get(3, square(3)) == 9 and calls == [2, 3, 4, 3]
    with pytest.raises(ValueError, match="kept"):
        RecentResults(kept=0)
