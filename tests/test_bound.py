"""estimate_bound, the Lipschitz constant, the linear probe and the robustness curve."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_reg import BoundReport, estimate_bound, fit_linear_probe, linear_head_lipschitz, robustness_curve

from helpers import small_cnn


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN and linear head trained (supervised, briefly) on real digits."""
    x, y = digits
    torch.manual_seed(0)
    encoder, head = small_cnn(width=8), nn.Linear(16, 10)
    model = nn.Sequential(encoder, nn.Flatten(), head)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        for i in range(0, 1500, 100):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i : i + 100]), y[i : i + 100]).backward()
            optimizer.step()
    test = [(x[1500 + i : 1500 + i + 100], y[1500 + i : 1500 + i + 100]) for i in range(0, 297, 100)]
    return encoder.eval(), head.eval(), test


@pytest.mark.parametrize("norm, epsilons", [("linf", [0.02, 0.1, 0.3]), ("l2", [0.2, 1.0])])
def test_measured_adversarial_loss_never_exceeds_the_reported_bound(trained, norm, epsilons):
    encoder, head, test = trained
    for eps in epsilons:
        report = estimate_bound(encoder, head, test, epsilon=eps, norm=norm, steps=10)
        assert report.clean_accuracy > 0.7  # trained (chance 0.1; 0.8 failed by a sample on 1 thread)
        assert report.adversarial_loss > report.clean_loss  # the attack really attacks
        assert report.adversarial_loss <= report.bound + 1e-6


def test_lipschitz_constant_is_sqrt2_times_the_spectral_norm_and_is_attained():
    # Two classes with rows w and -w: the gradient norm tends to sqrt(2)||W||_2 as
    # the wrong class becomes certain, so the constant is tight.
    torch.manual_seed(0)
    w = torch.randn(6)
    head = nn.Linear(6, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.stack([w, -w]))
    lipschitz = linear_head_lipschitz(head)
    assert lipschitz == pytest.approx(math.sqrt(2) * torch.linalg.matrix_norm(head.weight, ord=2).item(), rel=1e-6)

    z = (-3.0 * w / w.norm()).double().requires_grad_(True)  # confidently class 1
    loss = lambda v: F.cross_entropy(head.double()(v)[None], torch.tensor([0]))  # noqa: E731
    h = 1e-6
    direction = -w.double() / w.norm()
    finite_difference = (loss(z + h * direction) - loss(z - h * direction)) / (2 * h)
    assert finite_difference.item() == pytest.approx(lipschitz, rel=1e-2)


def test_lipschitz_constant_bounds_every_finite_difference_slope():
    torch.manual_seed(1)
    head = nn.Linear(12, 5).double()
    lipschitz = linear_head_lipschitz(head)
    z1, z2 = torch.randn(500, 12).double() * 5, torch.randn(500, 12).double() * 5
    y = torch.randint(0, 5, (500,))
    with torch.no_grad():
        slopes = (F.cross_entropy(head(z1), y, reduction="none") - F.cross_entropy(head(z2), y, reduction="none")).abs()
        slopes /= (z1 - z2).norm(dim=1)
    assert slopes.max().item() <= lipschitz


def test_at_zero_eps_the_bound_is_the_clean_loss_and_all_accuracies_agree(trained):
    encoder, head, test = trained
    report = estimate_bound(encoder, head, test, epsilon=0.0, steps=3)
    assert report.bound == pytest.approx(report.clean_loss)
    assert report.adversarial_loss == pytest.approx(report.clean_loss, rel=1e-5)
    assert report.adversarial_accuracy == report.clean_accuracy == report.predicted_robust_accuracy
    assert report.mean_deviation == 0.0


def test_predicted_robust_accuracy_falls_with_eps(trained):
    encoder, head, test = trained
    curve = robustness_curve(encoder, head, test, [0.0, 0.05, 0.3], steps=5)
    predicted = [r.predicted_robust_accuracy for r in curve]
    assert predicted[0] >= predicted[1] >= predicted[2]
    assert [r.mean_deviation for r in curve] == sorted(r.mean_deviation for r in curve)


def test_report_counts_samples_and_relative_deviation_is_mean_deviation_over_sigma(trained):
    encoder, head, test = trained
    report = estimate_bound(encoder, head, test, epsilon=0.1, steps=3)
    assert report.num_samples == 297
    assert report.relative_deviation == pytest.approx(report.mean_deviation / report.sigma)
    with torch.no_grad():
        h = torch.cat([encoder(x).flatten(1) for x, _ in test])
    assert report.sigma == pytest.approx((h - h.mean(0)).pow(2).sum(1).mean().sqrt().item(), rel=1e-4)


def test_printed_report_names_the_estimates(trained):
    encoder, head, test = trained
    text = str(estimate_bound(encoder, head, test[:1], epsilon=0.1, steps=2))
    assert "BoundReport" in text
    for line in ("adversarial accuracy", "adversarial loss", "bound", "mean deviation R_eps", "relative deviation"):
        row = next(r for r in text.splitlines() if r.strip().startswith(line))
        assert "estimate" in row, row


def test_report_round_trips_through_a_dict(trained):
    encoder, head, test = trained
    report = estimate_bound(encoder, head, test[:1], epsilon=0.1, steps=2)
    assert BoundReport(**{**report.to_dict(), "notes": tuple(report.notes)}) == report


def test_linear_probe_fits_real_digits_on_frozen_features(digits):
    x, y = digits
    torch.manual_seed(0)
    flatten = nn.Flatten()
    head = fit_linear_probe(flatten, [(x[:1200], y[:1200])], num_classes=10)
    with torch.no_grad():
        accuracy = (head(flatten(x[1200:])).argmax(1) == y[1200:]).float().mean().item()
    assert accuracy > 0.9
    assert not head.training and all(p.grad is None for p in head.parameters())


def test_a_custom_head_can_give_its_own_lipschitz_constant(trained):
    encoder, head, test = trained
    wrapped = nn.Sequential(head)
    report = estimate_bound(encoder, wrapped, test[:1], epsilon=0.1, steps=2, lipschitz=linear_head_lipschitz(head))
    assert report.predicted_robust_accuracy is None
    assert report.adversarial_loss <= report.bound + 1e-6


def test_the_0_1_0_names_are_gone(trained):
    encoder, head, test = trained
    report = estimate_bound(encoder, head, test, epsilon=0.1, steps=2)
    for old in ("regularizer", "relative_regularizer", "spread"):
        assert not hasattr(report, old)


def test_reused_adversarial_inputs_give_the_same_report_as_the_attack_that_found_them(trained):
    from robust_reg import ThreatModel, pgd_attack

    encoder, head, test = trained
    x, y = test[0]
    torch.manual_seed(0)
    x_adv = pgd_attack(lambda v: head(encoder(v).flatten(1)), x, y, ThreatModel(0.1), steps=3)
    reused = estimate_bound(encoder, head, [(x, y)], epsilon=0.1, steps=3, adversarial_inputs=x_adv)
    with torch.no_grad():
        adv_loss = F.cross_entropy(head(encoder(x_adv).flatten(1)), y).item()
    assert reused.adversarial_loss == pytest.approx(adv_loss, rel=1e-5)
    assert any("reused" in n for n in reused.notes)


def test_adversarial_inputs_of_the_wrong_length_are_named(trained):
    encoder, head, test = trained
    x, y = test[0]
    with pytest.raises(ValueError, match="adversarial_inputs"):
        estimate_bound(encoder, head, [(x, y)], epsilon=0.1, steps=2, adversarial_inputs=x[:3])
