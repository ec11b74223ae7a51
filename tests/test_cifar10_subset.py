"""Real natural images end to end: a few robust training steps on the offline CIFAR-10 subset, then the evaluation.

The subset lives beside the repository (``../shared/cifar10-subset/``, never committed). Outside CI
the test skips when the file is absent; in CI (``CI`` set) it must run, so its absence fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightly")

from robust_reg.demo.data import load_dataset  # noqa: E402
from robust_reg.demo.pipeline import EvalConfig, evaluate_encoder  # noqa: E402
from robust_reg.demo.training import TrainConfig, pretrain, training_defaults  # noqa: E402
from robust_reg.evaluation import AutoAttack, LinearProbeClassifier, evaluate_robustness  # noqa: E402

SUBSET = Path(
    os.environ.get(
        "ROBUST_REG_CIFAR10_SUBSET",
        Path(__file__).resolve().parents[2] / "shared" / "cifar10-subset" / "cifar10_subset.npz",
    )
)


@pytest.fixture(scope="module")
def subset():
    if not SUBSET.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the CIFAR-10 subset test: {SUBSET} is missing")
        pytest.skip(f"the offline CIFAR-10 subset is not at {SUBSET}")
    return load_dataset("cifar10-subset", path=SUBSET)


def test_the_subset_is_the_documented_real_cifar10_file(subset):
    assert (subset.x_train.shape, subset.x_test.shape) == ((4660, 3, 32, 32), (846, 3, 32, 32))
    assert subset.kind == "cifar10" and subset.num_classes == 10
    assert torch.bincount(subset.y_train, minlength=10).min() >= 435


def test_a_few_robust_steps_on_the_subset_train_and_evaluate_with_autoattack(subset):
    data = subset.subset(train=256, test=48)
    defaults = training_defaults(data)
    config = TrainConfig(method="simclr", arch=defaults["arch"], epochs=1, batch_size=64, epsilon=defaults["epsilon"])
    result = pretrain(data, config, progress_bar=False)
    assert result.steps == 4 and result.history[0]["reg"] > 0
    eval_config = EvalConfig.for_data(data, pgd_steps=3, check_steps=5, curve_samples=16, autoattack=False)
    eval_config.label_sets = ("class", "animal-vs-vehicle")
    encoder = result.encoder.to(memory_format=torch.channels_last)  # what GPU users pick: once crashed AutoAttack
    evaluation = evaluate_encoder(encoder, data, eval_config, progress_bar=False)
    eps = 8 / 255
    assert 0 <= evaluation.robustness.robust_accuracy(eps) <= evaluation.robustness.clean_accuracy
    assert set(evaluation.tasks) == {"class", "animal-vs-vehicle"}
    x = data.x_test[:16].to(memory_format=torch.channels_last)
    pytest.importorskip("torchattacks")
    model = LinearProbeClassifier(encoder, evaluation.head).eval()
    report = evaluate_robustness(model, x, data.y_test[:16], epsilons=[eps], attacks=[AutoAttack()], check_steps=3)
    assert report.accuracy("AutoAttack", eps) is not None
