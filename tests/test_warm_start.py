"""PerturbationMemory and the regulariser's start=memory.at(index, geometry): a warm start kept per training sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_reg import (
    BackboneRobustnessRegularizer,
    PerturbationMemory,
    RobustnessRegularizer,
    ThreatModel,
    crop_geometry,
)

from helpers import Counting, small_cnn


def batch(n=8, seed=0):
    torch.manual_seed(seed)
    return small_cnn(), torch.rand(n, 1, 28, 28) * 0.8 + 0.1, torch.rand(n, 16)


def positive_reg(threat=None, **options):
    epsilon = None if threat is not None else 0.1
    return RobustnessRegularizer(
        epsilon, threat=threat, steps=2, step_size=0.03, ascent="positive", normalize_features=True, **options
    )


def test_the_memory_holds_where_each_ascent_ended_in_pixel_units():
    encoder, x, positive = batch()
    mean, std = (0.4,), (0.2,)
    reg = positive_reg(threat=ThreatModel(0.1, mean=mean, std=std))
    model_x = (x - 0.4) / 0.2
    memory, index = PerturbationMemory(), torch.tensor([3, 0, 9, 4, 7, 1, 12, 5])
    out = reg(encoder, model_x, positive=positive, start=memory.at(index))
    expected = reg.threat.to_pixels(out.adversarial_inputs) - x
    torch.testing.assert_close(memory.read(index, x), expected, atol=1e-6, rtol=0)
    assert expected.abs().max() > 0.05  # it moved


def test_a_memory_call_starts_where_the_stored_perturbation_says():
    encoder, x, positive = batch()
    reg, memory, index = positive_reg(), PerturbationMemory(num_samples=20), torch.arange(8) * 2
    reg(encoder, x, positive=positive, start=memory.at(index))
    stored = memory.read(index, x)
    warm = reg(encoder, x, positive=positive, start=memory.at(index))
    given = reg(encoder, x, positive=positive, start=stored)
    assert torch.equal(warm.adversarial_inputs, given.adversarial_inputs)
    torch.testing.assert_close(memory.read(index, x), given.adversarial_inputs - x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("random_start", [True, False])
def test_samples_not_stored_yet_start_as_the_regulariser_is_configured(random_start):
    encoder, x, positive = batch()
    reg = positive_reg(random_start=random_start)
    torch.manual_seed(5)
    plain = reg(encoder, x, positive=positive)
    torch.manual_seed(5)
    cold = reg(encoder, x, positive=positive, start=PerturbationMemory().at(torch.arange(8)))
    assert torch.equal(cold.adversarial_inputs, plain.adversarial_inputs)


def test_the_deviation_ascent_leaves_x_on_a_samples_first_visit():
    # Its gradient is zero at x: a zero start would store zeros for ever.
    encoder, x, _ = batch()
    memory = PerturbationMemory()
    BackboneRobustnessRegularizer(0.1, steps=2)(encoder, x, start=memory.at(torch.arange(8)))
    assert (memory.read(torch.arange(8), x).flatten(1).abs().amax(dim=1) > 0).all()


def test_only_the_batchs_samples_are_stored_and_the_memory_grows_to_the_largest_index():
    encoder, x, positive = batch()
    memory = PerturbationMemory()
    index = torch.tensor([40, 2, 3, 5, 8, 13, 21, 34])
    positive_reg()(encoder, x, positive=positive, start=memory.at(index))
    assert len(memory) == 41 and memory.sample_shape == (1, 28, 28)
    assert memory.is_stored(torch.tensor([40, 2, 0, 1, 39, 100])).tolist() == [True, True, False, False, False, False]
    positive_reg()(encoder, x, positive=positive, start=memory.at(index + 60))
    assert len(memory) == 101 and memory.is_stored(index).all() and memory.is_stored(index + 60).all()
    assert memory.nbytes == 101 * 28 * 28 * 4


def test_a_half_precision_memory_returns_the_batchs_dtype_within_its_precision():
    encoder, x, positive = batch()
    full, half, index = PerturbationMemory(), PerturbationMemory(dtype=torch.float16), torch.arange(8)
    for memory in (full, half):
        torch.manual_seed(0)
        positive_reg()(encoder, x, positive=positive, start=memory.at(index))
    read = half.read(index, x)
    assert read.dtype == torch.float32 and half.nbytes * 2 == full.nbytes
    torch.testing.assert_close(read, full.read(index, x), atol=1e-4, rtol=1e-3)


def test_the_state_dict_resumes_the_memory():
    encoder, x, positive = batch()
    memory, index = PerturbationMemory(num_samples=10), torch.arange(8)
    positive_reg()(encoder, x, positive=positive, start=memory.at(index))
    resumed = PerturbationMemory(num_samples=10)
    resumed.load_state_dict(memory.state_dict())
    assert torch.equal(resumed.read(index, x), memory.read(index, x))
    assert resumed.is_stored(torch.arange(10)).tolist() == [True] * 8 + [False] * 2
    with pytest.raises(ValueError, match="num_samples=10"):
        PerturbationMemory(num_samples=11).load_state_dict(memory.state_dict())


def test_reset_forgets_every_sample():
    encoder, x, positive = batch()
    memory = PerturbationMemory()
    positive_reg()(encoder, x, positive=positive, start=memory.at(torch.arange(8)))
    memory.reset()
    assert len(memory) == 0 and not memory.is_stored(torch.arange(8)).any()


@pytest.mark.parametrize(
    "memory, index, error, match",
    [
        (PerturbationMemory(), torch.arange(8.0), TypeError, "index must be an integer tensor"),
        (PerturbationMemory(), torch.ones(8, dtype=torch.bool), TypeError, "index must be an integer tensor"),
        (PerturbationMemory(), [0, 1, 2, 3, 4, 5, 6, 7], TypeError, "index must be an integer tensor"),
        (PerturbationMemory(), torch.arange(7), ValueError, r"index must have one entry per sample, shape \(8,\)"),
        (PerturbationMemory(), torch.arange(8).view(2, 4), ValueError, "index must have one entry per sample"),
        (PerturbationMemory(), torch.arange(8) - 1, ValueError, "index must be non-negative"),
        (PerturbationMemory(num_samples=5), torch.arange(8), ValueError, "index must be below num_samples=5"),
        (None, torch.arange(8), ValueError, "index is only used with memory="),
        (PerturbationMemory(), None, ValueError, "memory needs index="),
        (torch.zeros(8, 1, 28, 28), torch.arange(8), TypeError, "memory must be a PerturbationMemory"),
    ],
)
@pytest.mark.filterwarnings("ignore:reg\\(.*deprecated:DeprecationWarning")  # 0.2's spelling: its own errors too
def test_a_bad_memory_or_index_is_refused_by_name_before_any_forward(memory, index, error, match):
    _, x, positive = batch()
    encoder = Counting(small_cnn())
    with pytest.raises(error, match=match):
        positive_reg()(encoder, x, positive=positive, memory=memory, index=index)
    assert encoder.calls == 0
    if isinstance(memory, PerturbationMemory):
        assert len(memory) == 0


def test_start_and_memory_together_are_refused():
    encoder, x, positive = batch()
    with pytest.raises(ValueError, match="either start= or memory="):
        positive_reg()(
            encoder, x, positive=positive, start=torch.zeros_like(x), memory=PerturbationMemory(), index=torch.arange(8)
        )


def test_a_view_of_another_size_than_the_stored_ones_is_refused_by_name():
    encoder, x, positive = batch()
    memory = PerturbationMemory()
    positive_reg()(encoder, x, positive=positive, start=memory.at(torch.arange(8)))
    with pytest.raises(ValueError, match=r"memory holds perturbations of shape \(1, 28, 28\)"):
        positive_reg()(encoder, x[..., :24, :24], positive=positive, start=memory.at(torch.arange(8)))


class FailsAfter(nn.Module):
    def __init__(self, encoder: nn.Module, calls: int) -> None:
        super().__init__()
        self.encoder, self.left = encoder, calls

    def forward(self, x):
        if self.left == 0:
            raise RuntimeError("boom")
        self.left -= 1
        return self.encoder(x)


def test_a_call_that_fails_writes_nothing_to_the_memory():
    _, x, positive = batch()
    memory, index = PerturbationMemory(), torch.arange(8)
    with pytest.raises(RuntimeError, match="boom"):
        positive_reg()(FailsAfter(small_cnn(), 2), x, positive=positive, start=memory.at(index))
    assert not memory.is_stored(index).any()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_samples": 0}, ValueError, "num_samples must be a positive int or None"),
        ({"num_samples": 2.5}, ValueError, "num_samples must be a positive int or None"),
        ({"num_samples": True}, ValueError, "num_samples must be a positive int or None"),
        ({"dtype": torch.int8}, TypeError, "dtype must be a floating-point torch.dtype"),
    ],
)
def test_bad_memory_settings_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        PerturbationMemory(**kwargs)


# --- geometry=: the perturbation kept in image coordinates and moved with each view's crop ---

BOXES = torch.tensor([[0, 0, 28, 28], [4, 2, 20, 24], [7, 7, 14, 14], [0, 10, 18, 18]] * 2)  # (top, left, h, w)
FLIPS = torch.tensor([False, False, True, False, True, False, False, True])


def views(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def smooth_perturbation(n=8, seed=3):
    # Smooth, so two bilinear resamplings barely change it.
    torch.manual_seed(seed)
    return F.interpolate(torch.rand(n, 1, 7, 7) * 0.2 - 0.1, size=(28, 28), mode="bilinear")


def test_crop_geometry_cuts_the_box_torchvisions_get_params_describes():
    image = torch.rand(1, 3, 20, 30)
    theta = crop_geometry(torch.tensor([[3, 5, 10, 12]]), (20, 30))
    cut = F.grid_sample(image, F.affine_grid(theta, [1, 3, 10, 12], align_corners=False), align_corners=False)
    torch.testing.assert_close(cut, image[:, :, 3:13, 5:17], atol=1e-5, rtol=0)


def test_crop_geometry_flips_the_view_horizontally():
    image = torch.rand(1, 3, 20, 30)
    theta = crop_geometry(torch.tensor([[3, 5, 10, 12]]), (20, 30), flipped=torch.tensor([True]))
    cut = F.grid_sample(image, F.affine_grid(theta, [1, 3, 10, 12], align_corners=False), align_corners=False)
    torch.testing.assert_close(cut, image[:, :, 3:13, 5:17].flip(-1), atol=1e-5, rtol=0)


def test_crop_geometry_takes_one_image_size_per_crop():
    per_crop = crop_geometry(torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]]), torch.tensor([[10, 10], [20, 40]]))
    assert per_crop[0, 0, 0] == 1 and per_crop[1, 0, 0] == 0.25 and per_crop[1, 1, 1] == 0.5


@pytest.mark.parametrize(
    "args, error, match",
    [
        (([0, 0, 4, 4], (8, 8)), TypeError, "boxes must be an"),
        ((torch.zeros(2, 3), (8, 8)), ValueError, r"boxes must have shape \(N, 4\)"),
        ((torch.tensor([[0, 0, 4, 4]]), 8), ValueError, "image_size must be"),
        ((torch.tensor([[0, 0, 4, 4]]), torch.tensor([[8, 8], [8, 8]])), ValueError, "image_size must be"),
        ((torch.tensor([[0, 0, 0, 4]]), (8, 8)), ValueError, "positive height and width"),
        ((torch.tensor([[0, 0, 4, 4]]), (8, 8), [True]), TypeError, "flipped must be"),
        ((torch.tensor([[0, 0, 4, 4]]), (8, 8), torch.tensor([True, False])), ValueError, r"flipped must have shape"),
    ],
)
def test_bad_crops_are_refused_by_name(args, error, match):
    with pytest.raises(error, match=match):
        crop_geometry(*args)


def test_a_perturbation_written_through_a_crop_reads_back_through_the_same_crop():
    theta = crop_geometry(BOXES, (28, 28), FLIPS)
    image_frame = smooth_perturbation()
    memory, index = PerturbationMemory(), torch.arange(8)
    seen = views(image_frame, theta)
    memory.write(index, seen, geometry=theta)
    back = memory.read(index, seen, geometry=theta)
    assert (back - seen).abs().mean() < 0.1 * seen.abs().mean()


def test_the_image_outside_a_crop_keeps_what_it_held():
    memory, index = PerturbationMemory(), torch.arange(8)
    whole = crop_geometry(torch.tensor([[0, 0, 28, 28]] * 8), (28, 28))
    memory.write(index, torch.full((8, 1, 28, 28), 0.05), geometry=whole)
    corner = crop_geometry(torch.tensor([[0, 0, 14, 14]] * 8), (28, 28))
    memory.write(index, torch.full((8, 1, 28, 28), -0.05), geometry=corner)
    image = memory._rows(index, torch.zeros(8, 1, 28, 28))[0]  # as kept: the image frame
    assert torch.allclose(image[..., :13, :13], torch.tensor(-0.05))
    assert torch.allclose(image[..., 15:, :], torch.tensor(0.05)) and torch.allclose(
        image[..., :, 15:], torch.tensor(0.05)
    )


def test_a_geometry_call_starts_where_the_stored_perturbation_seen_through_the_crop_says():
    encoder, x, positive = batch()
    theta = crop_geometry(BOXES, (28, 28), FLIPS)
    reg, memory, index = positive_reg(), PerturbationMemory(), torch.arange(8) + 3
    reg(encoder, x, positive=positive, start=memory.at(index, theta))
    later = crop_geometry(BOXES.roll(1, dims=0), (28, 28))  # the next epoch's crops
    through = memory.read(index, x, geometry=later)
    warm = reg(encoder, x, positive=positive, start=memory.at(index, later))
    given = reg(encoder, x, positive=positive, start=through)
    assert through.abs().mean() > 0.01
    assert torch.equal(warm.adversarial_inputs, given.adversarial_inputs)


def test_a_cold_geometry_call_is_the_configured_ascent():
    encoder, x, positive = batch()
    theta = crop_geometry(BOXES, (28, 28), FLIPS)
    torch.manual_seed(5)
    plain = positive_reg()(encoder, x, positive=positive)
    torch.manual_seed(5)
    cold = positive_reg()(encoder, x, positive=positive, start=PerturbationMemory().at(torch.arange(8), theta))
    assert torch.equal(cold.adversarial_inputs, plain.adversarial_inputs)


@pytest.mark.parametrize("first, then", [(True, False), (False, True)])
def test_a_memory_keeps_one_frame_and_refuses_the_other_before_any_forward(first, then):
    _, x, positive = batch()
    theta = crop_geometry(BOXES, (28, 28))
    memory, index = PerturbationMemory(), torch.arange(8)
    positive_reg()(small_cnn(), x, positive=positive, start=memory.at(index, theta if first else None))
    before = memory.state_dict()["data"].clone()
    encoder = Counting(small_cnn())
    with pytest.raises(ValueError, match="pass geometry= with every call or with none"):
        positive_reg()(encoder, x, positive=positive, start=memory.at(index, theta if then else None))
    assert encoder.calls == 0 and torch.equal(memory.state_dict()["data"], before)


@pytest.mark.parametrize(
    "geometry, memory, error, match",
    [
        (torch.zeros(8, 2, 2), PerturbationMemory(), ValueError, r"geometry must have shape \(8, 2, 3\)"),
        (torch.zeros(8, 2, 3, dtype=torch.long), PerturbationMemory(), TypeError, "geometry must be a floating-point"),
        (torch.full((8, 2, 3), float("nan")), PerturbationMemory(), ValueError, "geometry must be finite"),
        (torch.zeros(8, 2, 3), PerturbationMemory(), ValueError, "invertible"),
        (torch.zeros(8, 2, 3), None, ValueError, "geometry is only used with memory="),
    ],
)
@pytest.mark.filterwarnings("ignore:reg\\(.*deprecated:DeprecationWarning")  # 0.2's spelling: its own errors too
def test_a_bad_geometry_is_refused_by_name_before_any_forward(geometry, memory, error, match):
    _, x, positive = batch()
    encoder = Counting(small_cnn())
    index = None if memory is None else torch.arange(8)
    with pytest.raises(error, match=match):
        positive_reg()(encoder, x, positive=positive, memory=memory, index=index, geometry=geometry)
    assert encoder.calls == 0


def test_geometry_needs_a_batch_of_images():
    memory = PerturbationMemory()
    with pytest.raises(ValueError, match=r"geometry needs a batch of images \(N, C, H, W\)"):
        memory.write(torch.arange(8), torch.zeros(8, 16), geometry=torch.zeros(8, 2, 3))


def test_the_state_dict_keeps_the_frame():
    memory = PerturbationMemory()
    theta = crop_geometry(BOXES, (28, 28))
    memory.write(torch.arange(8), smooth_perturbation(), geometry=theta)
    resumed = PerturbationMemory()
    resumed.load_state_dict(memory.state_dict())
    with pytest.raises(ValueError, match="image coordinates"):
        resumed.read(torch.arange(8), torch.zeros(8, 1, 28, 28))
    torch.testing.assert_close(
        resumed.read(torch.arange(8), torch.zeros(8, 1, 28, 28), geometry=theta),
        memory.read(torch.arange(8), torch.zeros(8, 1, 28, 28), geometry=theta),
    )
