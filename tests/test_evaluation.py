"""Robust evaluation: attack specs, the per-sample worst case, AutoAttack and Square, the sanity checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robust_reg import evaluation as ev_module
from robust_reg import fit_linear_probe
from robust_reg.evaluation import PGD, AutoAttack, LinearProbeClassifier, Square, evaluate_robustness


class Quantize(nn.Module):
    """Rounds pixels to 4 levels: its gradient is zero almost everywhere (textbook gradient masking)."""

    def forward(self, x):
        return torch.round(x * 3) / 3


@pytest.fixture(scope="module")
def digit_models(digits):
    x, y = digits
    torch.manual_seed(0)
    flat = nn.Flatten()
    honest = LinearProbeClassifier(flat, fit_linear_probe(flat, [(x[:1200], y[:1200])], num_classes=10))
    masked_encoder = nn.Sequential(Quantize(), nn.Flatten())
    masked = LinearProbeClassifier(
        masked_encoder, fit_linear_probe(masked_encoder, [(x[:1200], y[:1200])], num_classes=10)
    )
    return honest.eval(), masked.eval(), x[1200:1300], y[1200:1300]


def test_autoattack_and_square_run_and_are_reported_per_eps(digit_models):
    pytest.importorskip("torchattacks")
    honest, _, x, y = digit_models
    report = evaluate_robustness(
        honest,
        x,
        y,
        epsilons=[0.05, 0.1],
        attacks=[PGD(10), AutoAttack(samples=40), Square(queries=200, samples=40)],
        check_steps=20,
    )
    for attack in ("PGD-10", "AutoAttack", "Square"):
        for eps in (0.05, 0.1):
            accuracy = report.accuracy(attack, eps)
            assert accuracy is not None and 0.0 <= accuracy <= report.clean_accuracy + 1e-9
    assert next(r for r in report.results if r.attack == "AutoAttack").num_samples == 40
    assert report.passed, str(report)


def test_gradient_masking_is_flagged_loudly(digit_models):
    pytest.importorskip("torchattacks")
    _, masked, x, y = digit_models
    report = evaluate_robustness(
        masked,
        x,
        y,
        epsilons=[0.3],
        attacks=[PGD(10), Square(queries=300, samples=100)],
        check_steps=20,
    )
    failed = {c.name.split(" (")[0] for c in report.checks if not c.passed}
    assert "black-box Square is not stronger than white-box PGD-10" in failed
    assert "accuracy falls to ~0 at a very large eps" in failed
    assert "input gradients are non-zero" in failed
    assert not report.passed
    assert "!!! SANITY CHECK FAILED" in str(report)


def test_an_honest_model_passes_every_check_without_torchattacks(digit_models):
    honest, _, x, y = digit_models
    report = evaluate_robustness(honest, x, y, epsilons=[0.1, 0.2], attacks=[PGD(10)], check_steps=30)
    assert report.passed, str(report)
    ran = {c.name for c in report.checks if c.ran}
    assert ran == {
        "the attacks change some prediction at the reported eps",
        "accuracy falls to ~0 at a very large eps",
        "accuracy does not rise with eps",
        "more PGD steps never raise accuracy",
        "model outputs are deterministic",
        "model outputs logits, not probabilities",
        "input gradients are non-zero",
    }


def test_a_check_that_cannot_run_says_why_instead_of_vanishing(digit_models):
    honest, _, x, y = digit_models
    report = evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(5)], check_steps=10)
    (square,) = [c for c in report.checks if c.name.startswith("black-box Square")]
    assert not square.ran and square.passed and "not run: Square" in square.detail


def test_missing_torchattacks_skips_by_default_and_fails_when_asked(digit_models, monkeypatch):
    honest, _, x, y = digit_models
    monkeypatch.setattr(ev_module, "_torchattacks", lambda: None)
    report = evaluate_robustness(honest, x, y, epsilons=[0.1], check_steps=5)
    assert report.skipped == ("AutoAttack (torchattacks not installed)", "Square (torchattacks not installed)")
    with pytest.raises(ImportError, match=r"robust-reg\[autoattack\]"):
        evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(3), AutoAttack()])


def test_evaluation_leaves_the_model_and_the_global_rng_as_they_were(digit_models):
    honest, _, x, y = digit_models
    honest.train()
    state = torch.random.get_rng_state()
    evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(3)], check_steps=5)
    assert honest.training and all(m.training for m in honest.modules())
    assert torch.equal(torch.random.get_rng_state(), state)
    honest.eval()


def test_bad_arguments_are_named(digit_models):
    honest, _, x, y = digit_models
    with pytest.raises(ValueError, match="epsilons"):
        evaluate_robustness(honest, x, y, epsilons=[])
    with pytest.raises(ValueError, match="steps"):
        evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(-1)])
    with pytest.raises(TypeError, match="attacks"):
        evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=["PGD-20"])
    with pytest.raises(ValueError, match="repeat"):
        evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(5), PGD(5)])
    with pytest.raises(ValueError, match="samples"):
        AutoAttack(samples=0)
    with pytest.raises(ValueError, match="y must have shape"):
        evaluate_robustness(honest, x, y[:5], epsilons=[0.1])
    with pytest.raises(ValueError, match="x has values"):
        evaluate_robustness(honest, x * 4, y, epsilons=[0.1])


def test_equal_check_steps_run_no_duplicate_attack_and_say_the_check_did_not_run(digit_models):
    honest, _, x, y = digit_models
    report = evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(5)], check_steps=5)
    rows = [(r.attack, r.epsilon) for r in report.results]
    assert len(rows) == len(set(rows)) == 2  # PGD-5 at 0.1 and at the large eps, nothing twice
    (steps_check,) = [c for c in report.checks if c.name == "more PGD steps never raise accuracy"]
    assert not steps_check.ran and steps_check.passed and "equals the main one" in steps_check.detail
    assert "n/a  more PGD steps" in str(report)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_leaves_the_cuda_rng_as_it_was(digit_models):
    honest, _, x, y = digit_models
    state = torch.cuda.get_rng_state()
    evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(2)], check_steps=3)
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_an_attack_already_in_the_list_is_not_run_again_for_the_steps_check(digit_models):
    honest, _, x, y = digit_models
    report = evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(5), PGD(20)], check_steps=20)
    rows = [(r.attack, r.epsilon) for r in report.results]
    assert rows.count(("PGD-20", 0.1)) == 1 and len(rows) == len(set(rows))


def test_worst_case_is_at_most_every_attacks_accuracy(digit_models):
    honest, _, x, y = digit_models
    report = evaluate_robustness(honest, x, y, epsilons=[0.05, 0.1], attacks=[PGD(3), PGD(10)], check_steps=10)
    for eps in (0.05, 0.1):
        robust = report.robust_accuracy(eps)
        assert robust <= min(r.accuracy for r in report.results if r.epsilon == eps) + 1e-12
        assert robust <= report.clean_accuracy


def test_worst_case_equals_an_attack_that_dominates_every_other(digit_models):
    honest, _, x, y = digit_models
    report = evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(10)], check_steps=10)
    # One attack, and it only breaks correctly classified samples or leaves them: the worst case is that attack
    # restricted to clean-correct samples, which is the attack itself when it never "fixes" a wrong sample.
    pgd, clean = report.correct("PGD-10", 0.1), report.correct("clean", 0.1)
    assert report.robust_accuracy(0.1) == pytest.approx((pgd & clean).float().mean().item())
    assert report.robust_accuracy(0.1, attacks=["PGD-10"]) == report.robust_accuracy(0.1)


def test_worst_case_counts_a_sample_robust_only_if_every_attack_failed_on_it():
    """A synthetic record: attack A breaks samples 0-1, attack B breaks 2-3; the worst case breaks 0-3."""
    from robust_reg.evaluation import AttackAccuracy, RobustnessEvaluation

    a = torch.tensor([False, False, True, True, True, True])
    b = torch.tensor([True, True, False, False, True, True])
    ev = RobustnessEvaluation(
        "linf", 6, 1.0,
        (AttackAccuracy("A", 0.1, a.float().mean().item(), 6), AttackAccuracy("B", 0.1, b.float().mean().item(), 6)),
        (), epsilons=(0.1,), num_classes=2,
        _correct={("clean", None): torch.ones(6, dtype=torch.bool), ("A", 0.1): a, ("B", 0.1): b},
    )  # fmt: skip
    assert ev.robust_accuracy(0.1) == pytest.approx(2 / 6)
    assert ev.robust_accuracy(0.1) < min(ev.accuracy("A", 0.1), ev.accuracy("B", 0.1))
    assert ev.to_dict()["robust_accuracy"][0]["accuracy"] == pytest.approx(2 / 6)


def test_worst_case_uses_only_the_samples_every_attack_attacked():
    from robust_reg.evaluation import AttackAccuracy, RobustnessEvaluation

    full = torch.tensor([True, True, False, False])
    first_two = torch.tensor([True, False])
    ev = RobustnessEvaluation(
        "linf", 4, 1.0,
        (AttackAccuracy("PGD-20", 0.1, 0.5, 4), AttackAccuracy("AutoAttack", 0.1, 0.5, 2)),
        (), epsilons=(0.1,), num_classes=2,
        _correct={("clean", None): torch.ones(4, dtype=torch.bool), ("PGD-20", 0.1): full,
                  ("AutoAttack", 0.1): first_two},
    )  # fmt: skip
    worst = ev.worst_case(0.1)
    assert (worst.num_samples, worst.accuracy) == (2, 0.5)


def test_the_0_1_0_flags_are_gone(digit_models):
    honest, _, x, y = digit_models
    with pytest.raises(TypeError, match="unexpected keyword argument.*pgd_steps"):
        evaluate_robustness(honest, x, y, epsilons=[0.1], pgd_steps=4, check_steps=5)


def test_an_unknown_keyword_is_a_type_error(digit_models):
    honest, _, x, y = digit_models
    with pytest.raises(TypeError, match="pgd_stepz"):
        evaluate_robustness(honest, x, y, epsilons=[0.1], pgd_stepz=4)


def test_probabilities_instead_of_logits_are_flagged(digit_models):
    honest, _, x, y = digit_models
    softmaxed = torch.nn.Sequential(honest, torch.nn.Softmax(dim=1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate_robustness(softmaxed, x, y, epsilons=[0.1], attacks=[PGD(3)], check_steps=5)
    (check,) = [c for c in report.checks if c.name == "model outputs logits, not probabilities"]
    assert not check.passed and not report.passed


def test_a_random_model_is_flagged():
    class Noisy(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3] + torch.randn(x.shape[0], 3)

    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
    report = evaluate_robustness(Noisy(), x, y, epsilons=[0.1], attacks=[PGD(2)], check_steps=3, num_classes=3)
    (check,) = [c for c in report.checks if c.name == "model outputs are deterministic"]
    assert not check.passed


def test_kept_adversarial_inputs_are_the_attacks_own(digit_models):
    honest, _, x, y = digit_models
    report = evaluate_robustness(honest, x, y, epsilons=[0.1], attacks=[PGD(5)], check_steps=5, keep_adversarial=True)
    x_adv = report.adversarial_inputs("PGD-5", 0.1)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        correct = honest(x_adv).argmax(1) == y
    assert torch.equal(correct, report.correct("PGD-5", 0.1))


def test_an_encoders_label_sets_each_get_their_own_probe_and_the_first_feeds_the_bound():
    from robust_reg.demo.data import load_dataset
    from robust_reg.demo.models import build_encoder
    from robust_reg.demo.pipeline import EvalConfig, evaluate_encoder

    data = load_dataset("digits").subset(train=300, test=60)
    torch.manual_seed(0)
    config = EvalConfig.for_dataset(
        "digits", label_sets=("parity", "digit"), pgd_steps=2, check_steps=2, autoattack=False, curve_samples=40
    )
    config.curve_epsilons = (0.0,)
    evaluation = evaluate_encoder(build_encoder("cnn", 1), data, config)
    assert {k: ev.num_classes for k, ev in evaluation.tasks.items()} == {"parity": 2, "digit": 10}
    assert evaluation.head.out_features == 2  # the first label set is the main one
    clean_first_40 = evaluation.robustness.correct("clean", 0.0)[:40].float().mean().item()
    assert evaluation.curve[0].clean_accuracy == pytest.approx(clean_first_40)
    worst = evaluation.worst_task(0.1)
    assert worst[1] == min(v for v in evaluation.task_robust_accuracy(0.1).values())
