"""Plausible mistakes fail loudly, name the argument and the fix, and change nothing the user owns."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robust_reg import RobustnessRegularizer, ThreatModel, estimate_bound, fit_linear_probe, pgd_attack
from robust_reg.evaluation import PGD, LinearProbeClassifier, evaluate_robustness

from helpers import Counting, assert_unchanged, small_cnn, snapshot


def embedding_model(in_channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(small_cnn(in_channels), nn.Flatten(), nn.Linear(16, 8))


@pytest.mark.parametrize("epsilon", [8, 1.0, 0.6])
def test_an_linf_epsilon_in_the_wrong_unit_is_refused_with_the_fix(epsilon):
    with pytest.raises(ValueError, match=rf"epsilon={epsilon:g} .*Did you mean epsilon={epsilon:g}/255"):
        RobustnessRegularizer(epsilon)


def test_epsilon_is_a_fraction_of_the_range_so_8_is_refused_with_bounds_0_255_too():
    with pytest.raises(ValueError, match=r"epsilon is a fraction of the input range.*Did you mean epsilon=8/255"):
        RobustnessRegularizer(threat=ThreatModel(8, bounds=(0, 255)))


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


# The trust issue's cases, one test each: each went through silently in 0.2.0.

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def rgb_embedding_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(small_cnn(3), nn.Flatten(), nn.Linear(16, 8))


def test_pixels_in_0_255_with_epsilon_8_over_255_move_by_8_grey_levels():
    class Scaled(nn.Module):  # a model that takes 0-255 pixels
        def __init__(self):
            super().__init__()
            self.inner = rgb_embedding_model()

        def forward(self, x):
            return self.inner(x / 255)

    model = Scaled()
    torch.manual_seed(1)
    x0, x1 = torch.rand(8, 3, 16, 16) * 255, torch.rand(8, 3, 16, 16) * 255
    threat = ThreatModel(8 / 255, bounds=(0, 255))
    out = RobustnessRegularizer(threat=threat, inner="pgd")(model, x1, positive=model(x0))
    moved = (out.adversarial_inputs - x1).abs().max().item()
    assert 7.9 <= moved <= 8.0 + 1e-4  # eight grey levels in the declared units, not 8/255 of one
    out = RobustnessRegularizer(threat=threat)(model, x1, positive=model(x0))  # N-FGSM: reaches 3 eps
    assert 23.9 <= (out.adversarial_inputs - x1).abs().max().item() <= 24.0 + 1e-4


def test_the_evaluation_measures_eps_as_a_fraction_of_bounds_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    x, y = torch.rand(16, 3, 4, 4) * 255, torch.randint(0, 3, (16,))
    ev = evaluate_robustness(
        model,
        x,
        y,
        threat=ThreatModel(8 / 255, bounds=(0, 255)),
        attacks=[PGD(3)],
        check_steps=5,
        keep_adversarial=True,
    )
    assert (ev.adversarial_inputs("PGD-3", 8 / 255) - x).abs().max() <= 8.0 + 1e-4


def test_raw_pixels_with_a_normalisation_passed_are_refused_naming_the_measured_ball():
    model = Counting(rgb_embedding_model())
    before = snapshot(model)
    x1 = torch.rand(8, 3, 16, 16)  # raw [0, 1]: the model normalises inside
    reg = RobustnessRegularizer(threat=ThreatModel(8 / 255, mean=CIFAR_MEAN, std=CIFAR_STD))
    with pytest.raises(ValueError, match=r"raw pixel range.*0\.1288 \(32\.9/255\) of your pixels instead of 0\.03137"):
        reg(model, x1, positive=torch.rand(8, 8))
    assert model.calls == 0
    assert_unchanged(model, before)


def test_the_evaluation_refuses_raw_pixels_with_a_normalisation_too():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match="raw pixel range"):
        evaluate_robustness(model, x, y, threat=ThreatModel(8 / 255, mean=CIFAR_MEAN, std=CIFAR_STD), attacks=[PGD(3)])


def test_views_normalised_with_other_statistics_warn_naming_the_measured_ball():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model = rgb_embedding_model()
    torch.manual_seed(1)
    x0, x1 = ((torch.rand(16, 3, 16, 16) - 0.5) / 0.5 for _ in range(2))  # lightly's mean = std = 0.5
    reg = RobustnessRegularizer(threat=ThreatModel(8 / 255, mean=imagenet[0], std=imagenet[1]))  # the assumption
    with pytest.warns(UserWarning, match=r"the ball is about 0\.068\d* \(17\.\d/255\) of their pixels, not"):
        reg(model, x1, positive=model(x0))


def test_the_ball_warning_is_said_once_per_regularizer():
    model = rgb_embedding_model()
    x0, x1 = ((torch.rand(16, 3, 16, 16) - 0.5) / 0.5 for _ in range(2))
    reg = RobustnessRegularizer(threat=ThreatModel(8 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            reg(model, x1, positive=model(x0))
    assert sum("of their pixels" in str(w.message) for w in caught) == 1


def test_lightly_a_training_transform_normalising_otherwise_is_refused_naming_the_ball():
    pytest.importorskip("lightly")
    from types import SimpleNamespace

    from lightly.transforms import SimCLRTransform

    from robust_reg.integrations.lightly import robustify

    module = robustify(_lightly_simclr(), log=False)  # the README's line: ImageNet statistics assumed
    transform = SimCLRTransform(input_size=16, normalize={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    module._trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=SimpleNamespace(transform=transform)))
    before = snapshot(module)
    views = [(torch.rand(8, 3, 16, 16) - 0.5) / 0.5 for _ in range(2)]
    with pytest.raises(
        ValueError, match=r"std=\(0\.5, 0\.5, 0\.5\).*17\.\d-17\.\d/255 of the pixels instead of 8\.0/255"
    ):
        module.training_step((views, torch.zeros(8)), 0)
    assert_unchanged(module, before)


def test_an_linf_radius_given_as_l2_is_refused_by_the_regularizer():
    model = Counting(rgb_embedding_model())
    x = torch.rand(8, 3, 32, 32)
    with pytest.raises(ValueError, match=r"epsilon=0\.03137 \(= 8/255\) with norm='l2'.*an L-inf radius given as L2"):
        RobustnessRegularizer(8 / 255, norm="l2")(model, x, positive=torch.rand(8, 8))
    assert model.calls == 0


def test_an_linf_radius_given_as_l2_is_refused_by_the_evaluation():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match=r"epsilons=0\.03137 \(= 8/255\) with norm='l2'"):
        evaluate_robustness(model, x, y, epsilons=[8 / 255], norm="l2", attacks=[PGD(3)])


def test_a_very_small_l2_ball_warns_naming_its_size():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with pytest.warns(
        UserWarning, match=r"epsilons=0\.01 with norm='l2' on inputs of 3072 values moves each value by 0\.046"
    ):
        evaluate_robustness(model, x, y, epsilons=[0.01], norm="l2", attacks=[PGD(2)], check_steps=3)


def test_an_evaluation_where_no_attack_changes_anything_fails_its_sanity_check():
    # Images are uniformly dark or bright; the class is the brightness: no 0.01-ball crosses the boundary,
    # while a whole-range ball breaks every sample, so only the new check can say the attacks did nothing.
    class Brightness(nn.Module):
        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True) - 0.5
            return torch.cat([-10 * m, 10 * m], dim=1)

    y = torch.arange(16) % 2
    x = (0.2 + 0.6 * y.float()).view(16, 1, 1, 1).expand(16, 1, 4, 4).contiguous()
    ev = evaluate_robustness(Brightness(), x, y, epsilons=[0.01], attacks=[PGD(5)], check_steps=10)
    (check,) = [c for c in ev.checks if c.name.startswith("the attacks change")]
    assert not check.passed and "no attack changed a single correct prediction" in check.detail
    assert not ev.passed and "!!! SANITY CHECK FAILED: the attacks change" in str(ev)


def test_positive_the_same_tensor_as_features_is_refused():
    model = embedding_model()
    x = torch.rand(8, 1, 28, 28)
    z = model(x)
    with pytest.raises(ValueError, match=r"positive= equals features="):
        RobustnessRegularizer(0.1)(model, x, features=z, positive=z)


def test_positive_computed_from_the_same_view_is_refused():
    model = embedding_model()
    x = torch.rand(8, 1, 28, 28)
    with pytest.raises(ValueError, match=r"positive= equals features="):
        RobustnessRegularizer(0.1)(model, x, features=model(x), positive=model(x).detach())


def test_positive_equal_to_the_recomputed_clean_embedding_is_refused():
    model = embedding_model().eval()  # deterministic, so model(x) is what the regulariser recomputes
    x = torch.rand(8, 1, 28, 28)
    with pytest.raises(ValueError, match=r"positive= equals encoder\(x\)"):
        RobustnessRegularizer(0.1)(model, x, positive=model(x).detach())


@pytest.mark.parametrize("inner, reach", [("pgd", 1), ("n-fgsm", 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_regularizer_keeps_a_half_precision_ball_inside_its_search_radius(dtype, inner, reach):
    model = embedding_model().to(dtype)
    torch.manual_seed(2)
    x0, x1 = torch.rand(16, 1, 28, 28, dtype=dtype), torch.rand(16, 1, 28, 28, dtype=dtype)
    out = RobustnessRegularizer(8 / 255, inner=inner)(model, x1, positive=model(x0))
    assert out.adversarial_inputs.dtype == dtype
    assert (out.adversarial_inputs.float() - x1.float()).abs().max() <= reach * 8 / 255
    assert (out.adversarial_inputs.float() - x1.float()).abs().max() > (reach * 8 - 1) / 255  # moves to the edge


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_keeps_a_bfloat16_ball_inside_epsilon(norm, eps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).to(torch.bfloat16)
    x, y = torch.rand(32, 3, 8, 8, dtype=torch.bfloat16), torch.randint(0, 4, (32,))
    delta = (pgd_attack(model, x, y, ThreatModel(eps, norm=norm), steps=5).float() - x.float()).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_probe_sits_on_a_backbone_of_another_dtype(dtype):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8)).to(dtype)
    x, y = torch.rand(64, 1, 4, 4, dtype=dtype), torch.randint(0, 3, (64,))
    head = fit_linear_probe(encoder, [(x, y)], num_classes=3)
    ev = evaluate_robustness(
        LinearProbeClassifier(encoder, head), x, y, epsilons=[0.05], attacks=[PGD(2)], check_steps=3
    )
    assert 0 <= ev.robust_accuracy(0.05) <= ev.clean_accuracy


def test_labels_1_to_10_are_refused_before_any_attack():
    model = Counting(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)))
    x, y = torch.rand(20, 1, 4, 4), torch.arange(20) % 10 + 1  # 1..10
    with pytest.raises(ValueError, match=r"y has labels in \[1, 10\] but the model outputs 10 logits.*subtract 1"):
        evaluate_robustness(model, x, y, epsilons=[0.05], attacks=[PGD(2)])
    assert model.calls == 1  # the one pass that reads the number of logits


def test_a_frozen_model_is_refused_at_the_call_not_at_backward():
    model = embedding_model().requires_grad_(False)
    x0, x1 = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    positive = model(x0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"encoder has every parameter frozen.*requires_grad_\(True\)"):
        RobustnessRegularizer(0.1)(model, x1, positive=positive)
    assert_unchanged(model, before)


def test_a_frozen_model_can_still_be_measured_under_no_grad():
    model = embedding_model().requires_grad_(False)
    x0, x1 = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert RobustnessRegularizer(0.1)(model, x1, positive=model(x0)).loss >= 0


def test_an_augmentation_overshooting_the_range_is_told_to_clamp():
    model = embedding_model()
    x = torch.rand(8, 1, 28, 28)
    x[0, 0, 0, 0] = 1.02
    with pytest.raises(ValueError, match=r"by a little: an augmentation overshoots.*x\.clamp\(0, 1\)"):
        RobustnessRegularizer(0.1)(model, x, positive=torch.rand(8, 8))


def test_normalised_inputs_without_mean_and_std_are_told_to_pass_them():
    model = embedding_model()
    x = (torch.rand(8, 1, 28, 28) - 0.13) / 0.31
    with pytest.raises(ValueError, match=r"pass the mean/std they were normalised with"):
        RobustnessRegularizer(0.1)(model, x, positive=torch.rand(8, 8))
