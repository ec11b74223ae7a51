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


def test_the_regularizer_takes_the_whole_ball_as_threat():
    threat = ThreatModel(0.1, norm="l2", bounds=(-1.0, 1.0), mean=(0.5,), std=(0.25,))
    reg = RobustnessRegularizer(threat=threat, steps=2)
    assert reg.threat == threat and reg.steps == 2


def test_a_threat_and_a_second_epsilon_or_norm_are_refused():
    with pytest.raises(TypeError, match="epsilon come from threat="):
        RobustnessRegularizer(0.2, threat=ThreatModel(0.1))
    with pytest.raises(TypeError, match="norm come from threat="):
        RobustnessRegularizer(threat=ThreatModel(0.1), norm="l2")


def test_the_threat_must_be_a_threat_model():
    with pytest.raises(TypeError, match="threat must be a ThreatModel"):
        RobustnessRegularizer(threat=0.1)


def test_from_threat_model_still_works_and_warns_with_the_new_spelling():
    threat = ThreatModel(0.1, mean=(0.5,), std=(0.25,))
    with pytest.warns(DeprecationWarning, match=r"use RobustnessRegularizer\(threat=threat, ...\)"):
        assert RobustnessRegularizer.from_threat_model(threat, steps=2).threat == threat


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
