"""The training loop's cost stays flat over long runs: CSV appends, log intervals, tensor metrics, exact resume."""

import pytest
import torch
from torch import nn

import common.trainer
from common.logging import MetricLogger, read_csv
from common.trainer import Trainer


def test_metric_logger_cost_is_linear_in_rows(tmp_path, monkeypatch):
    """Counted as work: each row is written once (appended); the whole file is rewritten only for the first row and
    when a new column appears, so n rows cost O(n) rows written, never O(n^2)."""
    rewrites, rewrite = [], MetricLogger._rewrite
    monkeypatch.setattr(MetricLogger, "_rewrite", lambda self: rewrites.append(len(self.rows)) or rewrite(self))
    logger = MetricLogger(tmp_path / "m.csv")
    for step in range(1, 10_001):
        logger.log(step, loss=1.0 / step, lr=1e-3, grad_norm=0.5, step_time=0.01)
    assert rewrites == [1]  # the header and the first row
    logger.log(10_001, loss=0.0, g_loss=1.0)  # a new column: every row so far is rewritten, once
    logger.log(10_002, loss=0.0, g_loss=1.0)
    assert rewrites == [1, 10_001]
    assert len(read_csv(tmp_path / "m.csv")) == 10_002


def test_metric_logger_rewrites_when_a_column_appears(tmp_path):
    logger = MetricLogger(tmp_path / "m.csv")
    logger.log(1, loss=torch.tensor(0.5))
    logger.log(2, loss=0.25, g_loss=torch.tensor(2.0))  # a new column mid-run (the GAN term switching on)
    logger.log(3, loss=0.125)
    assert logger.rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "g_loss": 2.0},
                           {"step": 3, "loss": 0.125}]
    assert read_csv(tmp_path / "m.csv") == logger.rows
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "step,loss,g_loss"
    logger.restore(logger.rows[:1])
    assert read_csv(tmp_path / "m.csv") == [{"step": 1, "loss": 0.5}]


def test_stale_csv_of_an_earlier_run_is_replaced(tmp_path):
    MetricLogger(tmp_path / "m.csv").log(1, old=1.0)
    logger = MetricLogger(tmp_path / "m.csv")
    logger.log(1, loss=2.0)
    assert read_csv(tmp_path / "m.csv") == [{"step": 1, "loss": 2.0}]


class _Run:
    """A tiny regression with dropout (the RNG state matters on resume) whose step function returns 0-d tensors
    and brings a new metric from step 4 on."""

    def __init__(self, run_dir, steps: int = 9, log_interval: int = 2):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.trainer = Trainer(run_dir, {"model": self.model}, {"model": opt}, steps=steps, ckpt_interval=3,
                               log_interval=log_interval, progress=False)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 4, generator=gen)
        self.y = self.x.sum(1, keepdim=True)

    def step_fn(self, step: int) -> dict:
        loss = nn.functional.mse_loss(self.model(self.x[step % 4 :: 4]), self.y[step % 4 :: 4])
        loss.backward()
        metrics = {"loss": loss.detach(), "grad_norm": self.trainer.optimizer_step("model")}
        if step >= 4:
            metrics["late"] = loss.detach() * 2
        return metrics

    def eval_fn(self, step: int) -> dict:
        return {"val_loss": nn.functional.mse_loss(self.model(self.x), self.y)}


def _without_time(rows):
    return [{k: v for k, v in r.items() if k != "step_time"} for r in rows]


def test_log_interval_logs_floats_every_k_steps_and_the_last(tmp_path, monkeypatch):
    conversions = []
    as_floats = common.trainer.as_floats
    monkeypatch.setattr(common.trainer, "as_floats", lambda m: conversions.append(set(m)) or as_floats(m))
    run = _Run(tmp_path, steps=9, log_interval=4)
    run.trainer.fit(run.step_fn, run.eval_fn)
    rows = run.trainer.train_log.rows
    assert [r["step"] for r in rows] == [4, 8, 9]
    assert all(type(v) is float for r in rows for k, v in r.items() if k != "step")
    assert all(r["step_time"] > 0 and r["lr"] == 1e-2 for r in rows)
    assert "late" not in rows[0] and "late" in rows[1]
    # one conversion (the host sync) per logged row and per evaluation, none in between
    assert len(conversions) == len(rows) + len(run.trainer.eval_log.rows) == 3 + 2
    assert read_csv(tmp_path / "train.csv") == rows


