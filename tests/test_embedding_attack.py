"""The label-free embedding attack and its k-NN reading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_reg.embedding_attack import embedding_attack, knn_predict


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())


def images(n=48, seed=0):
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_the_attack_moves_features_at_least_as_far_as_random_noise_of_the_same_size():
    result = embedding_attack(encoder(), images(), epsilon=8 / 255, steps=10)
    assert bool((result.relative_deviation >= result.random_deviation - 1e-6).all())
    assert result.mean > result.random_mean


def test_more_steps_find_at_least_as_large_a_deviation():
    enc, x = encoder(), images()
    few = embedding_attack(enc, x, epsilon=8 / 255, steps=2)
    many = embedding_attack(enc, x, epsilon=8 / 255, steps=20)
    assert many.mean >= few.mean - 1e-6


def test_deviations_are_relative_to_the_clean_features_spread():
    enc, x = encoder(), images()
    result = embedding_attack(enc, x, epsilon=8 / 255, steps=3)
    scaled = nn.Sequential(enc, _Scale(10.0))
    torch.testing.assert_close(
        embedding_attack(scaled, x, epsilon=8 / 255, steps=3).mean, result.mean, rtol=1e-4, atol=0
    )
    assert result.p95 >= result.mean * 0.5 and result.p95 <= result.relative_deviation.max().item()


class _Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_a_radius_of_zero_moves_nothing_and_changes_no_knn_prediction():
    enc, x = encoder(), images()
    result = embedding_attack(enc, x, epsilon=0.0, steps=3)
    assert result.mean == 0.0
    train = enc.eval()(images(64, seed=1)).detach()
    assert result.knn_changed(train, torch.arange(64) % 3, k=5) == 0.0


def test_the_encoders_mode_statistics_and_the_callers_rng_are_left_as_they_were():
    enc = encoder().train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    state = torch.get_rng_state()
    embedding_attack(enc, images(), epsilon=8 / 255, steps=3)
    assert enc.training and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())
    assert all(p.grad is None for p in enc.parameters())


def test_the_same_seed_gives_the_same_attack():
    enc, x = encoder(), images()
    a = embedding_attack(enc, x, epsilon=8 / 255, steps=3, seed=4)
    b = embedding_attack(enc, x, epsilon=8 / 255, steps=3, seed=4)
    assert torch.equal(a.relative_deviation, b.relative_deviation)


def test_knn_predicts_the_label_of_the_nearest_neighbours_by_cosine():
    train = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert knn_predict(train, labels, torch.tensor([[5.0, 1.0], [1.0, 5.0]]), k=2).tolist() == [0, 1]


def test_a_knn_k_beyond_the_training_set_is_refused_by_name():
    with pytest.raises(ValueError, match="k must"):
        knn_predict(torch.rand(3, 2), torch.arange(3), torch.rand(2, 2), k=4)


@pytest.mark.parametrize("kwargs, named", [(dict(epsilon=8.0), "epsilon"), (dict(epsilon=0.1, norm="l3"), "norm")])
def test_a_bad_radius_or_norm_is_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=named):
        embedding_attack(encoder(), images(), **kwargs)


def test_inputs_outside_the_bounds_are_refused():
    with pytest.raises(ValueError, match="bounds"):
        embedding_attack(encoder(), images() * 3, epsilon=8 / 255)
