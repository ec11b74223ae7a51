"""A bare ``RobustnessRegularizer(epsilon)`` is the measured recommended configuration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_reg import BackboneRobustnessRegularizer, RobustnessRegularizer, method_settings

from helpers import Counting, assert_unchanged, small_cnn, snapshot


def embedding_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(small_cnn(), nn.Flatten(), nn.Linear(16, 8))


def test_the_bare_constructor_is_the_recommended_configuration():
    reg = RobustnessRegularizer(8 / 255)
    assert (reg.form, reg.normalize_features, reg.ascent) == ("embedding", True, "positive")
    assert (reg.inner, reg.steps, reg.step_size, reg.random_start, reg.relative) == ("n-fgsm", 1, None, True, True)
    assert (reg.batch_norm, reg.detach_anchor, reg.gather_distributed) == ("batch", False, False)
    assert (reg.epsilon, reg.norm, reg.threat.bounds) == (8 / 255, "linf", (0.0, 1.0))


def test_the_bare_constructor_computes_what_the_spelled_out_recommended_one_computes():
    model, x0, x1 = embedding_model(), torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    z0, z1 = model(x0), model(x1)
    results = []
    for reg in (
        RobustnessRegularizer(0.1),
        BackboneRobustnessRegularizer(0.1, inner="n-fgsm", normalize_features=True, ascent="positive"),
    ):
        torch.manual_seed(1)
        results.append(reg(model, x1, features=z1, positive=z0.detach()))
    assert torch.equal(results[0].loss, results[1].loss)
    assert torch.equal(results[0].adversarial_inputs, results[1].adversarial_inputs)


def test_the_default_call_returns_the_value_and_the_adversarial_embedding():
    model, x0, x1 = embedding_model(), torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    out = RobustnessRegularizer(0.1)(model, x1, features=model(x1), positive=model(x0))
    assert out.loss.shape == () and out.loss.requires_grad
    assert out.adversarial_features.shape == (8, 8) and out.adversarial_features.requires_grad
    assert (out.adversarial_inputs - x1).abs().max() <= 3 * 0.1 + 1e-6  # N-FGSM's search reaches 3 eps


def test_positive_none_fails_before_any_forward_and_names_both_ways_forward():
    model = Counting(embedding_model())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"positive= is missing.*positive=z0.*BackboneRobustnessRegularizer"):
        RobustnessRegularizer(0.1)(model, torch.rand(8, 1, 28, 28), positive=None)
    assert model.calls == 0
    assert_unchanged(model, before)


def test_the_papers_form_is_one_named_choice():
    reg = BackboneRobustnessRegularizer(0.1)
    assert (reg.normalize_features, reg.ascent) == (False, "deviation")
    backbone = small_cnn()
    assert reg(backbone, torch.rand(8, 1, 28, 28)).loss >= 0  # no positive needed


def test_options_override_the_forms_defaults():
    reg = BackboneRobustnessRegularizer(0.1, normalize_features=True)
    assert (reg.normalize_features, reg.ascent) == (True, "deviation")
    assert repr(reg).startswith("BackboneRobustnessRegularizer(") and "normalize_features=True" in repr(reg)
    assert repr(RobustnessRegularizer(0.1)) == "RobustnessRegularizer(epsilon=0.1, norm='linf', inner='n-fgsm')"


def test_an_unknown_form_is_named():
    with pytest.raises(ValueError, match="form must be one of"):
        RobustnessRegularizer(0.1, form="projection")


def test_method_settings_hold_byols_weight_and_unknown_methods_get_none():
    assert method_settings("simclr").weight == 1.0
    assert method_settings("BYOL").weight == 0.05
    assert method_settings("my-method") is None