def test_resume_is_exact_and_the_csv_matches_the_rows(tmp_path, interrupt_at):
    straight = _Run(tmp_path / "a")
    straight.trainer.fit(straight.step_fn, straight.eval_fn)

    killed = _Run(tmp_path / "b")
    interrupt_at(killed, 5)  # checkpoint at step 3; rows of steps 2 and 4 are in the CSV
    assert [r["step"] for r in read_csv(tmp_path / "b" / "train.csv")] == [2, 4]
    resumed = _Run(tmp_path / "b")
    resumed.trainer.fit(resumed.step_fn, resumed.eval_fn, resume=True)

    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    rows = resumed.trainer.train_log.rows
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 9]
    assert _without_time(rows) == _without_time(straight.trainer.train_log.rows)
    assert resumed.trainer.eval_log.rows == straight.trainer.eval_log.rows
    assert read_csv(tmp_path / "b" / "train.csv") == rows
    assert read_csv(tmp_path / "b" / "eval.csv") == resumed.trainer.eval_log.rows


def test_optimizer_step_returns_the_norm_as_a_tensor(tmp_path):
    for clip in (1e-3, None):
        model = nn.Linear(3, 1)
        trainer = Trainer(tmp_path, {"m": model}, {"m": torch.optim.SGD(model.parameters(), lr=0.1)}, steps=1,
                          grad_clip=clip, progress=False)
        model(torch.ones(2, 3)).sum().backward()
        expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        norm = trainer.optimizer_step("m")
        assert isinstance(norm, torch.Tensor) and norm.ndim == 0
        torch.testing.assert_close(norm, expected)


def test_bad_metrics_and_intervals_raise(tmp_path):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="log_interval must be positive"):
        Trainer(tmp_path, {"m": model}, {"m": opt}, steps=2, log_interval=0)
    trainer = Trainer(tmp_path, {"m": model}, {"m": opt}, steps=2, progress=False)
    with pytest.raises(ValueError, match="metric 'loss' must be a number or a one-element tensor"):
        trainer.fit(lambda step: {"loss": torch.zeros(3)})


def test_a_rank_other_than_0_writes_nothing_and_keeps_the_rows(tmp_path, monkeypatch):
    """Under torchrun only rank 0 writes (tests/test_distributed.py checks it in 2 processes); here the rule alone."""
    import common.dist

    monkeypatch.setattr(common.dist, "is_main_process", lambda: False)
    run = _Run(tmp_path / "rank1", steps=4, log_interval=2)
    run.trainer.fit(run.step_fn, run.eval_fn)
    assert not (tmp_path / "rank1").exists()  # no folder, CSV, TensorBoard log or checkpoint
    assert [r["step"] for r in run.trainer.train_log.rows] == [2, 4]
    assert run.trainer.eval_log.column("val_loss")[0] == [0, 4]


def test_build_optimizer_is_every_run_s_recipe():
    """One group without decay (VAE, discriminator, LDM), or matrices-decay / vectors-not groups (LMs, classifier)."""
    from common.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].bias.requires_grad_(False)  # frozen parameters stay out
    single = build_optimizer(model, 1e-3, kind="adam", betas=(0.5, 0.9))
    assert type(single) is torch.optim.Adam and len(single.param_groups) == 1
    assert single.param_groups[0]["weight_decay"] == 0.0 and single.param_groups[0]["betas"] == (0.5, 0.9)
    assert len(single.param_groups[0]["params"]) == 3
    split = build_optimizer(model, 0.1, 5e-4, "sgd", momentum=0.9, nesterov=True)
    assert [len(g["params"]) for g in split.param_groups] == [1, 2]
    assert [g["weight_decay"] for g in split.param_groups] == [5e-4, 0.0] and split.param_groups[0]["nesterov"]
    assert type(build_optimizer(model, 1e-3)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, 1e-3, kind="lion")
