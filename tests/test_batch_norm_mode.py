"""``batch_norm=``: BatchNorm with batch statistics (default) or running statistics during the regulariser's passes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robust_reg import BackboneRobustnessRegularizer


def bn_encoder() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():  # running statistics far from any batch's, so the two modes differ visibly
        net[1].running_mean.fill_(0.5)
        net[1].running_var.fill_(4.0)
    return net.train()


def test_running_mode_features_are_those_of_the_eval_mode_network():
    encoder, x = bn_encoder(), torch.rand(16, 1, 8, 8)
    out = BackboneRobustnessRegularizer(epsilon=0.1, steps=2, batch_norm="running")(encoder, x)
    reference = encoder.eval()(out.adversarial_inputs)
    torch.testing.assert_close(out.adversarial_features, reference)


def test_batch_mode_features_use_batch_statistics():
    encoder, x = bn_encoder(), torch.rand(16, 1, 8, 8)
    out = BackboneRobustnessRegularizer(epsilon=0.1, steps=2)(encoder, x)
    assert not torch.allclose(out.adversarial_features, encoder.eval()(out.adversarial_inputs))


def test_running_mode_recomputes_train_mode_features_so_tiny_eps_gives_zero():
    encoder, x = bn_encoder(), torch.rand(16, 1, 8, 8)
    reg = BackboneRobustnessRegularizer(epsilon=1e-6, steps=2, batch_norm="running")
    with pytest.warns(UserWarning, match="BatchNorm2d.*recomputed"):
        value = reg(encoder, x, features=encoder(x)).loss.item()
    assert value < 1e-4


def test_batch_mode_reuses_train_mode_features_without_warning():
    encoder, x = bn_encoder(), torch.rand(16, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BackboneRobustnessRegularizer(epsilon=1e-6, steps=2)(encoder, x, features=encoder(x)).loss.item() < 1e-4


def test_running_mode_leaves_statistics_and_modes_as_they_were():
    encoder, x = bn_encoder(), torch.rand(16, 1, 8, 8)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    modes = [m.training for m in encoder.modules()]
    BackboneRobustnessRegularizer(epsilon=0.1, steps=2, batch_norm="running")(encoder, x).loss.backward()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert [m.training for m in encoder.modules()] == modes


def test_unknown_batch_norm_mode_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match="batch_norm"):
        BackboneRobustnessRegularizer(epsilon=0.1, batch_norm="eval")
