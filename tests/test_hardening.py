"""harden: a label-free stage that makes a pretrained encoder robust, leaving the original untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_reg import ThreatModel, harden, projected_gradient_ascent
from robust_reg.finetune import FinetuneSchedule

FAST = FinetuneSchedule(epochs=2, lr=0.01, steps=2)


def small_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    )


def digits(n: int = 64, batch: int = 32) -> list[torch.Tensor]:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 16.0
    return list(x.split(batch))


def snapshot(module: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "modes": [m.training for m in module.modules()],
        "flags": [p.requires_grad for p in module.parameters()],
        "grads": [p.grad for p in module.parameters()],
    }


def assert_unchanged(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["modes"] == before["modes"] and after["flags"] == before["flags"]
    assert all(g is None for g in after["grads"])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_teacher_keeps_its_weights_batch_norm_statistics_modes_and_flags(mode):
    encoder = small_encoder().train(mode == "train")
    encoder[0].weight.requires_grad_(False)  # a frozen layer stays frozen in the caller's model
    before = snapshot(encoder)
    harden(encoder, digits(), epsilon=0.1, schedule=FAST)
    assert_unchanged(encoder, before)


def test_it_returns_a_trained_copy_in_eval_mode():
    encoder = small_encoder()
    robust = harden(encoder, digits(), epsilon=0.1, schedule=FAST)
    assert robust is not encoder and not robust.training
    assert any(not torch.equal(a, b) for a, b in zip(robust.parameters(), encoder.parameters()))
    assert all(p.grad is None for p in robust.parameters())


def pretrained_encoder(images: list[torch.Tensor]) -> nn.Module:
    """The small encoder with BatchNorm statistics of the data, as a pretrained one has."""
    encoder = small_encoder()
    encoder[1].momentum = None  # a cumulative average over the batches
    with torch.no_grad():
        for x in images:
            encoder.train()(x)
    return encoder.eval()


def worst_distance_from(teacher: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    """PGD-10 estimate of the mean worst-case distance of ``model``'s normalised features from ``teacher``'s clean
    ones at eps 0.1 (the stage's objective; a lower estimate of the worst case)."""
    with torch.no_grad():
        target = F.normalize(teacher(x).flatten(1), dim=1)

    def distance(inputs):
        return (F.normalize(model(inputs).flatten(1), dim=1) - target).pow(2).sum(dim=1)

    torch.manual_seed(1)
    x_adv = projected_gradient_ascent(distance, x, ThreatModel(0.1), steps=10)
    with torch.no_grad():
        return distance(x_adv).mean().item()


def test_the_hardened_copy_stays_closer_to_the_originals_clean_features_under_attack():
    images = digits(256)
    encoder = pretrained_encoder(images)
    robust = harden(encoder, images, epsilon=0.1, schedule=FinetuneSchedule(epochs=5, lr=0.02, steps=3))
    x = torch.cat(images)[:128]
    before, after = worst_distance_from(encoder, encoder, x), worst_distance_from(encoder, robust, x)
    assert after < 0.85 * before, (before, after)  # measured 0.0465 -> 0.0334


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_a_fixed_list_of_batches_has_the_teachers_features_computed_once_per_batch():
    teacher = Counting(small_encoder())
    harden(teacher, digits(), epsilon=0.1, schedule=FinetuneSchedule(epochs=3, lr=0.01, steps=1))
    assert teacher.calls == 2  # two batches, three epochs


def test_with_augmentation_the_teacher_sees_each_augmented_batch():
    teacher = Counting(small_encoder())
    harden(
        teacher,
        digits(),
        epsilon=0.1,
        schedule=FinetuneSchedule(epochs=3, lr=0.01, steps=1),
        augment=lambda x: x.flip(-1),
    )
    assert teacher.calls == 6


def test_the_ssl_loss_alongside_is_called_on_the_student_at_each_step():
    encoder, seen = small_encoder(), []

    def ssl_loss(student, x):
        seen.append(student is not encoder and student.training)
        return student(x).pow(2).mean()

    harden(encoder, digits(), epsilon=0.1, schedule=FAST, ssl_loss=ssl_loss)
    assert seen == [True] * 4


def test_labelled_batches_are_read_for_their_images():
    batches = [(x, torch.zeros(len(x), dtype=torch.long)) for x in digits()]
    assert not harden(small_encoder(), batches, epsilon=0.1, schedule=FAST).training


@pytest.mark.parametrize("weight", [-1.0, float("nan"), True])
def test_a_bad_weight_is_refused_by_name(weight):
    with pytest.raises(ValueError, match="weight must be a number >= 0"):
        harden(small_encoder(), digits(), epsilon=0.1, weight=weight)


def test_an_empty_loader_is_refused():
    with pytest.raises(ValueError, match="loader yields no batch"):
        harden(small_encoder(), [], epsilon=0.1)


def test_pixels_in_0_255_are_refused_before_any_training():
    encoder = small_encoder()
    before = snapshot(encoder)
    with pytest.raises(ValueError, match="bounds"):
        harden(encoder, [x * 255 for x in digits()], threat=ThreatModel(8 / 255))
    assert_unchanged(encoder, before)


def test_the_command_writes_a_checkpoint_that_evaluate_reads(tmp_path, capsys):
    from robust_reg.cli import main
    from robust_reg.demo.checkpoints import load_checkpoint, save_checkpoint
    from robust_reg.demo.models import build_encoder

    torch.manual_seed(0)
    original = save_checkpoint(tmp_path / "cnn.pt", build_encoder("cnn", 1), arch="cnn", dataset="digits")
    assert main(["harden", str(original), "--epochs", "1", "--no-progress"]) == 0
    hardened = tmp_path / "cnn-hardened.pt"
    said = capsys.readouterr().out
    assert "about" in said.splitlines()[0] and f"robust-reg evaluate {hardened}" in said
    encoder, meta = load_checkpoint(hardened)
    assert meta["config"]["hardened_from"] == str(original) and meta["dataset"] == "digits"
    argv = ["evaluate", str(hardened), "--no-autoattack", "--test-samples", "60", "--no-corruptions"]
    assert main([*argv, "--no-embedding-attack", "--no-progress", "--out", str(tmp_path / "eval")]) in (0, 3)
    assert (tmp_path / "eval" / "cnn-hardened_evaluation.json").is_file()
