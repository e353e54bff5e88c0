"""Hidden graded tests of task 2.2 (not in the student release)."""

import torch

from gm.loss import d_hinge_loss, g_hinge_loss


def test_real_and_fake_batches_of_different_sizes_are_averaged_separately():
    real = torch.full((3, 1, 2, 2), 0.25)  # relu(1 - 0.25) = 0.75 everywhere
    fake = torch.tensor([-3.0, 1.0]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)  # relu(1 + fake): 0 and 2 -> mean 1
    assert abs(d_hinge_loss(real, fake).item() - 1.75) < 1e-6
    assert abs(g_hinge_loss(fake).item() - 1.0) < 1e-6
