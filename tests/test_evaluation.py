"""Robust evaluation: AutoAttack and Square through torchattacks, and the gradient-masking checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_reg import evaluation as ev_module
from robust_reg import fit_linear_probe
from robust_reg.evaluation import LinearProbeClassifier, evaluate_robustness


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
        pgd_steps=10,
        check_steps=20,
        autoattack_samples=40,
        square_samples=40,
        square_queries=200,
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
        pgd_steps=10,
        check_steps=20,
        autoattack=False,
        square=True,
        square_samples=100,
        square_queries=300,
    )
    failed = {c.name.split(" (")[0] for c in report.checks if not c.passed}
    assert "black-box Square is not stronger than white-box PGD" in failed
    assert "accuracy falls to ~0 at a very large eps" in failed
    assert not report.passed
    assert "!!! SANITY CHECK FAILED" in str(report)


def test_an_honest_model_passes_every_check_without_torchattacks(digit_models):
    honest, _, x, y = digit_models
    report = evaluate_robustness(
        honest, x, y, epsilons=[0.1, 0.2], pgd_steps=10, check_steps=30, autoattack=False, square=False
    )
    assert report.passed, str(report)
    assert {c.name for c in report.checks} == {
        "accuracy falls to ~0 at a very large eps",
        "accuracy does not rise with eps",
        "more PGD steps never raise accuracy",
    }


def test_missing_torchattacks_skips_by_default_and_fails_when_asked(digit_models, monkeypatch):
    honest, _, x, y = digit_models
    monkeypatch.setattr(ev_module, "_torchattacks", lambda: None)
    report = evaluate_robustness(honest, x, y, epsilons=[0.1], pgd_steps=3, check_steps=5)
    assert report.skipped == ("AutoAttack (torchattacks not installed)", "Square (torchattacks not installed)")
    with pytest.raises(ImportError, match=r"robust-reg\[autoattack\]"):
        evaluate_robustness(honest, x, y, epsilons=[0.1], autoattack=True)


def test_evaluation_leaves_the_model_and_the_global_rng_as_they_were(digit_models):
    honest, _, x, y = digit_models
    honest.train()
    state = torch.random.get_rng_state()
    evaluate_robustness(honest, x, y, epsilons=[0.1], pgd_steps=3, check_steps=5, autoattack=False, square=False)
    assert honest.training and all(m.training for m in honest.modules())
    assert torch.equal(torch.random.get_rng_state(), state)
    honest.eval()


def test_bad_arguments_are_named(digit_models):
    honest, _, x, y = digit_models
    with pytest.raises(ValueError, match="epsilons"):
        evaluate_robustness(honest, x, y, epsilons=[])
    with pytest.raises(ValueError, match="pgd_steps"):
        evaluate_robustness(honest, x, y, epsilons=[0.1], pgd_steps=-1)
    with pytest.raises(ValueError, match="y must have shape"):
        evaluate_robustness(honest, x, y[:5], epsilons=[0.1])
    with pytest.raises(ValueError, match="x has values"):
        evaluate_robustness(honest, x * 4, y, epsilons=[0.1])


def test_equal_check_steps_run_no_duplicate_attack_and_say_the_check_did_not_run(digit_models):
    honest, _, x, y = digit_models
    report = evaluate_robustness(
        honest, x, y, epsilons=[0.1], pgd_steps=5, check_steps=5, autoattack=False, square=False
    )
    rows = [(r.attack, r.epsilon) for r in report.results]
    assert len(rows) == len(set(rows)) == 2  # PGD-5 at 0.1 and at the large eps, nothing twice
    (steps_check,) = [c for c in report.checks if c.name == "more PGD steps never raise accuracy"]
    assert not steps_check.ran and steps_check.passed and "check_steps equals pgd_steps" in steps_check.detail
    assert "n/a  more PGD steps" in str(report)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_leaves_the_cuda_rng_as_it_was(digit_models):
    honest, _, x, y = digit_models
    state = torch.cuda.get_rng_state()
    evaluate_robustness(honest, x, y, epsilons=[0.1], pgd_steps=2, check_steps=3, autoattack=False, square=False)
    assert torch.equal(torch.cuda.get_rng_state(), state)
