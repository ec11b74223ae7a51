"""Arrays the user already has (.npz), the CIFAR-10 subset, and the settings each kind of data gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robust_reg.demo.augment import default_augment
from robust_reg.demo.data import ImageData, load_dataset, load_npz
from robust_reg.demo.pipeline import EvalConfig, label_sets
from robust_reg.demo.training import training_defaults


def _arrays(n_train=20, n_test=8, channels=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, channels), dtype=np.uint8),
        "y_train": np.arange(n_train) % 10,
        "x_test": rng.integers(0, 256, (n_test, 32, 32, channels), dtype=np.uint8),
        "y_test": np.arange(n_test) % 10,
    }


def _write(tmp_path, **changes) -> str:
    arrays = {**_arrays(), **changes}
    path = tmp_path / "data.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def test_uint8_hwc_arrays_load_as_contiguous_nchw_pixels(tmp_path):
    arrays = _arrays()
    data = load_npz(_write(tmp_path))
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_train.is_contiguous()
    assert torch.equal(data.x_train[3, :, 5, 7] * 255, torch.tensor(arrays["x_train"][3, 5, 7], dtype=torch.float32))
    assert data.y_train.dtype == torch.int64 and data.num_classes == 10 and data.kind == "natural"


def test_float_nchw_arrays_in_range_load_as_they_are(tmp_path):
    x = np.random.default_rng(1).random((20, 1, 8, 8)).astype(np.float32)
    data = load_npz(_write(tmp_path, x_train=x, x_test=x[:8]))
    assert torch.equal(data.x_train, torch.from_numpy(x)) and data.kind == "digits"


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"y_test": None}, "lacks y_test"),
        ({"x_train": np.zeros((20, 32, 32, 3), dtype=np.int32)}, "x_train has dtype int32"),
        (
            {"x_train": np.zeros((20, 3, 32, 32), dtype=np.uint8)},
            r"x_train has dtype uint8 and shape \(20, 3, 32, 32\)",
        ),
        ({"x_test": np.full((8, 3, 32, 32), 2.0, dtype=np.float32)}, "x_test holds floats outside"),
        ({"x_test": np.zeros((8, 28, 28, 3), dtype=np.uint8)}, "x_train images are"),
        ({"y_train": np.arange(19)}, r"y_train must be 20 integer class indices"),
        ({"y_train": np.linspace(0, 1, 20)}, "y_train must be 20 integer"),
        ({"y_test": -np.ones(8, dtype=np.int64)}, "y_test has a negative label"),
        ({"y_train": np.zeros(20, dtype=np.int64)}, "y_train must hold >= 2 classes"),
        ({"y_test": np.full(8, 12)}, "y_test none beyond them"),
    ],
)
def test_each_bad_array_is_refused_naming_the_file_and_the_array(tmp_path, changes, match):
    path = _write(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as info:
        load_npz(path)
    assert path in str(info.value) or "lacks" in str(info.value)


def test_a_missing_file_names_data_path(tmp_path):
    with pytest.raises(ValueError, match="--data-path .*no such file"):
        load_npz(tmp_path / "nothing.npz")


@pytest.mark.parametrize("name", ["npz", "cifar10-subset"])
def test_npz_datasets_need_a_path(name):
    with pytest.raises(ValueError, match="pass its path"):
        load_dataset(name)


def test_the_cifar10_subset_name_refuses_a_file_that_is_not_cifar(tmp_path):
    x = np.zeros((20, 28, 28, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not hold CIFAR-10 images"):
        load_dataset("cifar10-subset", path=_write(tmp_path, x_train=x, x_test=x[:8]))


def test_a_cifar10_file_gets_cifars_settings_whatever_its_name(tmp_path):
    subset = load_dataset("cifar10-subset", path=_write(tmp_path))
    assert subset.kind == "cifar10"
    config = EvalConfig.for_data(subset)
    assert config.epsilons == (4 / 255, 8 / 255)
    assert config.label_sets == ("class", "animal-vs-vehicle", "coarse4")
    assert default_augment(subset.kind).flip == 0.5  # natural images are flipped, digits are not
    assert training_defaults(subset)["epsilon"] == 8 / 255


def test_a_users_rgb_npz_gets_natural_image_settings(tmp_path):
    data = load_dataset("npz", path=_write(tmp_path))
    config = EvalConfig.for_data(data)
    assert config.epsilons == (4 / 255, 8 / 255) and config.label_sets == ("class",)
    assert default_augment(data.kind).flip == 0.5 and training_defaults(data)["arch"] == "cnn"


def _cifar_like(labels) -> ImageData:
    y = torch.tensor(labels)
    return ImageData("cifar10-subset", torch.zeros(len(y), 3, 4, 4), y, torch.zeros(len(y), 3, 4, 4), y, 10, "cifar10")


def test_animal_vs_vehicle_puts_the_four_vehicle_classes_together():
    (y, _, k) = label_sets(_cifar_like(range(10)), ("animal-vs-vehicle",))["animal-vs-vehicle"]
    # airplane, automobile, ship, truck are vehicles (1); bird, cat, deer, dog, frog, horse animals (0)
    assert k == 2 and y.tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]


def test_coarse4_groups_land_vehicles_other_vehicles_mammals_other_animals():
    (y, _, k) = label_sets(_cifar_like(range(10)), ("coarse4",))["coarse4"]
    assert k == 4 and y.tolist() == [1, 0, 3, 2, 2, 2, 3, 2, 1, 0]


def test_cifar_groupings_are_refused_on_other_data():
    digits = ImageData("digits", torch.zeros(4, 1, 8, 8), torch.arange(4), torch.zeros(4, 1, 8, 8), torch.arange(4), 10)
    with pytest.raises(ValueError, match="group CIFAR-10's classes"):
        label_sets(digits, ("coarse4",))
