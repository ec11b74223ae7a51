"""RobustnessRegularizer: value, gradients, scale invariance, reuse, normalisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_reg import BackboneRobustnessRegularizer, RegularizerOutput, RobustnessRegularizer, ThreatModel

from helpers import Counting, small_cnn


class Scaled(nn.Module):
    """``c * f(x)`` with a learnable scale ``c``."""

    def __init__(self, encoder: nn.Module, scale: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return self.scale * self.encoder(x)


def seeded(fn, seed=123):
    torch.manual_seed(seed)
    return fn()


def test_returns_a_scalar_that_carries_gradients_to_the_encoder(encoder, images):
    value = BackboneRobustnessRegularizer(0.1)(encoder, images).loss
    assert value.shape == () and value.requires_grad
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("scale", [1e-3, 7.5, 1e3])
def test_relative_value_is_unchanged_when_features_are_scaled(images, norm, scale):
    base = small_cnn()
    reg = BackboneRobustnessRegularizer(0.1, norm=norm, steps=3)
    reference = seeded(lambda: reg(Scaled(base, 1.0), images).loss)
    scaled = seeded(lambda: reg(Scaled(base, scale), images).loss)
    assert torch.allclose(scaled, reference, rtol=1e-4)


def test_relative_value_has_no_gradient_along_the_feature_scale(images):
    # Scale invariance means shrinking the features cannot lower the penalty.
    model = Scaled(small_cnn(), 3.0)
    value = BackboneRobustnessRegularizer(0.1)(model, images).loss
    value.backward()
    # d value / d log(scale) would be -2 * value for the raw (shrinkable) form.
    assert abs(model.scale.grad.item() * model.scale.item()) < 1e-4 * value.item()


def test_raw_value_does_scale_with_the_features(images):
    base = small_cnn()
    reg = BackboneRobustnessRegularizer(0.1, relative=False)
    reference = seeded(lambda: reg(Scaled(base, 1.0), images).loss)
    scaled = seeded(lambda: reg(Scaled(base, 10.0), images).loss)
    assert torch.allclose(scaled, 100 * reference, rtol=1e-4)


def test_is_zero_for_a_constant_encoder(images):
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 5) + 0 * x.flatten(1)[:, :1]

    value = BackboneRobustnessRegularizer(0.3)(Constant(), images).loss
    assert value.item() == 0.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_reused_features_give_the_same_value_and_gradients(images, norm):
    encoder = small_cnn()
    reg = BackboneRobustnessRegularizer(0.1, norm=norm, steps=2)

    def run(reuse: bool):
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        features = encoder(images) if reuse else None
        value = reg(encoder, images, features=features).loss
        value.backward()
        return value.detach(), [p.grad.clone() for p in encoder.parameters()]

    v1, g1 = run(reuse=False)
    v2, g2 = run(reuse=True)
    assert torch.allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.filterwarnings("ignore:epsilon=.* a very small ball")  # wide bounds, so nothing is clipped
def test_linear_encoder_deviation_matches_eps_times_spectral_norm():
    # For f(x) = A x and an L2 ball the worst deviation is eps * ||A||_2 exactly.
    torch.manual_seed(0)
    A = torch.randn(10, 30)
    eps = 0.5
    reg = BackboneRobustnessRegularizer(
        threat=ThreatModel(eps / 2e3, norm="l2", bounds=(-1e3, 1e3)),
        steps=20,
        step_size=eps / 2e3,
        relative=False,
    )
    reg(lambda v: v @ A.T, torch.randn(64, 30))
    expected = eps * torch.linalg.matrix_norm(A, ord=2)
    assert reg.last_stats.mean_deviation.item() == pytest.approx(expected.item(), rel=0.02)


def test_normalised_inputs_give_the_same_value_as_pixel_inputs():
    # The ball is in pixel units whatever normalisation the data went through.
    torch.manual_seed(0)
    pixel_encoder = small_cnn(in_channels=3)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    threat = ThreatModel(0.05, mean=mean, std=std)
    pixel_encoder.eval()  # deterministic BN so the two encoders are the same function

    def model_space_encoder(x):
        return pixel_encoder(threat.to_pixels(x))

    pixels = torch.rand(8, 3, 8, 8)
    plain = seeded(lambda: BackboneRobustnessRegularizer(0.05, steps=3)(pixel_encoder, pixels).loss)
    normalised = seeded(
        lambda: BackboneRobustnessRegularizer(threat=threat, steps=3)(model_space_encoder, threat.to_model(pixels)).loss
    )
    assert torch.allclose(plain, normalised, rtol=1e-4)


def test_adversarial_output_holds_inputs_in_the_ball_and_their_features(encoder, images):
    reg = BackboneRobustnessRegularizer(0.1, steps=2)
    out = reg(encoder, images)
    assert isinstance(out, RegularizerOutput)
    assert (out.adversarial_inputs - images).abs().max() <= 0.1 + 1e-6
    assert out.adversarial_features.shape == encoder(images).shape
    assert out.adversarial_features.requires_grad
    assert torch.allclose(out.loss.detach(), reg.last_stats.value)


def test_adversarial_features_are_the_encoder_output_on_the_adversarial_inputs(images):
    encoder = small_cnn().eval()
    out = BackboneRobustnessRegularizer(0.1, steps=2)(encoder, images)
    with torch.no_grad():
        assert torch.allclose(out.adversarial_features, encoder(out.adversarial_inputs), atol=1e-6)


def test_last_stats_report_value_deviation_distance_and_spread(images):
    encoder = small_cnn()
    reg = BackboneRobustnessRegularizer(0.1, steps=2)
    out = reg(encoder, images)
    with torch.no_grad():
        h = encoder(images).flatten(1)
        z = out.adversarial_features.flatten(1)
        spread = (h - h.mean(0)).pow(2).sum(1).mean()
        per_sample = (z - h).pow(2).sum(1)
    stats = reg.last_stats
    assert not stats.value.requires_grad
    assert torch.allclose(stats.variance, spread, rtol=1e-5)
    assert torch.allclose(stats.mean_squared_deviation, per_sample.mean(), rtol=1e-5)
    assert torch.allclose(stats.mean_deviation, per_sample.sqrt().mean(), rtol=1e-5)
    assert torch.allclose(stats.value, stats.mean_squared_deviation / stats.variance, rtol=1e-5)


def test_four_dimensional_features_are_flattened(images):
    encoder = small_cnn()  # returns (N, 16, 1, 1)
    flat_encoder = nn.Sequential(encoder, nn.Flatten())
    a = seeded(lambda: BackboneRobustnessRegularizer(0.1)(encoder, images).loss)
    b = seeded(lambda: BackboneRobustnessRegularizer(0.1)(flat_encoder, images).loss)
    assert torch.allclose(a, b)


def test_no_steps_and_no_random_start_is_exactly_zero(encoder, images):
    assert BackboneRobustnessRegularizer(0.1, steps=0, random_start=False)(encoder.eval(), images).loss.item() == 0.0


def test_more_ascent_steps_find_a_larger_deviation(images):
    encoder = small_cnn().eval()
    values = [
        seeded(lambda s=s: BackboneRobustnessRegularizer(0.1, steps=s)(encoder, images).loss).item() for s in (0, 5)
    ]
    assert values[1] > values[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_works_under_autocast(encoder, images, dtype):
    reg = BackboneRobustnessRegularizer(0.1, steps=2)
    with torch.autocast("cpu", dtype=dtype):
        h = encoder(images)
        value = reg(encoder, images, features=h).loss
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters())


def test_works_with_a_compiled_encoder(images):
    encoder = small_cnn()
    compiled = torch.compile(encoder, backend="eager")
    eager = seeded(lambda: BackboneRobustnessRegularizer(0.1, steps=2)(encoder, images).loss)
    value = seeded(lambda: BackboneRobustnessRegularizer(0.1, steps=2)(compiled, images).loss)
    assert torch.allclose(eager, value, rtol=1e-4)


def test_the_stats_relative_deviation_is_the_mean_deviation_over_sigma():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    reg = BackboneRobustnessRegularizer(epsilon=0.1, steps=1)
    reg(encoder, torch.rand(8, 1, 4, 4))
    stats = reg.last_stats
    assert not any(hasattr(stats, old) for old in ("deviation", "distance", "spread"))  # 0.1.0's names are gone
    assert torch.allclose(stats.relative_deviation, stats.mean_deviation / stats.variance.sqrt())


def test_detach_anchor_gives_the_clean_features_no_gradient_and_the_same_value():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6))
    x = torch.rand(8, 1, 4, 4)
    values = {}
    for detach in (False, True):
        features = encoder(x)
        features.retain_grad()
        torch.manual_seed(1)  # the same random start
        value = BackboneRobustnessRegularizer(0.1, detach_anchor=detach)(encoder, x, features=features).loss
        value.backward()
        values[detach] = (value.detach(), features.grad)
    torch.testing.assert_close(values[True][0], values[False][0])
    assert values[True][1] is None or not values[True][1].any()
    assert values[False][1].abs().sum() > 0


def test_instance_ascent_moves_samples_toward_the_others_more_than_random_noise():
    from robust_reg.regularizer import _instance_confusion

    torch.manual_seed(0)
    encoder = small_cnn()
    x = torch.rand(16, 1, 28, 28)
    reg = BackboneRobustnessRegularizer(0.1, steps=5, ascent="instance", normalize_features=True)
    out = reg(encoder, x)
    with torch.no_grad():
        clean = encoder(x).flatten(1)
        noisy = encoder((x + 0.1 * torch.empty_like(x).uniform_(-1, 1)).clamp(0, 1)).flatten(1)
        confusion_adv = _instance_confusion(encoder(out.adversarial_inputs).flatten(1), clean).mean()
        confusion_noise = _instance_confusion(noisy, clean).mean()
    assert confusion_adv > confusion_noise
    assert (out.adversarial_inputs - x).abs().max() <= 0.1 + 1e-6


def test_unknown_ascent_is_refused_by_name():
    with pytest.raises(ValueError, match="ascent"):
        BackboneRobustnessRegularizer(0.1, ascent="loss")


def test_positive_ascent_moves_features_away_from_the_given_positive():
    torch.manual_seed(0)
    encoder = small_cnn()
    x, other_view = torch.rand(16, 1, 28, 28), torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        positive = encoder(other_view).flatten(1)
    reg = RobustnessRegularizer(0.1, steps=5, ascent="positive", normalize_features=True)
    out = reg(encoder, x, positive=positive)

    def distance(inputs):
        with torch.no_grad():
            z = torch.nn.functional.normalize(encoder(inputs).flatten(1), dim=1)
        return (z - torch.nn.functional.normalize(positive, dim=1)).pow(2).sum(1).mean()

    noisy = (x + 0.1 * torch.empty_like(x).uniform_(-1, 1)).clamp(0, 1)
    assert distance(out.adversarial_inputs) > distance(noisy)


@pytest.mark.parametrize(
    "ascent, positive, match",
    [
        ("positive", None, "positive= is missing"),
        ("deviation", torch.rand(8, 16), "positive= is not taken by BackboneRobustnessRegularizer"),
    ],
)
def test_positive_is_required_by_the_positive_ascent_and_refused_otherwise(ascent, positive, match):
    reg = BackboneRobustnessRegularizer(0.1, ascent=ascent)
    with pytest.raises(ValueError, match=match):
        reg(small_cnn(), torch.rand(8, 1, 28, 28), positive=positive)


def test_a_positive_of_another_batch_size_is_refused_by_name():
    reg = BackboneRobustnessRegularizer(0.1, ascent="positive")
    with pytest.raises(ValueError, match="positive must hold one row per sample"):
        reg(small_cnn(), torch.rand(8, 1, 28, 28), positive=torch.rand(4, 16))


@pytest.mark.parametrize("random_start, calls", [(True, 1 + 3 + 1), (False, 3 + 1)])
def test_without_random_start_the_clean_pass_is_the_ascents_first_forward(random_start, calls):
    encoder = Counting(small_cnn())
    x = torch.rand(8, 1, 28, 28)
    reg = BackboneRobustnessRegularizer(0.1, steps=3, random_start=random_start, ascent="positive")
    reg(encoder, x, positive=torch.rand(8, 16)).loss.backward()
    assert encoder.calls == calls


def test_the_reused_clean_pass_gives_the_value_and_gradients_of_a_separate_one():
    torch.manual_seed(0)
    encoder, x, positive = small_cnn(), torch.rand(8, 1, 28, 28), torch.rand(8, 16)
    reg = RobustnessRegularizer(0.1, steps=3, random_start=False, ascent="positive", normalize_features=True)
    results = []
    for features in (None, encoder(x)):
        encoder.zero_grad()
        out = reg(encoder, x, features=features, positive=positive)
        out.loss.backward()
        results.append((out.loss.detach(), out.adversarial_inputs, [p.grad.clone() for p in encoder.parameters()]))
    (v0, adv0, g0), (v1, adv1, g1) = results
    assert torch.allclose(v0, v1, rtol=1e-5) and torch.equal(adv0, adv1)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g0, g1))


def test_without_random_start_and_without_grad_the_value_is_still_computed():
    torch.manual_seed(0)
    encoder, x, positive = small_cnn(), torch.rand(8, 1, 28, 28), torch.rand(8, 16)
    reg = BackboneRobustnessRegularizer(0.1, steps=3, random_start=False, ascent="positive")
    with torch.no_grad():
        value = reg(encoder, x, positive=positive).loss
    assert torch.allclose(value, reg(encoder, x, positive=positive).loss.detach(), rtol=1e-5)


def test_the_deviation_ascent_without_random_start_is_refused_by_name():
    # Its gradient is zero at the clean input: the ascent would never move.
    with pytest.raises(ValueError, match="random_start=False"):
        BackboneRobustnessRegularizer(0.1, random_start=False)


def test_an_ascent_from_a_given_start_equals_the_ascent_from_that_random_draw():
    torch.manual_seed(0)
    encoder, x, positive = small_cnn(), torch.rand(8, 1, 28, 28), torch.rand(8, 16)
    reg = BackboneRobustnessRegularizer(0.1, steps=2, ascent="positive")
    torch.manual_seed(1)
    drawn = reg(encoder, x, positive=positive)
    torch.manual_seed(1)
    start = reg.threat.random_start(x)
    given = reg(encoder, x, positive=positive, start=start)
    assert torch.equal(given.adversarial_inputs, drawn.adversarial_inputs)
    assert torch.allclose(given.loss, drawn.loss)


def test_a_start_outside_the_ball_is_projected_onto_it():
    x = torch.rand(4, 1, 28, 28) * 0.6 + 0.2  # away from the pixel bounds
    reg = BackboneRobustnessRegularizer(0.1, steps=0, ascent="positive")
    out = reg(small_cnn(), x, positive=torch.rand(4, 16), start=torch.full_like(x, 0.3))
    torch.testing.assert_close(out.adversarial_inputs - x, torch.full_like(x, 0.1))


def test_a_start_continues_where_the_last_ascent_ended():
    # Two ascents of 2 steps each, the second warm-started, search as far as one of 4 steps.
    torch.manual_seed(0)
    encoder, x = small_cnn(), torch.rand(8, 1, 28, 28)
    positive = encoder(torch.rand(8, 1, 28, 28)).detach()  # the other view's embedding
    kwargs = dict(step_size=0.02, ascent="positive", normalize_features=True)
    short, long = (BackboneRobustnessRegularizer(0.1, steps=n, random_start=False, **kwargs) for n in (2, 4))
    first = short(encoder, x, positive=positive)
    warm = short(encoder, x, positive=positive, start=first.adversarial_inputs - x)
    once = long(encoder, x, positive=positive)
    torch.testing.assert_close(warm.adversarial_inputs, once.adversarial_inputs)


@pytest.mark.parametrize(
    "start, error, match",
    [
        (torch.zeros(4, 1, 28, 27), ValueError, "start must have the shape of x"),
        (torch.full((4, 1, 28, 28), float("nan")), ValueError, "start contains non-finite"),
        (torch.zeros(4, 1, 28, 28, dtype=torch.int64), TypeError, "start must be a floating-point Tensor"),
    ],
)
def test_a_bad_start_is_refused_by_name_before_any_forward(start, error, match):
    encoder = Counting(small_cnn())
    reg = BackboneRobustnessRegularizer(0.1, ascent="positive")
    with pytest.raises(error, match=match):
        reg(encoder, torch.rand(4, 1, 28, 28), positive=torch.rand(4, 16), start=start)
    assert encoder.calls == 0


# The single-step inner maximisation (N-FGSM, de Jorge et al. 2022): noise of 2 eps, one step of eps, reach 3 eps.


def linf_deviation(out, x):
    return (out.adversarial_inputs - x).abs().flatten(1).max(dim=1).values


def test_n_fgsm_perturbs_beyond_epsilon_and_within_three_epsilon(encoder, images):
    reg = RobustnessRegularizer(0.05, inner="n-fgsm")
    positive = torch.randn(images.shape[0], 16)
    out = reg(encoder, images, positive=positive)
    reach = linf_deviation(out, images)
    assert (reach <= 3 * 0.05 + 1e-6).all() and (reach > 0.05 + 1e-6).any()


def test_pgd_stays_within_epsilon(encoder, images):
    reg = RobustnessRegularizer(0.05, inner="pgd")
    assert reg.inner == "pgd" and reg.steps == 3
    out = reg(encoder, images, positive=torch.randn(images.shape[0], 16))
    assert (linf_deviation(out, images) <= 0.05 + 1e-6).all()


def test_the_default_inner_maximisation_is_n_fgsm_on_the_linf_balls_it_was_measured_on():
    assert RobustnessRegularizer(8 / 255).inner == "n-fgsm"
    assert RobustnessRegularizer(0.1).steps == 1
    assert RobustnessRegularizer(1 / 6).inner == "n-fgsm"  # reaches half the range


@pytest.mark.parametrize(
    "options",
    [{"steps": 3}, {"steps": 0}, {"step_size": 0.01}, {"epsilon": 0.2}, {"epsilon": 0.5, "norm": "l2"}],
    ids=["steps", "random-start-only", "step-size", "large-linf-ball", "l2-ball"],
)
def test_the_default_is_pgd_where_pgd_is_asked_for_or_n_fgsm_was_not_measured(options):
    options = {"epsilon": 0.05, **options}
    reg = RobustnessRegularizer(**options)
    assert reg.inner == "pgd" and reg.steps == options.get("steps", 3)


def test_the_backbone_form_keeps_pgd_by_default():
    assert BackboneRobustnessRegularizer(0.05).inner == "pgd"
    assert BackboneRobustnessRegularizer(0.05, inner="n-fgsm").inner == "n-fgsm"


def test_n_fgsm_costs_one_ascent_forward(encoder, images):
    # Given the clean features: one ascent forward (and its backward), one forward at the point found.
    counting = Counting(encoder)
    features = counting(images)
    counting.calls = 0
    RobustnessRegularizer(0.05, inner="n-fgsm")(counting, images, features=features, positive=torch.randn(16, 16))
    pgd = Counting(encoder)
    RobustnessRegularizer(0.05, inner="pgd")(pgd, images, features=features.detach(), positive=torch.randn(16, 16))
    assert counting.calls == 2 and pgd.calls == 4


def test_n_fgsm_is_shown_in_the_repr_instead_of_steps():
    assert "inner='n-fgsm'" in repr(RobustnessRegularizer(0.05, inner="n-fgsm"))
    pgd = repr(RobustnessRegularizer(0.05, inner="pgd"))
    assert "steps=3" in pgd and "inner" not in pgd


@pytest.mark.parametrize(
    "options, match",
    [
        ({"inner": "fgsm"}, "inner must be one of"),
        ({"inner": "n-fgsm", "steps": 3}, "inner='n-fgsm' takes one step.*pass inner='pgd'"),
        ({"inner": "n-fgsm", "step_size": 0.01}, "inner='n-fgsm' takes one step.*pass inner='pgd'"),
    ],
)
def test_an_inner_maximisation_that_does_not_fit_its_settings_is_refused_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        RobustnessRegularizer(0.05, **options)


def test_n_fgsm_refuses_an_linf_ball_whose_reach_exceeds_half_the_range():
    RobustnessRegularizer(0.15, inner="n-fgsm")  # reaches 0.45
    with pytest.raises(ValueError, match=r"searches 3 \* epsilon.*pass inner='pgd'"):
        RobustnessRegularizer(0.2, inner="n-fgsm")


def test_n_fgsm_refuses_a_warm_start_and_leaves_the_memory_empty(encoder, images):
    from robust_reg import PerturbationMemory

    memory = PerturbationMemory()
    reg = RobustnessRegularizer(0.05, inner="n-fgsm")
    with pytest.raises(ValueError, match="warm start.*inner='n-fgsm'.*steps=2"):
        reg(encoder, images, positive=torch.randn(16, 16), start=memory.at(torch.arange(16)))
    assert len(memory) == 0


def test_a_warm_start_of_the_default_names_the_multi_step_ascent_it_needs(encoder, images):
    from robust_reg import PerturbationMemory

    positive, start = torch.randn(16, 16), PerturbationMemory().at(torch.arange(16))
    with pytest.raises(ValueError, match="the default for this ball.*steps=2, step_size=epsilon / 2"):
        RobustnessRegularizer(0.05)(encoder, images, positive=positive, start=start)
    RobustnessRegularizer(0.05, steps=2)(encoder, images, positive=positive, start=start)  # the fix works


# inner="n-fgsm-start": the anchor is taken in the pass at N-FGSM's noisy start, which is also the ascent's iterate.


def _recorded_inputs(encoder: nn.Module) -> list[torch.Tensor]:
    inputs: list[torch.Tensor] = []
    encoder.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach().clone()))
    return inputs


def test_anchor_at_the_start_takes_two_passes_and_no_clean_one(encoder, images):
    counting = Counting(encoder)
    reg = RobustnessRegularizer(0.05, inner="n-fgsm-start")
    reg(counting, images, positive=torch.randn(16, 16)).loss.backward()
    assert counting.calls == 2  # the noisy start (anchor and ascent) and the point found; N-FGSM's default: 3


def test_anchor_at_the_start_steps_n_fgsm_from_the_noisy_pass_it_anchors_on(encoder):
    torch.manual_seed(0)
    x, positive = torch.rand(16, 1, 12, 12) * 0.6 + 0.2, torch.randn(16, 16)  # room for 3 eps inside [0, 1]
    inputs = _recorded_inputs(encoder)
    out = RobustnessRegularizer(0.05, inner="n-fgsm-start")(encoder, x, positive=positive)
    noisy = inputs[0].requires_grad_(True)
    embedding = nn.functional.normalize(encoder(noisy).flatten(1), dim=1)
    score = (embedding - nn.functional.normalize(positive, dim=1)).pow(2).sum()
    (grad,) = torch.autograd.grad(score, noisy)
    assert 0.05 < (noisy - x).abs().max() <= 2 * 0.05 + 1e-6  # N-FGSM's noise of 2 eps
    torch.testing.assert_close(out.adversarial_inputs, noisy.detach() + 0.05 * grad.sign())


def test_anchor_at_the_start_measures_the_deviation_from_the_noisy_pass(encoder, images):
    inputs = _recorded_inputs(encoder)
    reg = RobustnessRegularizer(0.05, inner="n-fgsm-start")
    out = reg(encoder, images, positive=torch.randn(16, 16))
    with torch.no_grad():
        anchor = nn.functional.normalize(encoder(inputs[0]).flatten(1), dim=1)
        adversarial = nn.functional.normalize(out.adversarial_features.flatten(1), dim=1)
    torch.testing.assert_close(reg.last_stats.mean_squared_deviation, (adversarial - anchor).pow(2).sum(dim=1).mean())


def test_anchor_at_the_start_gives_the_encoder_the_anchors_gradient_unless_detached(encoder, images):
    # A penalty whose anchor has no gradient moves the parameters by the adversarial pass alone.
    grads = {}
    for detach in (False, True):
        torch.manual_seed(0)
        encoder.zero_grad()
        reg = RobustnessRegularizer(0.05, inner="n-fgsm-start", detach_anchor=detach)
        reg(encoder, images, positive=torch.randn(16, 16)).loss.backward()
        grads[detach] = [p.grad.clone() for p in encoder.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(grads[False], grads[True]))


def test_anchor_at_the_start_computes_the_value_without_grad(encoder, images):
    positive = torch.randn(16, 16)
    with torch.no_grad():
        out = RobustnessRegularizer(0.05, inner="n-fgsm-start")(encoder, images, positive=positive)
    assert torch.isfinite(out.loss) and not out.loss.requires_grad
    assert (linf_deviation(out, images) <= 3 * 0.05 + 1e-6).all()


@pytest.mark.parametrize("given", ["features", "start"])
def test_anchor_at_the_start_refuses_features_and_start_by_name(encoder, images, given):
    options = {"features": encoder(images)} if given == "features" else {"start": torch.zeros_like(images)}
    counting = Counting(encoder)
    with pytest.raises(ValueError, match=f"inner='n-fgsm-start'.*drop {given}="):
        RobustnessRegularizer(0.05, inner="n-fgsm-start")(counting, images, positive=torch.randn(16, 16), **options)
    assert counting.calls == 0


def test_anchor_at_the_start_is_shown_in_the_repr_as_the_inner_maximisation_asked_for():
    reg = RobustnessRegularizer(0.05, inner="n-fgsm-start")
    assert "inner='n-fgsm-start'" in repr(reg) and reg.inner == "n-fgsm" and reg.steps == 1
    assert "inner='n-fgsm'" in repr(RobustnessRegularizer(0.05))


def test_anchor_at_the_start_leaves_batch_norm_statistics_alone():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 8))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    RobustnessRegularizer(0.05, inner="n-fgsm-start")(encoder, torch.rand(8, 1, 12, 12), positive=torch.randn(8, 8))
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
