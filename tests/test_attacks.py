"""The attack engine: projected gradient ascent inside the threat set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robust_reg import ThreatModel, pgd_attack, projected_gradient_ascent

from helpers import small_cnn


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    channels=st.integers(1, 3),
    side=st.integers(1, 5),
    epsilon=st.floats(0.0, 0.5),  # above 0.5 an L-inf radius is refused as a unit mistake
    norm=st.sampled_from(["linf", "l2"]),
    normalized=st.booleans(),
    steps=st.integers(0, 4),
    random_start=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_perturbation_stays_in_ball_and_bounds(
    n, channels, side, epsilon, norm, normalized, steps, random_start, seed
):
    torch.manual_seed(seed)
    mean = tuple(torch.rand(channels).tolist()) if normalized else None
    std = tuple((0.1 + torch.rand(channels)).tolist()) if normalized else None
    threat = ThreatModel(epsilon, norm=norm, mean=mean, std=std)
    pixels = torch.rand(n, channels, side, side)
    pixels[0, 0, 0, 0] = 0.0  # exercise both bounds
    pixels[-1, -1, -1, -1] = 1.0
    x = threat.to_model(pixels)
    weights = torch.randn(channels * side * side, 3)

    def objective(v):
        return torch.tanh(v.flatten(1) @ weights).pow(2).sum(1) + v.flatten(1).pow(3).sum(1)

    x_adv = projected_gradient_ascent(objective, x, threat, steps=steps, random_start=random_start)
    delta = threat.to_pixels(x_adv) - pixels
    tol = 1e-5
    if norm == "linf":
        assert delta.abs().max() <= epsilon + tol
    else:
        assert delta.flatten(1).norm(dim=1).max() <= epsilon + tol
    adv_pixels = threat.to_pixels(x_adv)
    assert adv_pixels.min() >= -tol and adv_pixels.max() <= 1 + tol
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_finds_the_exact_worst_case_of_a_linear_classifier(norm):
    # For logits (w.x, -w.x) the worst perturbation is known: -eps*sign(w) (linf) or -eps*w/|w| (l2).
    torch.manual_seed(0)
    w = torch.randn(20)
    model = lambda v: torch.stack([v @ w, -(v @ w)], dim=1)  # noqa: E731
    x = torch.rand(32, 20) * 2
    y = torch.zeros(32, dtype=torch.long)
    eps, span = 0.3, 200.0  # wide bounds, so nothing is clipped; epsilon is a fraction of their range
    threat = ThreatModel(eps / span, norm=norm, bounds=(-100.0, 100.0))
    x_adv = pgd_attack(model, x, y, threat, steps=10, step_size=eps / span)
    achieved = ((x_adv - x) @ w).neg()
    optimum = eps * (w.abs().sum() if norm == "linf" else w.norm())
    assert torch.allclose(achieved, optimum.expand_as(achieved), rtol=1e-3)


def test_keep_best_is_never_worse_than_the_last_iterate():
    torch.manual_seed(0)
    model = small_cnn().eval()
    head = nn.Linear(16, 4)
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 4, (12,))
    threat = ThreatModel(0.3)

    def loss(v):
        return F.cross_entropy(head(model(v).flatten(1)), y, reduction="none")

    torch.manual_seed(5)
    last = projected_gradient_ascent(loss, x, threat, steps=6, step_size=0.2)
    torch.manual_seed(5)
    best = projected_gradient_ascent(loss, x, threat, steps=6, step_size=0.2, keep_best=True)
    with torch.no_grad():
        assert (loss(best) >= loss(last) - 1e-6).all()


def test_attack_raises_the_loss_of_a_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(small_cnn(), nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    x_adv = pgd_attack(model, x, y, ThreatModel(0.2), steps=10)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_attack_leaves_parameter_grads_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    x, y = torch.rand(4, 1, 4, 4), torch.randint(0, 3, (4,))
    pgd_attack(model, x, y, ThreatModel(0.1), steps=3)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_zero_steps_without_random_start_returns_the_input():
    x = torch.rand(3, 1, 4, 4)
    x_adv = projected_gradient_ascent(lambda v: v.flatten(1).sum(1), x, ThreatModel(0.1), steps=0, random_start=False)
    assert torch.equal(x_adv, x)


def test_l2_random_start_fills_the_ball_not_only_its_surface():
    torch.manual_seed(0)
    threat = ThreatModel(1.0 / 20, norm="l2", bounds=(-10.0, 10.0))  # radius 1 in the units of bounds
    delta = threat.random_start(torch.zeros(4000, 2))
    radii = delta.norm(dim=1)
    # Uniform in a disc: P(r <= 1/2) = 1/4.
    assert abs((radii <= 0.5).float().mean().item() - 0.25) < 0.03
    assert radii.max() <= 1.0 + 1e-6


def test_objective_must_return_one_value_per_sample():
    with pytest.raises(ValueError, match="objective must return one value per sample"):
        projected_gradient_ascent(lambda v: v.sum(), torch.rand(3, 4), ThreatModel(0.1), steps=1)


def test_normalised_threat_round_trips_between_pixel_and_model_space():
    threat = ThreatModel(0.1, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    pixels = torch.rand(2, 3, 4, 4)
    assert torch.allclose(threat.to_pixels(threat.to_model(pixels)), pixels, atol=1e-6)


def test_pgd_is_not_stalled_by_saturated_logits():
    # Logits of +-1000: the cross-entropy's gradient underflows to exactly 0, which would fake robustness.
    torch.manual_seed(0)
    w = torch.randn(20)
    model = lambda v: 1000 * torch.stack([v @ w, -(v @ w)], dim=1)  # noqa: E731
    x = torch.rand(16, 20) * 2
    y = (x @ w < 0).long()  # every sample correctly classified, with a huge margin
    x_req = x.clone().requires_grad_(True)
    F.cross_entropy(model(x_req).double(), y, reduction="sum").backward()
    assert (x_req.grad == 0).all()  # the plain cross-entropy gradient is dead
    x_adv = pgd_attack(model, x, y, ThreatModel(0.3 / 200, bounds=(-100.0, 100.0)), steps=5, step_size=0.3 / 200)
    moved = ((x_adv - x) @ w) * torch.where(y == 0, -1.0, 1.0)
    assert torch.allclose(moved, 0.3 * w.abs().sum().expand(16), rtol=1e-3)


def test_pgd_steps_follow_the_cross_entropy_gradient_direction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x, y = torch.rand(8, 1, 4, 4, requires_grad=True), torch.randint(0, 5, (8,))
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    from robust_reg.attacks import _cross_entropy_logit

    (our_grad,) = torch.autograd.grad(_cross_entropy_logit(model(x), y).sum(), x)
    cosine = F.cosine_similarity(ce_grad.flatten(1), our_grad.flatten(1))
    assert torch.allclose(cosine, torch.ones(8), atol=1e-5)
