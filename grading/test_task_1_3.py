"""Graded tests of task 1.3, the DPO loss (fm/dpo.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fm.dpo import dpo_loss


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # h = 0.5 * ((-10 + 11) - (-12 + 11.5)) = 0.75, loss = -log sigmoid(h) = log(1 + exp(-h))
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.5) and rejected_r.item() == pytest.approx(-0.25)


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    logps = torch.randn(2, 5) * 20
    losses, chosen_r, rejected_r = dpo_loss(logps[0], logps[1], logps[0], logps[1], beta=0.3)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2)))
    assert torch.equal(chosen_r, torch.zeros(5)) and torch.equal(rejected_r, torch.zeros(5))


def test_dpo_loss_matches_the_formula_on_a_batch():
    gen = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(16, generator=gen, dtype=torch.float64) * 5 - 20 for _ in range(4))
    beta = 0.2
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(losses, -F.logsigmoid(beta * ((pc - rc) - (pr - rr))))
    torch.testing.assert_close(chosen_r, beta * (pc - rc))
    torch.testing.assert_close(rejected_r, beta * (pr - rr))


def test_label_smoothing_gives_the_conservative_dpo_loss():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    expected = 0.8 * math.log1p(math.exp(-0.75)) + 0.2 * math.log1p(math.exp(0.75))
    assert smoothed.item() == pytest.approx(expected, abs=1e-6)


def test_gradient_raises_chosen_lowers_rejected_and_rewards_are_detached():
    pc = torch.tensor([-5.0, -3.0], requires_grad=True)
    pr = torch.tensor([-4.0, -6.0], requires_grad=True)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, torch.tensor([-4.0, -4.0]), torch.tensor([-5.0, -5.0]))
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all(), "descent must raise log pi(y_w) and lower log pi(y_l)"
    assert not chosen_r.requires_grad and not rejected_r.requires_grad, "the rewards are metrics: detach them"
    weights = 0.1 * torch.sigmoid(rejected_r - chosen_r)  # the default beta is 0.1
    torch.testing.assert_close(-pc.grad, weights)
    torch.testing.assert_close(pr.grad, weights)
