"""The fine-tuning modes of the robust-SSL field: ALF trains its head on attacks, AFF trains a copy of the encoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_reg import fit_linear_probe
from robust_reg.evaluation import PGD, LinearProbeClassifier, evaluate_robustness
from robust_reg.finetune import (
    ALF_CPU,
    FinetuneSchedule,
    adversarial_finetune,
    fit_adversarial_linear_probe,
)

EPS = 0.1


WEAK = 100


def brittle_task(n: int = 512, seed: int = 0):
    """A hundred pixels 0.08 from the centre by class (an eps-0.1 attack reverses each), and one pixel 0.3 from it
    with noise (robust to 0.1 but noisy)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s = (2 * y - 1).float()[:, None]
    weak = 0.5 + 0.08 * s.expand(n, WEAK)
    strong = 0.5 + 0.3 * s + 0.12 * torch.randn(n, 1, generator=g)
    return torch.cat([weak, strong], dim=1).clamp(0, 1).view(n, 1, 1, WEAK + 1), y


def two_feature_encoder() -> nn.Module:
    """Features ``10 * (mean of the weak pixels - 0.5)`` (+-0.8, noise-free: what clean training leans on) and
    ``strong pixel - 0.5`` (+-0.3 with noise: what survives the attack)."""
    linear = nn.Linear(WEAK + 1, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0, :WEAK] = 10 / WEAK
        linear.weight[1, WEAK] = 1.0
        linear.bias.copy_(torch.tensor([-5.0, -0.5]))
    return nn.Sequential(nn.Flatten(), linear)


def robust_accuracy(model: nn.Module, x, y) -> float:
    ev = evaluate_robustness(model, x, y, epsilons=[EPS], attacks=[PGD(20)], check_steps=0)
    return ev.robust_accuracy(EPS)


def batches(x, y, size=128):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


SCHEDULE = FinetuneSchedule(epochs=15, lr=0.5, steps=10)


def test_alf_beats_slf_under_attack_where_the_clean_head_is_brittle():
    torch.manual_seed(0)
    x, y = brittle_task()
    x_test, y_test = brittle_task(256, seed=1)
    encoder = two_feature_encoder()
    slf = LinearProbeClassifier(encoder, fit_linear_probe(encoder, batches(x, y), 2))
    alf = LinearProbeClassifier(
        encoder, fit_adversarial_linear_probe(encoder, batches(x, y), 2, epsilon=EPS, schedule=SCHEDULE)
    )
    assert robust_accuracy(slf, x_test, y_test) < 0.5
    assert robust_accuracy(alf, x_test, y_test) > robust_accuracy(slf, x_test, y_test) + 0.4


def test_alf_trained_on_clean_inputs_would_be_as_brittle_as_slf(monkeypatch):
    """The property above rests on the attack: with the training attack disabled, ALF loses its edge."""
    import robust_reg.finetune as finetune

    monkeypatch.setattr(finetune, "pgd_attack", lambda model, x, y, threat, **kwargs: x)
    torch.manual_seed(0)
    x, y = brittle_task()
    x_test, y_test = brittle_task(256, seed=1)
    encoder = two_feature_encoder()
    clean_trained = fit_adversarial_linear_probe(encoder, batches(x, y), 2, epsilon=EPS, schedule=SCHEDULE)
    assert robust_accuracy(LinearProbeClassifier(encoder, clean_trained), x_test, y_test) < 0.5


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


