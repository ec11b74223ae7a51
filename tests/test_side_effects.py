"""Nothing the user owns changes: BN statistics, modes, requires_grad, existing .grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_reg import (
    BackboneRobustnessRegularizer,
    estimate_bound,
    fit_linear_probe,
    robustness_curve,
)

from helpers import assert_unchanged, small_cnn, snapshot


def with_user_state(model: nn.Module) -> nn.Module:
    """A model in a realistic, mixed state: trained BN stats, a frozen layer, an eval submodule, stale grads."""
    torch.manual_seed(3)
    model.train()
    for _ in range(3):
        model(torch.rand(8, 1, 12, 12)).sum().backward()
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = None
    model[4].eval()  # e.g. a frozen BN the user keeps in eval mode
    return model


# The clean start runs the clean pass inside the ascent (it is the first iterate): the same guard holds.
OPTIONS = pytest.mark.parametrize(
    "options", [{}, {"random_start": False, "ascent": "instance"}], ids=["default", "clean-start"]
)


@OPTIONS
def test_regulariser_leaves_bn_statistics_modes_flags_and_grads_bit_for_bit(images, options):
    model = with_user_state(small_cnn())
    before = snapshot(model)
    BackboneRobustnessRegularizer(0.1, steps=3, **options)(model, images)
    assert_unchanged(model, before)


def test_regulariser_leaves_an_eval_mode_encoder_in_eval_mode(images):
    model = small_cnn().eval()
    before = snapshot(model)
    BackboneRobustnessRegularizer(0.1)(model, images)
    assert_unchanged(model, before)


@OPTIONS
def test_backward_of_the_regulariser_only_adds_to_grads_and_never_to_bn_stats(images, options):
    model = with_user_state(small_cnn())
    before = snapshot(model)
    BackboneRobustnessRegularizer(0.1, **options)(model, images).loss.backward()
    buffers = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert all(torch.equal(v, before["state"][k]) for k, v in buffers.items())


class FailsOnCall(nn.Module):
    """Wraps an encoder and raises on the n-th forward."""

    def __init__(self, encoder: nn.Module, fail_at: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.encoder(x)  # BN has already run when we raise
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return out


@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_state_is_restored_when_the_encoder_raises_midway(images, fail_at):
    inner = with_user_state(small_cnn())
    model = FailsOnCall(inner, fail_at)
    before = snapshot(inner)
    with pytest.raises(RuntimeError, match="boom"):
        BackboneRobustnessRegularizer(0.1, steps=3)(model, images)
    assert_unchanged(inner, before)


def test_instance_norm_with_tracked_statistics_is_restored(images):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True), nn.Flatten())
    model(images)  # non-trivial running stats
    before = snapshot(model)
    BackboneRobustnessRegularizer(0.1)(model, images)
    assert_unchanged(model, before)


def test_bound_estimation_probe_and_curve_leave_the_models_untouched(digits):
    x, y = digits
    data = [(x[:64], y[:64]), (x[64:128], y[64:128])]
    encoder = with_user_state(small_cnn())
    before = snapshot(encoder)
    head = fit_linear_probe(encoder, data, num_classes=10, max_iter=20)
    head.train()
    head_before = snapshot(head)
    estimate_bound(encoder, head, data, epsilon=0.1, steps=2)
    robustness_curve(encoder, head, data, [0.0, 0.1], steps=1)
    assert_unchanged(encoder, before)
    assert_unchanged(head, head_before)


def test_inductor_compiled_encoder_gives_the_eager_value_and_keeps_bn_statistics(images):
    # torch.compile with the default (inductor) backend: the statistics switch must hold in compiled code too.
    torch.manual_seed(0)
    model = small_cnn()
    compiled = torch.compile(model)
    features = compiled(images)  # the user's own forward, which does update the statistics
    before = snapshot(model)
    torch.manual_seed(1)
    value = BackboneRobustnessRegularizer(0.1, steps=2)(compiled, images, features=features).loss
    assert_unchanged(model, before)
    torch.manual_seed(1)
    eager = BackboneRobustnessRegularizer(0.1, steps=2)(model, images).loss
    assert torch.allclose(value, eager, rtol=2e-3)
