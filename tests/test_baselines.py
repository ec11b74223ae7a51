"""The benchmark's faithful peers: ACL with dual BatchNorm and both views attacked, and DynACL's schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("lightly")

from harness import (  # noqa: E402
    PretrainConfig,
    _DualBatchNorm,
    acl_ds_step,
    add_dual_batch_norm,
    adversarial_batch_norm,
    dynacl_weight,
    keep_adversarial_batch_norm,
    pretrain,
    pseudo_label_purity,
)

from robust_reg import ThreatModel  # noqa: E402
from robust_reg.experiments.data import ImageData  # noqa: E402
from robust_reg.experiments.models import build_encoder  # noqa: E402
from robust_reg.experiments.training import build_model  # noqa: E402


def simclr() -> nn.Module:
    torch.manual_seed(0)
    return build_model("simclr", build_encoder("cnn", 3), (3, 16, 16))


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_dual_batch_norm_gives_every_batch_norm_an_adversarial_twin_and_routes_to_it():
    model = simclr()
    count = len(batch_norms(model))
    add_dual_batch_norm(model)
    duals = [m for m in model.modules() if isinstance(m, _DualBatchNorm)]
    assert len(duals) == count and len(batch_norms(model)) == 2 * count
    x = torch.rand(8, 3, 16, 16)
    model.train()
    model(x)
    assert all(d.clean.num_batches_tracked == 1 and d.adversarial.num_batches_tracked == 0 for d in duals)
    with adversarial_batch_norm(model):
        model(x)
    assert all(d.adversarial.num_batches_tracked == 1 for d in duals)


def test_the_encoder_kept_after_training_carries_the_adversarial_batch_norm():
    model = simclr()
    add_dual_batch_norm(model)
    dual = next(m for m in model.modules() if isinstance(m, _DualBatchNorm))
    with torch.no_grad():
        dual.adversarial.weight.fill_(3.0)
    adversarial = dual.adversarial
    keep_adversarial_batch_norm(model)
    assert not any(isinstance(m, _DualBatchNorm) for m in model.modules())
    assert any(m is adversarial for m in model.modules())


def test_the_acl_step_attacks_both_views_and_averages_the_clean_and_adversarial_losses(monkeypatch):
    import harness

    model = simclr()
    add_dual_batch_norm(model)
    model.train()
    x0, x1 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    attacked = {}
    real = harness.projected_gradient_ascent

    def spy(objective, x, threat, **kwargs):
        attacked["x"], attacked["route"] = x, model._dual_bn_route[0]
        attacked["adv"] = real(objective, x, threat, **kwargs)
        return attacked["adv"]

    monkeypatch.setattr(harness, "projected_gradient_ascent", spy)
    config = PretrainConfig(variant="acl-ds", epsilon=8 / 255, acl_steps=2)
    loss, _ = acl_ds_step(model, ThreatModel(8 / 255), x0, x1, config, epoch=0)
    assert torch.equal(attacked["x"], torch.cat([x0, x1])) and attacked["route"]  # both views, adversarial BN
    adv = attacked["adv"]
    assert not torch.equal(adv[:8], x0) and not torch.equal(adv[8:], x1)
    model.eval()
    with torch.no_grad():
        clean = model.loss_from_embeddings((x0, x1), (model(x0), model(x1)))
        with adversarial_batch_norm(model):
            robust = model.loss_from_embeddings((adv[:8], adv[8:]), (model(adv[:8]), model(adv[8:])))
    assert loss.item() != pytest.approx(robust.item())  # the clean term is in the loss
    assert torch.isfinite(clean) and torch.isfinite(robust)


def test_dynacl_moves_weight_from_the_clean_to_the_adversarial_term_in_steps_up_to_two():
    weights = [dynacl_weight(e, 1000) for e in range(1000)]
    assert weights[0] == weights[49] == 1.0
    assert weights[50] == pytest.approx(1 + 0.05 * 2 / 3)
    assert weights == sorted(weights) and max(weights) <= 2.0
    assert dynacl_weight(29, 30) == pytest.approx(1 + 14 * (2 / 30) * 2 / 3)


@pytest.mark.parametrize("variant", ["acl-ds", "dynacl"])
def test_acl_and_dynacl_are_simclrs(variant):
    with pytest.raises(ValueError, match="simclr"):
        PretrainConfig(method="byol", variant=variant)


def tiny_data() -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 16, 16, generator=g)
    y = torch.arange(32) % 2
    return ImageData("tiny", x, y, x[:8], y[:8], 2, kind="natural")


@pytest.mark.parametrize("variant", ["acl-ds", "dynacl"])
def test_a_dual_batch_norm_run_trains_and_returns_a_plain_encoder(variant):
    config = PretrainConfig(variant=variant, epochs=2, batch_size=16, epsilon=8 / 255, acl_steps=1)
    result = pretrain(tiny_data(), config, progress_bar=False)
    assert not any(isinstance(m, _DualBatchNorm) for m in result.model.modules())
    assert result.encoder(torch.rand(2, 3, 16, 16)).shape[0] == 2


def test_anneal_augment_gives_each_epoch_its_strength(monkeypatch):
    from robust_reg.experiments.augment import BatchAugment

    strengths = []
    real = BatchAugment.with_strength

    def spy(self, strength):
        strengths.append(strength)
        return real(self, strength)

    monkeypatch.setattr(BatchAugment, "with_strength", spy)
    config = PretrainConfig(variant="plain", epochs=3, batch_size=16, anneal_augment=True)
    pretrain(tiny_data(), config, progress_bar=False)
    assert strengths == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_lp_aft_post_processing_is_timed_into_the_training_time_and_changes_the_encoder(monkeypatch):
    import harness

    from robust_reg.finetune import FinetuneSchedule

    monkeypatch.setattr(harness, "LP_AFT", FinetuneSchedule(epochs=1, lr=0.01, steps=1, batch_size=16))
    config = PretrainConfig(variant="plain", epochs=1, batch_size=16, lp_aft=True)
    result = pretrain(tiny_data(), config, progress_bar=False)
    stage = result.history[-1]
    assert stage["stage"] == "lp-aft" and 0 < stage["seconds"] <= result.seconds
    assert result.encoder is not result.model.backbone  # the fine-tuned copy is what gets evaluated


def test_lp_aft_records_how_well_its_pseudo_labels_agree_with_the_classes(monkeypatch):
    import harness

    from robust_reg.finetune import FinetuneSchedule

    monkeypatch.setattr(harness, "LP_AFT", FinetuneSchedule(epochs=1, lr=0.01, steps=1, batch_size=16))
    result = pretrain(tiny_data(), PretrainConfig(variant="plain", epochs=1, batch_size=16, lp_aft=True))
    assert 0.0 < result.history[-1]["pseudo_label_purity"] <= 1.0


def test_pseudo_label_purity_is_one_when_the_clusters_are_the_classes_under_other_names():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert pseudo_label_purity(torch.tensor([2, 2, 0, 0, 1, 1]), labels) == 1.0


def test_pseudo_label_purity_counts_each_clusters_most_common_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # cluster 0 holds classes 0, 0, 1 (2 agree); cluster 1 holds 1, 2, 2 (2 agree)
    assert pseudo_label_purity(torch.tensor([0, 0, 0, 1, 1, 1]), labels) == pytest.approx(4 / 6)
