"""Evaluation: Frechet distance against closed forms, accuracy, the cached classifier, timing."""

import pytest
import torch

from gm.eval import (
    Classifier,
    accuracy,
    frechet_distance,
    frechet_distance_from_stats,
    load_or_train_classifier,
    predict,
    timed,
)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    expected = (mu1 - mu2).pow(2).sum() + (var1.sqrt() - var2.sqrt()).pow(2).sum()  # = 5 + 1 + 1 + 0
    assert frechet_distance_from_stats(mu1, torch.diag(var1), mu2, torch.diag(var2)) == pytest.approx(expected.item())
    # Rotation invariance: rotating both Gaussians leaves the distance unchanged.
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    rotated = frechet_distance_from_stats(q @ mu1.double(), q @ torch.diag(var1).double() @ q.T, q @ mu2.double(),
                                          q @ torch.diag(var2).double() @ q.T)
    assert rotated == pytest.approx(expected.item(), rel=1e-6)


def test_frechet_distance_on_samples():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(20_000, 4, generator=gen), torch.randn(20_000, 4, generator=gen)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) < 0.01
    assert frechet_distance(a, b + torch.tensor([2.0, 0, 0, 0])) == pytest.approx(4.0, rel=0.02)
    assert frechet_distance(a, 3 * b) == pytest.approx(4 * (3 - 1) ** 2, rel=0.03)  # 4 dims, (sqrt(9) - 1)^2 each
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, b[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_accuracy_and_predict_agree():
    model = Classifier(1, width=4, feature_dim=8).eval()
    images = torch.rand(30, 1, 32, 32)
    logits, feats = predict(model, images, batch_size=7)
    assert logits.shape == (30, 10) and feats.shape == (30, 8)
    labels = logits.argmax(1)
    assert accuracy(model, images, labels) == 1.0
    assert accuracy(model, images, (labels + 1) % 10) == 0.0
    with pytest.raises(ValueError, match="labels"):
        accuracy(model, images, labels[:5])
    with pytest.raises(ValueError, match="shape"):
        model(torch.rand(2, 3, 32, 32))


def test_classifier_is_trained_once_then_loaded():
    first = load_or_train_classifier("mnist", "smoke", progress=False)
    assert first.path.is_file() and 0.0 <= first.test_accuracy <= 1.0
    second = load_or_train_classifier("mnist", "smoke", progress=False)
    assert second.test_accuracy == first.test_accuracy
    for p, q in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p.cpu(), q.cpu())
    with pytest.raises(ValueError, match="unknown config key"):
        load_or_train_classifier("mnist", "smoke", widht=3)


def test_timed():
    result, seconds = timed(lambda: sum(range(1000)))
    assert result == 499500 and seconds >= 0
