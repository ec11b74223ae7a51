"""Stochastic layers do not count as deviation: only the input perturbation moves the features."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robust_reg import BackboneRobustnessRegularizer

TINY = 1e-6  # an eps at which any deviation is noise, not perturbation


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 32)).train()


def small_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=16,
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        dropout=0.3,
        attention_dropout=0.3,
        num_classes=8,
    )
    return vit.train()


def value(encoder: nn.Module, x: torch.Tensor, *, reuse: bool) -> float:
    reg = BackboneRobustnessRegularizer(epsilon=TINY, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features = encoder(x) if reuse else None  # a train-mode pass: dropout on
        return reg(encoder, x, features=features).loss.item()


@pytest.mark.parametrize("reuse", [False, True], ids=["own-forward", "features-from-a-dropout-pass"])
def test_dropout_encoder_at_tiny_eps_has_no_deviation_in_train_mode(reuse):
    assert value(dropout_mlp(), torch.rand(32, 1, 8, 8), reuse=reuse) < 1e-4


@pytest.mark.parametrize("reuse", [False, True], ids=["own-forward", "features-from-a-dropout-pass"])
def test_vision_transformer_with_dropout_at_tiny_eps_has_no_deviation(reuse):
    pytest.importorskip("torchvision")
    assert value(small_vit(), torch.rand(16, 3, 16, 16), reuse=reuse) < 1e-4


def test_without_the_policy_dropout_would_count_as_deviation():
    """The property above is not vacuous: two train-mode passes of the same encoder differ."""
    encoder, x = dropout_mlp(), torch.rand(32, 1, 8, 8)
    a, b = encoder(x), encoder(x)
    assert (a - b).pow(2).sum(1).mean() / (a - a.mean(0)).pow(2).sum(1).mean() > 0.1


def test_noisy_features_are_recomputed_once_with_a_warning():
    encoder, x = dropout_mlp(), torch.rand(32, 1, 8, 8)
    reg = BackboneRobustnessRegularizer(epsilon=0.1, steps=1)
    with pytest.warns(UserWarning, match="Dropout.*recomputed"):
        reg(encoder, x, features=encoder(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg(encoder, x, features=encoder(x))  # said once per regulariser


def test_stochastic_layers_are_back_in_training_mode_afterwards():
    encoder = small_vit()
    modes = [m.training for m in encoder.modules()]
    BackboneRobustnessRegularizer(epsilon=0.05, steps=1)(encoder, torch.rand(8, 3, 16, 16))
    assert [m.training for m in encoder.modules()] == modes


def test_a_user_named_noise_layer_is_made_deterministic():
    class Noise(nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x) if self.training else x

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), Noise()).train()
    x = torch.rand(32, 1, 8, 8)
    assert BackboneRobustnessRegularizer(epsilon=TINY, stochastic_modules=(Noise,))(encoder, x).loss.item() < 1e-4
    assert BackboneRobustnessRegularizer(epsilon=TINY)(encoder, x).loss.item() > 0.1  # unnamed, it is noise


def test_stochastic_modules_must_be_module_types():
    with pytest.raises(TypeError, match="stochastic_modules"):
        BackboneRobustnessRegularizer(epsilon=0.1, stochastic_modules=(nn.Dropout(0.1),))