def images(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def snapshot(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def unchanged(module: nn.Module, before: dict) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


FAST = FinetuneSchedule(epochs=2, lr=0.1, steps=2)


def test_alf_leaves_the_encoder_its_weights_statistics_flags_and_mode():
    encoder = small_cnn().train()
    encoder[0].weight.requires_grad_(False)
    before = snapshot(encoder)
    x, y = images()
    fit_adversarial_linear_probe(encoder, batches(x, y, 8), 3, epsilon=8 / 255, schedule=FAST)
    assert unchanged(encoder, before)  # weights and BatchNorm statistics
    assert encoder.training and not encoder[0].weight.requires_grad and encoder[1].weight.requires_grad
    assert all(p.grad is None for p in encoder.parameters())


def test_slf_leaves_the_encoder_unchanged():
    encoder = small_cnn().train()
    before = snapshot(encoder)
    x, y = images()
    fit_linear_probe(encoder, batches(x, y, 8), 3)
    assert unchanged(encoder, before) and encoder.training


def test_aff_changes_the_encoder_weights_of_its_copy_and_never_the_callers():
    encoder = small_cnn()
    before = snapshot(encoder)
    x, y = images()
    model = adversarial_finetune(encoder, batches(x, y, 8), 3, epsilon=8 / 255, schedule=FAST)
    assert unchanged(encoder, before)
    assert model.encoder is not encoder
    assert not torch.equal(model.encoder[0].weight, encoder[0].weight)
    assert not model.training


def test_aff_with_the_same_seed_is_reproducible():
    x, y = images()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(adversarial_finetune(small_cnn(), batches(x, y, 8), 3, epsilon=8 / 255, schedule=FAST)(x))
    torch.testing.assert_close(runs[0], runs[1])


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(epochs=0), "epochs"),
        (dict(lr=0.0), "lr"),
        (dict(steps=0), "steps"),
        (dict(milestones=(11,)), "milestones"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(step_size=0.0), "step_size"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_a_bad_schedule_is_refused_by_name(fields, named):
    with pytest.raises(ValueError, match=named):
        FinetuneSchedule(**{"epochs": 10, "lr": 0.1, **fields})


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(epsilon=8.0), "epsilon"),
        (dict(norm="l3"), "norm"),
    ],
)
@pytest.mark.parametrize("mode", [fit_adversarial_linear_probe, adversarial_finetune])
def test_a_bad_argument_is_refused_by_name_before_training(mode, kwargs, named):
    encoder = small_cnn()
    before = snapshot(encoder)
    x, y = images()
    args = {"num_classes": 3, "epsilon": 8 / 255, **kwargs}
    with pytest.raises(ValueError, match=named):
        mode(encoder, batches(x, y, 8), args.pop("num_classes"), schedule=FAST, **args)
    assert unchanged(encoder, before)


def test_aff_refuses_a_negative_beta_by_name():
    x, y = images()
    with pytest.raises(ValueError, match="beta"):
        adversarial_finetune(small_cnn(), batches(x, y, 8), 3, epsilon=8 / 255, beta=-1.0, schedule=FAST)


def test_labels_outside_the_classes_are_refused_by_name():
    x, y = images()
    with pytest.raises(ValueError, match="labels"):
        fit_adversarial_linear_probe(small_cnn(), batches(x, y + 5, 8), 3, epsilon=8 / 255, schedule=FAST)


def test_the_paper_schedules_are_the_dynacl_authors_settings():
    from robust_reg.finetune import AFF_PAPER, ALF_PAPER

    assert (ALF_PAPER.epochs, ALF_PAPER.lr, ALF_PAPER.milestones, ALF_PAPER.steps) == (25, 0.01, (10, 20), 10)
    assert (AFF_PAPER.epochs, AFF_PAPER.lr, AFF_PAPER.milestones, AFF_PAPER.steps) == (25, 0.1, (15, 20), 10)
    assert ALF_PAPER.weight_decay == AFF_PAPER.weight_decay == 2e-4
    assert ALF_CPU.epochs < ALF_PAPER.epochs


def test_aff_can_start_from_a_probe_and_leaves_that_probe_unchanged():
    encoder = small_cnn()
    x, y = images()
    probe = fit_linear_probe(encoder, batches(x, y, 8), 3)
    before = snapshot(probe)
    model = adversarial_finetune(encoder, batches(x, y, 8), 3, epsilon=8 / 255, schedule=FAST, head=probe)
    assert unchanged(probe, before) and model.head is not probe


def test_aff_refuses_a_head_of_the_wrong_shape_by_name():
    x, y = images()
    with pytest.raises(ValueError, match="head"):
        adversarial_finetune(small_cnn(), batches(x, y, 8), 3, epsilon=8 / 255, schedule=FAST, head=nn.Linear(5, 3))


def test_a_diverging_aff_fails_with_the_fix_instead_of_returning_nan_weights():
    encoder = small_cnn()
    x, y = images()
    huge = nn.Linear(4, 3)
    with torch.no_grad():
        huge.weight.fill_(1e30)
    with pytest.raises(FloatingPointError, match="schedule.lr"):
        adversarial_finetune(encoder, batches(x, y, 8), 3, epsilon=8 / 255, schedule=FAST, head=huge)
