"""``ThreatModel`` constructors: the ball read from what produced the inputs."""

from __future__ import annotations

import pytest
import torch

from robust_reg import RobustnessRegularizer, ThreatModel


def test_from_transform_reads_a_torchvision_normalize():
    T = pytest.importorskip("torchvision.transforms")
    transform = T.Compose([T.ToTensor(), T.Normalize((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))])
    threat = ThreatModel.from_transform(transform, 0.05, norm="l2")
    assert (threat.mean, threat.std, threat.epsilon, threat.norm) == ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7), 0.05, "l2")


def test_from_transform_reads_a_lightly_multi_view_transform():
    pytest.importorskip("lightly")
    from lightly.transforms import SimCLRTransform
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    threat = ThreatModel.from_transform(SimCLRTransform(input_size=32), 8 / 255)
    assert threat.mean == pytest.approx(tuple(IMAGENET_NORMALIZE["mean"]))
    assert threat.std == pytest.approx(tuple(IMAGENET_NORMALIZE["std"]))


def test_from_transform_without_normalize_means_raw_pixels():
    T = pytest.importorskip("torchvision.transforms")
    assert not ThreatModel.from_transform(T.Compose([T.ToTensor()]), 0.1).normalized


def test_from_transform_validates_epsilon_by_name():
    with pytest.raises(ValueError, match="epsilon"):
        ThreatModel.from_transform(None, -1.0)


def test_regularizer_from_threat_model_uses_the_whole_ball():
    threat = ThreatModel(0.1, norm="l2", bounds=(-1.0, 1.0), mean=(0.5,), std=(0.25,))
    reg = RobustnessRegularizer.from_threat_model(threat, steps=2)
    assert reg.threat == threat and reg.steps == 2


def test_regularizer_from_threat_model_refuses_a_second_epsilon():
    with pytest.raises(TypeError, match="epsilon"):
        RobustnessRegularizer.from_threat_model(ThreatModel(0.1), epsilon=0.2)


def test_regularizer_from_threat_model_needs_a_threat_model():
    with pytest.raises(TypeError, match="threat"):
        RobustnessRegularizer.from_threat_model(0.1)


def test_lightly_adapter_builds_its_ball_with_from_transform():
    pytest.importorskip("lightly")
    from lightly.transforms import SimCLRTransform

    from robust_reg.integrations.lightly import robustify

    class Module(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)

        def training_step(self, batch, batch_index):
            return self(batch[0][0]).sum()

    transform = SimCLRTransform(input_size=32, normalize={"mean": (0.3, 0.3, 0.3), "std": (0.2, 0.2, 0.2)})
    step = robustify(Module(), transform=transform, epsilon=0.03).training_step
    assert step.regularizer.threat == ThreatModel.from_transform(transform, 0.03)
