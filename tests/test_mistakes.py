"""Plausible mistakes fail loudly, name the argument and the fix, and change nothing the user owns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_reg import RobustnessRegularizer, estimate_bound
from robust_reg.evaluation import PGD, evaluate_robustness

from helpers import Counting, assert_unchanged, small_cnn, snapshot


def embedding_model(in_channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(small_cnn(in_channels), nn.Flatten(), nn.Linear(16, 8))


@pytest.mark.parametrize("epsilon", [8, 1.0, 0.6])
def test_an_linf_epsilon_in_the_wrong_unit_is_refused_with_the_fix(epsilon):
    with pytest.raises(ValueError, match=rf"epsilon={epsilon:g} .*Did you mean epsilon={epsilon:g}/255"):
        RobustnessRegularizer(epsilon)


def test_an_linf_epsilon_in_units_of_the_declared_range_is_fine():
    assert RobustnessRegularizer(8, bounds=(0, 255)).epsilon == 8


def test_the_bound_and_the_evaluation_refuse_the_wrong_unit_too():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="Did you mean epsilon=8/255"):
        estimate_bound(nn.Flatten(), nn.Linear(16, 2), [(x, y)], epsilon=8)
    with pytest.raises(ValueError, match="Did you mean epsilons=8/255"):
        evaluate_robustness(model, x, y, epsilons=[8], attacks=[PGD(2)])


def test_an_l2_epsilon_beyond_the_input_box_is_refused_at_the_call_and_changes_nothing():
    model = Counting(embedding_model())
    before = snapshot(model)
    x = torch.rand(8, 1, 28, 28)  # 784 values: half the box's L2 diameter is 14
    with pytest.raises(ValueError, match=r"epsilon=20 with norm='l2' exceeds half the L2 diameter"):
        RobustnessRegularizer(20, norm="l2")(model, x, positive=torch.rand(8, 8))
    assert model.calls == 0
    assert_unchanged(model, before)


def test_usual_l2_radii_are_fine():
    model, x0, x1 = embedding_model(), torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    assert RobustnessRegularizer(3.0, norm="l2")(model, x1, positive=model(x0)).loss >= 0


def test_a_positive_of_another_width_is_named_as_such_before_any_forward():
    model = Counting(embedding_model())
    x = torch.rand(8, 1, 28, 28)
    z = model(x)
    model.calls = 0
    with pytest.raises(ValueError, match=r"positive= has 16 values per sample but features= has 8"):
        RobustnessRegularizer(0.1)(model, x, features=z, positive=torch.rand(8, 16))
    assert model.calls == 0


def test_a_positive_of_another_width_than_the_encoders_output_is_named():
    model = embedding_model()
    with pytest.raises(ValueError, match=r"positive= has 16 values per sample but encoder\(x\) has 8"):
        RobustnessRegularizer(0.1)(model, torch.rand(8, 1, 28, 28), positive=torch.rand(8, 16))


@pytest.mark.parametrize(
    "misuse",
    [lambda out: 1.0 * out, lambda out: torch.tensor(1.0) + out, lambda out: out + 1.0, lambda out: out.backward()],
    ids=["weight times output", "loss plus output", "output plus loss", "backward on output"],
)
def test_using_the_output_as_a_tensor_fails_with_the_fix(misuse):
    model, x0, x1 = embedding_model(), torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    out = RobustnessRegularizer(0.1)(model, x1, positive=model(x0))
    with pytest.raises(TypeError, match=r"RegularizerOutput.*out\.loss"):
        misuse(out)


def test_the_output_still_unpacks_as_a_tuple():
    model, x0, x1 = embedding_model(), torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    loss, adversarial_inputs, adversarial_features = RobustnessRegularizer(0.1)(model, x1, positive=model(x0))
    assert adversarial_inputs.shape == x1.shape and adversarial_features.shape == (8, 8)


def _lightly_simclr():
    pytest.importorskip("lightly")
    from lightly_modules import SimCLR

    return SimCLR()


def test_lightly_raw_pixels_under_the_imagenet_assumption_are_refused_before_the_step():
    from robust_reg.integrations.lightly import robustify

    module = robustify(_lightly_simclr(), log=False)  # no normalize=: lightly's ImageNet default assumed
    before = snapshot(module)
    views = [torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)]  # raw [0, 1] RGB
    with pytest.raises(ValueError, match=r"look like raw pixels.*IMAGENET_NORMALIZE.*normalize=None.*transform="):
        module.training_step((views, torch.zeros(8)), 0)
    assert_unchanged(module, before)


def test_lightly_a_channel_count_that_does_not_fit_the_assumption_names_normalize():
    from robust_reg.integrations.lightly import robustify

    module = _lightly_simclr()
    module.backbone[0] = nn.Conv2d(1, 8, 3, padding=1)  # a grayscale model
    robustify(module, log=False)
    before = snapshot(module)
    views = [torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)]
    with pytest.raises(ValueError, match=r"shape \(8, 1, 16, 16\).*3 channels.*normalize=None"):
        module.training_step((views, torch.zeros(8)), 0)
    assert_unchanged(module, before)


def test_lightly_normalised_views_pass_the_assumption_check():
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    from robust_reg.integrations.lightly import robustify

    module = robustify(_lightly_simclr(), log=False)
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(1, 3, 1, 1)
    views = [(torch.rand(8, 3, 16, 16) - mean) / std for _ in range(2)]
    module.training_step((views, torch.zeros(8)), 0).backward()


def test_lightly_raw_pixels_declared_with_normalize_none_train():
    from robust_reg.integrations.lightly import robustify

    module = robustify(_lightly_simclr(), normalize=None, log=False)
    views = [torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)]
    module.training_step((views, torch.zeros(8)), 0).backward()


def test_lightly_an_epsilon_in_the_wrong_unit_is_refused_at_robustify():
    from robust_reg.integrations.lightly import robustify

    with pytest.raises(ValueError, match="Did you mean epsilon=8/255"):
        robustify(_lightly_simclr(), epsilon=8, normalize=None)


def test_lightly_weight_defaults_to_the_methods_recommended_one():
    pytest.importorskip("lightly")
    from robust_reg.integrations.lightly import robustify

    from lightly_modules import BYOL

    assert robustify(BYOL(), normalize=None, log=False).training_step.weight == 0.05
    assert robustify(_lightly_simclr(), normalize=None, log=False).training_step.weight == 1.0
