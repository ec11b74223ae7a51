"""The annealed augmentation schedule: DynACL's strength, the batch augmentation at a strength, the lightly callback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from robust_reg.augmentation import augmentation_strength
from robust_reg.demo.augment import default_augment


def test_the_strength_falls_from_one_in_steps_of_five_percent_of_the_run():
    strengths = [augmentation_strength(e, 1000) for e in range(1000)]
    assert strengths[0] == strengths[49] == 1.0
    assert strengths[50] == pytest.approx(0.95) and strengths[999] == pytest.approx(0.05)
    assert len(set(strengths)) == 20 and strengths == sorted(strengths, reverse=True)


def test_a_short_run_refreshes_at_least_every_epoch_and_falls_towards_final():
    assert [augmentation_strength(e, 5) for e in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert augmentation_strength(4, 5, final=0.5) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "args, kwargs, named",
    [
        ((0, 0), {}, "epochs"),
        ((5, 5), {}, "epoch"),
        ((-1, 5), {}, "epoch"),
        ((0, 5), {"refresh": 0.0}, "refresh"),
        ((0, 5), {"final": 1.5}, "final"),
    ],
)
def test_a_bad_schedule_argument_is_refused_by_name(args, kwargs, named):
    with pytest.raises(ValueError, match=named):
        augmentation_strength(*args, **kwargs)


def test_the_batch_augmentation_scales_jitter_grayscale_and_crop_area_with_strength():
    full = default_augment("cifar10")
    half = full.with_strength(0.5)
    assert (half.jitter, half.jitter_p, half.gray_p) == pytest.approx((0.2, 0.4, 0.1))
    assert half.scale == pytest.approx((0.6, 1.0)) and half.flip == full.flip
    none = full.with_strength(0.0)
    assert (none.jitter, none.jitter_p, none.gray_p, none.scale) == (0.0, 0.0, 0.0, (1.0, 1.0))


def test_full_strength_is_the_augmentation_as_built():
    full = default_augment("cifar10")
    again = full.with_strength(1.0)
    x = torch.rand(4, 3, 16, 16)
    torch.manual_seed(0)
    a = full(x)
    torch.manual_seed(0)
    assert torch.equal(a, again(x))


def test_a_strength_outside_zero_one_is_refused_by_name():
    with pytest.raises(ValueError, match="strength"):
        default_augment("cifar10").with_strength(1.5)


def test_the_lightly_callback_hands_each_epochs_strength_to_the_users_function():
    pytest.importorskip("lightly")
    from robust_reg.integrations.lightly import annealed_augmentation

    seen = []
    callback = annealed_augmentation(seen.append)
    for epoch in (0, 2, 29):
        callback.on_train_epoch_start(SimpleNamespace(max_epochs=30, current_epoch=epoch), None)
    assert seen == pytest.approx([1.0, 1 - 2 / 30, 1 - 28 / 30])


def test_the_lightly_callback_is_a_lightning_callback_and_needs_max_epochs():
    pytest.importorskip("lightly")
    from pytorch_lightning import Callback

    from robust_reg.integrations.lightly import annealed_augmentation

    callback = annealed_augmentation(print)
    assert isinstance(callback, Callback)
    with pytest.raises(ValueError, match="max_epochs"):
        callback.on_train_epoch_start(SimpleNamespace(max_epochs=-1, current_epoch=0), None)


def test_the_lightly_callback_refuses_a_bad_schedule_before_training():
    pytest.importorskip("lightly")
    from robust_reg.integrations.lightly import annealed_augmentation

    with pytest.raises(ValueError, match="refresh"):
        annealed_augmentation(print, refresh=2.0)
    with pytest.raises(TypeError, match="set_strength"):
        annealed_augmentation(0.5)


class _RecordingAugment:
    """A batch augmentation that records the strengths it is rebuilt at (views: the batch plus noise)."""

    def __init__(self, seen: list, strength: float = 1.0) -> None:
        self.seen, self.strength = seen, strength

    def with_strength(self, strength: float) -> _RecordingAugment:
        self.seen.append(strength)
        return _RecordingAugment(self.seen, strength)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 0.01 * torch.randn_like(x)).clamp(0, 1)


@pytest.mark.parametrize(
    "options, annealed", [({}, True), ({"anneal_augmentation": False}, False), ({"robust": False}, False)],
    ids=["robust-default", "constant", "plain-ssl"],
)  # fmt: skip
def test_the_demos_robust_step_anneals_the_augmentation_once_per_strength_and_plain_ssl_never(options, annealed):
    from robust_reg.demo.models import build_encoder
    from robust_reg.demo.training import TrainConfig, build_model, recommended_step

    torch.manual_seed(0)
    model = build_model("simclr", build_encoder("cnn", 1), (1, 28, 28))
    config = TrainConfig(epochs=30, batch_size=8, epsilon=0.1, **options)
    step, seen = recommended_step(config), []
    augment = _RecordingAugment(seen)
    for epoch in (0, 0, 2, 29):
        step(model, torch.rand(8, 1, 28, 28), torch.arange(8), epoch, augment)
    assert seen == (pytest.approx([1.0, 1 - 2 / 30, 1 - 28 / 30]) if annealed else [])


def test_the_demos_default_regulariser_is_the_packages_default():
    from robust_reg import RobustnessRegularizer
    from robust_reg.demo.training import TrainConfig

    config = TrainConfig()
    assert config.steps is None and config.anneal_augmentation
    assert RobustnessRegularizer(config.epsilon, steps=config.steps).inner == "n-fgsm"
