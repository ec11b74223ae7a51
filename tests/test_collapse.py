"""CollapseMonitor: the training attack against a stronger one on a fixed batch, a warning when they part."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robust_reg import CollapseMonitor, RobustnessRegularizer


def linear_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16))


def batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(64, 1, 8, 8)


def test_a_collapsed_training_attack_is_flagged_and_warned_about_once():
    # Constructed collapse: the training attack's single step is far too small to leave the random start,
    # so it finds a fraction of what ten steps find (the symptom of catastrophic overfitting).
    monitor = CollapseMonitor(RobustnessRegularizer(0.1, steps=1, step_size=0.001), batch())
    with pytest.warns(RuntimeWarning, match=r"training attack .* stronger one .*catastrophic overfitting"):
        report = monitor(linear_encoder(), epoch=3)
    assert report.collapsed and report.ratio > 2 and report.epoch == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor(linear_encoder(), epoch=4).collapsed  # recorded again, warned once


class _MovesOnlyInsideTheBall(nn.Module):
    """A constructed collapse of a single-step run: the features move only while every pixel stays within eps of
    its clean image, so N-FGSM's noisy point (2 eps of noise) mostly sees a flat encoder and its step finds little,
    while small steps inside the ball find the whole move."""

    def __init__(self, clean: torch.Tensor, epsilon: float) -> None:
        super().__init__()
        self.clean, self.epsilon = clean, epsilon
        torch.manual_seed(0)
        self.linear = nn.Linear(clean[0].numel(), 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.clean
        inside = d * (d.abs() <= self.epsilon * (1 + 1e-4))
        return self.linear(self.clean.flatten(1)) + 20 * self.linear(inside.flatten(1))


def test_a_collapsed_n_fgsm_step_is_flagged_with_the_multi_step_fix():
    images = batch()
    monitor = CollapseMonitor(RobustnessRegularizer(0.1, inner="n-fgsm"), images)
    with pytest.warns(RuntimeWarning, match=r"catastrophic overfitting.*inner='pgd'"):
        report = monitor(_MovesOnlyInsideTheBall(images, 0.1))
    assert report.collapsed and report.ratio > 2


def test_a_collapsed_pgd_step_is_warned_about_with_more_steps_as_the_fix():
    monitor = CollapseMonitor(RobustnessRegularizer(0.1, steps=1, step_size=0.001), batch())
    with pytest.warns(RuntimeWarning, match=r"more ascent steps \(steps=\)"):
        monitor(linear_encoder())


def test_the_default_step_is_not_flagged():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = CollapseMonitor(RobustnessRegularizer(0.1), batch())(linear_encoder())
    assert not report.collapsed and report.ratio < 1.5


def test_each_check_is_recorded():
    monitor = CollapseMonitor(RobustnessRegularizer(0.1), batch())
    for epoch in range(3):
        monitor(linear_encoder(), epoch=epoch)
    assert [r.epoch for r in monitor.history] == [0, 1, 2]


def test_the_encoder_and_the_random_state_are_left_as_they_were():
    monitor = CollapseMonitor(RobustnessRegularizer(0.1), batch())
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).train()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    rng = torch.get_rng_state()
    monitor(encoder)
    assert encoder.training and all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    "regularizer, images, options, error, match",
    [
        ("not a regulariser", batch(), {}, TypeError, "regularizer must be a RobustnessRegularizer"),
        (None, batch()[:1], {}, ValueError, "at least 2 samples"),
        (None, batch(), {"tolerance": 1.0}, ValueError, "tolerance must be a number > 1"),
        (None, batch(), {"strong_steps": 0}, ValueError, "strong_steps must be an int >= 1"),
        (None, batch() * 255, {}, ValueError, "bounds"),
    ],
)
def test_bad_arguments_are_refused_by_name(regularizer, images, options, error, match):
    with pytest.raises(error, match=match):
        CollapseMonitor(regularizer or RobustnessRegularizer(0.1), images, **options)


def test_a_sound_n_fgsm_step_finds_more_than_the_stronger_attack_in_the_epsilon_ball():
    # N-FGSM's step reaches 3 eps; the stronger attack searches the threat's eps-ball, the robustness claimed.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = CollapseMonitor(RobustnessRegularizer(0.1, inner="n-fgsm"), batch())(linear_encoder())
    assert not report.collapsed and report.ratio < 1
