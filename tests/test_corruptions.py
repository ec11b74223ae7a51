"""CIFAR-10-C-style corruptions: in range, reproducible, CIFAR-10-C's definitions, harder with severity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_reg import fit_linear_probe
from robust_reg.corruptions import CORRUPTIONS, STANDARD, corrupt, corruption_accuracy

RANDOM = [n for n in CORRUPTIONS if n in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "fog")]


def rgb(n=4, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("severity", [1, 5])
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_keeps_pixels_in_range_shape_and_dtype(name, severity):
    x = rgb()
    out = corrupt(x, name, severity)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_is_reproducible_under_its_seed(name):
    x = rgb()
    assert torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7))


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_differ_between_seeds(name):
    x = rgb()
    assert not torch.equal(corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=2))


def test_corrupting_leaves_the_callers_rng_untouched():
    x = rgb()
    state = torch.get_rng_state()
    for name in CORRUPTIONS:
        corrupt(x, name, 5)
    assert torch.equal(torch.get_rng_state(), state)


def test_outputs_are_eight_bit_like_cifar10c_files():
    out = corrupt(rgb(), "gaussian_noise", 2)
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)


def test_contrast_is_cifar10c_formula():
    x = rgb()
    m = x.mean(dim=(2, 3), keepdim=True)
    expected = torch.floor(((x - m) * 0.4 + m).clamp(0, 1) * 255 + 1e-6) / 255
    torch.testing.assert_close(corrupt(x, "contrast", 3), expected)


@pytest.mark.parametrize("name, severity", [("brightness", 4), ("saturate", 2), ("saturate", 5)])
def test_hsv_corruptions_match_a_reference_hsv_round_trip(name, severity):
    colors = pytest.importorskip("matplotlib.colors")
    x = rgb(2, 8)
    hsv = colors.rgb_to_hsv(x.permute(0, 2, 3, 1).double().numpy())
    if name == "brightness":
        hsv[..., 2] = (hsv[..., 2] + (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]).clip(0, 1)
    else:
        a, b = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))[severity - 1]
        hsv[..., 1] = (hsv[..., 1] * a + b).clip(0, 1)
    expected = torch.from_numpy(colors.hsv_to_rgb(hsv)).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(corrupt(x, name, severity), expected, atol=1 / 255 + 1e-5, rtol=0)


def test_grayscale_brightness_adds_to_the_value():
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(corrupt(x, "brightness", 5), torch.floor((x + 0.3).clamp(0, 1) * 255 + 1e-6) / 255)


def test_blur_keeps_a_constant_image_constant():
    x = torch.full((1, 3, 32, 32), 0.4)
    for name in ("defocus_blur", "gaussian_blur", "zoom_blur"):
        torch.testing.assert_close(corrupt(x, name, 5), torch.floor(x * 255 + 1e-6) / 255)


def test_a_colour_corruption_on_grayscale_is_refused_by_name():
    with pytest.raises(ValueError, match="saturate"):
        corrupt(torch.rand(2, 1, 8, 8), "saturate", 1)


@pytest.mark.parametrize(
    "args, named",
    [
        (("nope", 1), "corruption"),
        (("fog", 0), "severity"),
        (("fog", 6), "severity"),
    ],
)
def test_a_bad_corruption_or_severity_is_refused_by_name(args, named):
    with pytest.raises(ValueError, match=named):
        corrupt(rgb(), *args)


def test_pixels_outside_zero_one_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="mean= and std="):
        corrupt(rgb() * 2 - 1, "fog", 1)


@pytest.fixture(scope="module")
def digits_model():
    """A linear classifier on sklearn's 8x8 digits (real images, offline), with its test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(d.target)
    encoder = nn.Flatten()
    head = fit_linear_probe(encoder, [(x[:1200], y[:1200])], 10)
    return nn.Sequential(encoder, head), x[1200:], y[1200:]


def test_severity_five_lowers_a_trained_models_accuracy_more_than_severity_one(digits_model):
    model, x, y = digits_model
    result = corruption_accuracy(model, x, y, severities=(1, 5))
    by_severity = result.by_severity()
    assert by_severity[5] < by_severity[1] <= result.clean_accuracy + 0.02
    assert result.clean_accuracy > 0.9


def test_grayscale_images_get_the_corruptions_that_apply(digits_model):
    model, x, y = digits_model
    result = corruption_accuracy(model, x, y, corruptions=[*STANDARD, "saturate"], severities=(1,))
    assert result.skipped == ("saturate",)
    assert set(result.by_corruption()) == set(STANDARD)


def test_corruption_accuracy_leaves_the_model_and_rng_as_they_were(digits_model):
    model, x, y = digits_model
    model.train()
    state = torch.get_rng_state()
    corruption_accuracy(model, x[:50], y[:50], corruptions=["gaussian_noise"], severities=(1,))
    assert model.training and torch.equal(torch.get_rng_state(), state)
    model.eval()


def test_normalised_inputs_are_corrupted_in_pixel_space():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    x, y = rgb(8, 8), torch.randint(0, 2, (8,))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    normalised = (x - 0.5) / 0.25
    plain = corruption_accuracy(nn.Sequential(_Normalise(mean, std), model), x, y, corruptions=["fog"])
    given = corruption_accuracy(model, normalised, y, corruptions=["fog"], mean=mean, std=std)
    assert plain.accuracies == given.accuracies


class _Normalise(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std
