"""Evaluation: Frechet distance against closed forms, its bootstrap interval, the Wilson interval, accuracy, the
augmentation, the cached classifier."""

import pytest
import torch

from common.checks import wilson_interval
from gm.eval import Classifier, accuracy, classifier_config, load_or_train_classifier, predict, random_translate
from gm.frechet import FrechetReference, frechet_distance, frechet_distance_from_stats, kernel_distance, mmd2_unbiased


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
    model = Classifier(1, width=4).eval()
    images = torch.rand(30, 1, 32, 32)
    logits, feats = predict(model, images, batch_size=7)
    assert logits.shape == (30, 10) and feats.shape == (30, model.feature_dim)
    assert model.feature_dim == 24  # widths (4, 12, 24)
    labels = logits.argmax(1)
    assert accuracy(model, images, labels) == 1.0
    assert accuracy(model, images, (labels + 1) % 10) == 0.0
    with pytest.raises(ValueError, match="labels"):
        accuracy(model, images, labels[:5])
    with pytest.raises(ValueError, match="shape"):
        model(torch.rand(2, 3, 32, 32))


def test_flip_tta_features_are_mirror_invariant_in_eval_mode():
    model = Classifier(3, width=4, flip_tta=True).eval()
    images = torch.rand(5, 3, 32, 32)
    torch.testing.assert_close(predict(model, images)[1], predict(model, images.flip(-1))[1])
    plain = Classifier(3, width=4).eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(predict(plain, images)[1], predict(plain, images.flip(-1))[1])


def test_wilson_interval_reference_values():
    # Wilson (1927) / Newcombe (1998) 95 % intervals: 5/10 -> [0.2366, 0.7634], 0/10 -> [0, 0.2775].
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson_interval(970, 1000)  # close to the normal approximation for large n
    half = 1.96 * (0.97 * 0.03 / 1000) ** 0.5
    assert lo < 0.97 < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.05)
    assert str(wilson_interval(5, 10)) == "[0.2366, 0.7634]"
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_wilson_interval_covers_the_true_rate():
    gen = torch.Generator().manual_seed(0)
    n, p, trials = 200, 0.9, 2000
    hits = torch.binomial(torch.full((trials,), float(n)), torch.full((trials,), p), generator=gen).long()
    covered = sum(lo <= p <= hi for lo, hi in (wilson_interval(int(k), n) for k in hits))
    assert 0.93 <= covered / trials <= 0.97  # nominal 95 %


def test_kernel_distance_is_unbiased_and_its_interval_contains_the_estimate():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=gen), torch.randn(2000, 8, generator=gen)
    kid, (lo, hi) = kernel_distance(a, b, blocks=10)
    assert lo < kid < hi and lo < 0.0 < hi  # one distribution: 0 is inside, although the plug-in FD is > 0
    assert frechet_distance(a, b) > 0.02
    far, (far_lo, far_hi) = kernel_distance(a + 1.0, b, blocks=10)
    assert far_lo > hi and far_lo < far < far_hi
    assert kernel_distance(a + 1.0, b, blocks=10) == (far, (far_lo, far_hi))  # the same seed, the same blocks
    ref = FrechetReference.of(b)  # a shared reference gives the same values as its features
    assert kernel_distance(a, ref, blocks=10)[0] == kid and len(ref) == 2000
    with pytest.raises(ValueError, match="blocks"):
        kernel_distance(a[:10], b, blocks=10)


def test_unbiased_mmd_of_one_block_pair_by_hand():
    x, y = torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0], [1.0]])  # D = 1: k(a, b) = (a b + 1)^3
    k = lambda a, b: (a * b + 1) ** 3  # noqa: E731
    by_hand = 2 * k(1, 0) / 2 + 2 * k(2, 1) / 2 - 2 * (k(1, 2) + k(1, 1) + k(0, 2) + k(0, 1)) / 4
    assert mmd2_unbiased(x.double(), y.double()) == pytest.approx(by_hand)


def test_a_shared_frechet_reference_gives_the_same_distances_as_its_features():
    # the reference's statistics are computed once and reused by every comparison with it
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(500, 8, generator=gen), 1.5 * torch.randn(2000, 8, generator=gen)
    ref = FrechetReference.of(b)
    assert len(ref) == 2000
    assert frechet_distance(a, ref) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)  # symmetric
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a[:, :4], ref)


def test_random_translate_shifts_each_image_by_at_most_pad():
    images = torch.zeros(64, 1, 32, 32)
    images[:, :, 16, 16] = 1.0
    moved = random_translate(images, pad=2)
    assert moved.shape == images.shape and torch.equal(random_translate(images, 0), images)
    rows, cols = (moved[:, 0] == 1).nonzero()[:, 1:].T
    assert moved.sum() == 64 and (rows - 16).abs().max() <= 2 and (cols - 16).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5  # the shifts differ between images


def test_quick_classifier_is_evaluated_on_the_full_test_set():
    for dataset in ("mnist", "cifar10"):
        cfg = classifier_config(dataset, "quick")
        assert cfg.eval_size == 10_000 and cfg.flip == (dataset == "cifar10") and cfg.steps > 100
    with pytest.raises(ValueError, match="degrade_fraction"):
        classifier_config("mnist", "smoke", degrade_fraction=1.5)


def test_classifier_is_trained_once_then_loaded():
    first = load_or_train_classifier("mnist", "smoke", progress=False)
    assert (first.folder / "model.pt").is_file() and 0.0 <= first.test_accuracy <= 1.0 and first.train_seconds > 0
    lo, hi = first.test_accuracy_ci
    assert lo <= first.test_accuracy <= hi
    second = load_or_train_classifier("mnist", "smoke", progress=False)
    assert (second.test_accuracy, second.train_seconds) == (first.test_accuracy, first.train_seconds)
    for p, q in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p.cpu(), q.cpu())
    with pytest.raises(ValueError, match="unknown config key"):
        load_or_train_classifier("mnist", "smoke", widht=3)


def test_features_of_the_same_images_are_computed_once_per_weights_and_mode():
    from gm.eval import cached_features

    classifier = Classifier(1, width=4).eval()
    calls = []
    features = classifier.features
    classifier.features = lambda x: calls.append(len(x)) or features(x)
    images = torch.rand(5, 1, 32, 32)
    first = predict(classifier, images, batch_size=2)[1]
    assert calls == [2, 2, 1]
    again = predict(classifier, images.clone(), batch_size=2)[1]  # the same values: no new pass
    assert calls == [2, 2, 1] and torch.equal(first, again)
    predict(classifier, images, batch_size=5)  # other batches: computed
    cached_features(classifier.train(), images)  # train mode (batch statistics): computed
    with torch.no_grad():
        next(classifier.parameters()).mul_(2)
    cached_features(classifier.eval(), images)  # other weights: computed
    assert calls == [2, 2, 1, 5, 5, 5]
