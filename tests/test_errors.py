"""Every bad input raises a clear error naming the argument, before any work is done."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robust_reg import (
    BackboneRobustnessRegularizer,
    ThreatModel,
    estimate_bound,
    fit_linear_probe,
    robustness_curve,
)

from helpers import assert_unchanged, small_cnn, snapshot


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(epsilon=-0.1), ValueError, "epsilon"),
        (dict(epsilon=math.nan), ValueError, "epsilon"),
        (dict(epsilon=math.inf), ValueError, "epsilon"),
        (dict(epsilon="0.1"), TypeError, "epsilon"),
        (dict(epsilon=0.1, steps=-1), ValueError, "steps"),
        (dict(epsilon=0.1, steps=1.5), TypeError, "steps"),
        (dict(epsilon=0.1, norm="l1"), ValueError, "norm"),
        (dict(epsilon=0.1, step_size=0.0), ValueError, "step_size"),
        (dict(epsilon=0.1, step_size=math.nan), ValueError, "step_size"),
        (dict(), TypeError, "needs epsilon= .* or threat="),
        (dict(epsilon=0.1, threat=ThreatModel(0.1)), TypeError, "epsilon come from threat="),
        (dict(threat=0.1), TypeError, "threat must be a ThreatModel"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        BackboneRobustnessRegularizer(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bounds=(1.0, 0.0)), "bounds"),
        (dict(bounds=(0.0, math.inf)), "bounds"),
        (dict(std=(0.5, 0.0, 0.5)), "std"),
        (dict(mean=(0.5, 0.5), std=(0.2, 0.2, 0.2)), "mean and std"),
        (dict(mean=(0.5, math.nan)), "mean"),
    ],
)
def test_a_bad_ball_is_named_by_the_threat_model(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThreatModel(0.1, **kwargs)


@pytest.fixture
def model_and_state():
    torch.manual_seed(0)
    model = small_cnn(in_channels=3)
    model(torch.rand(8, 3, 8, 8))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, snapshot(model)


def good_x():
    return torch.rand(4, 3, 8, 8)


@pytest.mark.parametrize(
    "reg_kwargs, call, error, match",
    [
        ({}, lambda m: (m, good_x()[:1]), ValueError, "at least 2 samples"),
        ({}, lambda m: (m, (good_x() * 255).long()), TypeError, "x must be a floating-point"),
        ({}, lambda m: (m, good_x() + 2.0), ValueError, "x has values .* outside bounds"),
        ({}, lambda m: (m, good_x() - 0.5), ValueError, "x has values .* outside bounds"),
        (
            dict(mean=(0.5, 0.5, 0.5), std=(0.1, 0.1, 0.1)),
            lambda m: (m, (good_x() - 0.5) / 0.01),
            ValueError,
            "after undoing mean/std",
        ),
        (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), lambda m: (m, good_x()), ValueError, "mean has 2 channels"),
        ({}, lambda m: (m, good_x(), torch.randn(5, 16)), ValueError, "features has batch size 5"),
        ({}, lambda m: (m, good_x(), torch.full((4, 16), math.nan)), ValueError, "features contains non-finite"),
        ({}, lambda m: (m, good_x(), torch.ones(4, 16, dtype=torch.long)), TypeError, "features must be a floating"),
        ({}, lambda m: ("not a model", good_x()), TypeError, "encoder must be callable"),
        ({}, lambda m: (m, [[0.1]]), TypeError, "x must be a Tensor"),
    ],
)
def test_bad_call_arguments_are_named_and_change_nothing(model_and_state, reg_kwargs, call, error, match):
    model, before = model_and_state
    reg = BackboneRobustnessRegularizer(threat=ThreatModel(0.1, **reg_kwargs))
    with pytest.raises(error, match=match):
        reg(*call(model))
    assert_unchanged(model, before)
    assert reg.last_stats is None


def test_batch_of_one_is_fine_with_the_raw_form(model_and_state):
    model, _ = model_and_state
    BackboneRobustnessRegularizer(0.1, relative=False)(model.eval(), good_x()[:1])


def test_non_finite_encoder_output_is_reported(images):
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    with torch.no_grad():
        encoder[1].bias.fill_(math.inf)
    with pytest.raises(ValueError, match=r"encoder\(x\) returned non-finite"):
        BackboneRobustnessRegularizer(0.1)(encoder, images)


def test_estimate_bound_needs_a_linear_head_or_a_lipschitz_constant(digits):
    x, y = digits
    head = nn.Sequential(nn.Linear(16, 10))
    with pytest.raises(TypeError, match="head must be an nn.Linear"):
        estimate_bound(small_cnn(), head, [(x[:8], y[:8])], epsilon=0.1)
    with pytest.raises(ValueError, match="lipschitz"):
        estimate_bound(small_cnn(), head, [(x[:8], y[:8])], epsilon=0.1, lipschitz=-1.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(epsilon=-1.0), ValueError, "epsilon"),
        (dict(epsilon=0.1, norm="l0"), ValueError, "norm"),
        (dict(epsilon=0.1, steps=-2), ValueError, "steps"),
        (dict(epsilon=0.1, max_batches=0), ValueError, "max_batches"),
    ],
)
def test_estimate_bound_names_bad_arguments(digits, kwargs, error, match):
    x, y = digits
    with pytest.raises(error, match=match):
        estimate_bound(small_cnn(), nn.Linear(16, 10), [(x[:8], y[:8])], **kwargs)


def test_estimate_bound_rejects_inputs_outside_the_bounds(digits):
    x, y = digits
    with pytest.raises(ValueError, match="loader inputs has values"):
        estimate_bound(small_cnn(), nn.Linear(16, 10), [(x[:8] * 16, y[:8])], epsilon=0.1)


@pytest.mark.parametrize(
    "batch, error, match",
    [
        (torch.rand(4, 1, 8, 8), ValueError, "loader must yield"),
        ((torch.rand(4, 1, 8, 8), torch.rand(4)), TypeError, "labels must be integer"),
        (((torch.rand(4, 1, 8, 8) * 3).long(), torch.zeros(4, dtype=torch.long)), TypeError, "inputs must be floating"),
    ],
)
def test_loaders_with_an_unreadable_layout_are_reported(batch, error, match):
    with pytest.raises(error, match=match):
        fit_linear_probe(small_cnn(), [batch], num_classes=2)


def test_probe_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_linear_probe(small_cnn(), [(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 1]))], num_classes=2)


def test_probe_rejects_a_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        fit_linear_probe(small_cnn(), [(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))], num_classes=1)


def test_robustness_curve_rejects_an_empty_eps_list():
    with pytest.raises(ValueError, match="epsilons"):
        robustness_curve(small_cnn(), nn.Linear(16, 2), [], [])


def test_threat_model_rejects_mean_with_a_different_channel_count_than_the_inputs():
    threat = ThreatModel(0.1, mean=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="mean has 3 channels"):
        threat.check_inputs(torch.rand(2, 1, 4, 4))
