"""The benchmark's faithful peers: ACL with dual BatchNorm and both views attacked, and DynACL's schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("lightly")

from harness import (  # noqa: E402
    DYNACL_MOMENTUM,
    PretrainConfig,
    _DualBatchNorm,
    acl_ds_step,
    add_dual_batch_norm,
    add_dual_batch_norm_and_ema,
    adversarial_batch_norm,
    authors_augment,
    dynacl_weight,
    keep_adversarial_batch_norm,
    online_parameters,
    pretrain,
    pseudo_label_purity,
    shift_hue,
)

from robust_reg import ThreatModel  # noqa: E402
from robust_reg.demo.data import ImageData  # noqa: E402
from robust_reg.demo.models import build_encoder  # noqa: E402
from robust_reg.demo.training import build_model  # noqa: E402


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
    from robust_reg.demo.augment import BatchAugment

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


# DynACL as its authors train it (PKU-ML/DYNACL train_DynACL.py, assign_label.py; ACL's train_simCLR.py).


def dynacl_model() -> nn.Module:
    model = simclr()
    add_dual_batch_norm_and_ema(model)
    return model.train()


def test_the_momentum_encoder_gets_no_gradient_and_moves_by_the_momentum_rule():
    model = dynacl_model()
    with torch.no_grad():  # make the two encoders differ, as after some training
        for p in online_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    online_before = [p.detach().clone() for p in online_parameters(model)]
    ema_before = [p.detach().clone() for p in model.ema.parameters()]
    config = PretrainConfig(variant="dynacl", epsilon=8 / 255, acl_steps=1)
    loss, _ = acl_ds_step(model, ThreatModel(8 / 255), torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16), config, 0)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.ema.parameters())
    assert any(p.grad is not None for p in online_parameters(model))
    for ema, old_ema, old_online in zip(model.ema.parameters(), ema_before, online_before):
        expected = DYNACL_MOMENTUM * old_ema + (1 - DYNACL_MOMENTUM) * old_online  # from the pre-step weights
        torch.testing.assert_close(ema.detach(), expected)


def test_dynacl_attack_and_loss_see_view_1_through_the_momentum_encoder(monkeypatch):
    import harness

    model = dynacl_model()
    x0, x1 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    seen = {"online": [], "ema": []}
    for name, module in (("online", model), ("ema", model.ema)):
        real = module.forward
        monkeypatch.setattr(module, "forward", lambda v, real=real, name=name: seen[name].append(v) or real(v))
    attacked = {}
    real_attack = harness.projected_gradient_ascent

    def spy(objective, x, threat, **kwargs):
        attacked["online"], attacked["ema"] = len(seen["online"]), len(seen["ema"])
        adv = real_attack(objective, x, threat, **kwargs)
        attacked["adv"] = adv
        attacked["during"] = (len(seen["online"]) - attacked["online"], len(seen["ema"]) - attacked["ema"])
        return adv

    monkeypatch.setattr(harness, "projected_gradient_ascent", spy)
    config = PretrainConfig(variant="dynacl", epsilon=8 / 255, acl_steps=2)
    acl_ds_step(model, ThreatModel(8 / 255), x0, x1, config, epoch=0)
    assert attacked["during"] == (2, 2)  # each ascent step: view 0 online, view 1 through the copy
    adv = attacked["adv"]
    loss_calls = seen["ema"][attacked["ema"] + 2 :]
    assert torch.equal(loss_calls[0], x1) and torch.equal(loss_calls[1], adv[8:])  # the clean and adversarial loss
    assert torch.equal(seen["online"][-2], x0) and torch.equal(seen["online"][-1], adv[:8])


def test_the_momentum_copy_routes_its_batch_norm_with_the_model():
    model = dynacl_model()
    duals = [m for m in model.ema.modules() if isinstance(m, _DualBatchNorm)]
    with adversarial_batch_norm(model):
        model.ema(torch.rand(4, 3, 16, 16))
    assert duals and all(d.adversarial.num_batches_tracked == 1 and d.clean.num_batches_tracked == 0 for d in duals)


def test_dynacl_evaluates_the_momentum_encoder_and_acl_the_trained_one():
    config = PretrainConfig(variant="dynacl", epochs=1, batch_size=16, epsilon=8 / 255, acl_steps=1)
    result = pretrain(tiny_data(), config, progress_bar=False)
    assert result.encoder is result.model.ema.backbone
    assert result.summary()["config"]["ema"] is True
    acl = pretrain(tiny_data(), PretrainConfig(variant="acl-ds", epochs=1, batch_size=16, acl_steps=1))
    assert acl.encoder is acl.model.backbone and not hasattr(acl.model, "ema")


def test_ema_is_dynacls_alone():
    with pytest.raises(ValueError, match="ema"):
        PretrainConfig(variant="acl-ds", ema=True)
    assert PretrainConfig(variant="dynacl", ema=False).ema is False  # 0.2's rows, for comparison


def test_lp_aft_clusters_the_momentum_encoders_clean_branch(monkeypatch):
    import harness

    from robust_reg.finetune import FinetuneSchedule

    clustered = {}

    class Spy:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def fit_predict(self, features):
            clustered["features"] = torch.as_tensor(features)
            return (torch.arange(len(features)) % self.kwargs["n_clusters"]).numpy()

    import sklearn.cluster

    monkeypatch.setattr(sklearn.cluster, "KMeans", Spy)
    monkeypatch.setattr(harness, "LP_AFT", FinetuneSchedule(epochs=1, lr=0.01, steps=1, batch_size=16))
    built = {}
    real_branch = harness.batch_norm_branch

    def branch(model, which):
        built[which] = real_branch(model, which)
        return built[which]

    monkeypatch.setattr(harness, "batch_norm_branch", branch)
    data = tiny_data()
    config = PretrainConfig(variant="dynacl", epochs=1, batch_size=16, epsilon=8 / 255, acl_steps=1, lp_aft=True)
    pretrain(data, config, progress_bar=False)
    clean = built["clean"].eval()
    with torch.no_grad():
        expected = torch.cat([clean(data.x_train[i : i + 500]).flatten(1) for i in range(0, 32, 500)])
    torch.testing.assert_close(clustered["features"], expected)


def test_the_authors_augmentation_at_full_strength():
    augment = authors_augment()
    assert augment.scale == (0.1, 1.0) and augment.ratio == (3 / 4, 4 / 3) and augment.flip == 0.5
    assert (augment.jitter, augment.hue, augment.jitter_p, augment.gray_p) == (0.4, 0.1, 0.8, 0.2)
    assert augment.random_order


def test_the_authors_augmentation_anneals_as_dynacl_reloads_it():
    weak = authors_augment().with_strength(0.5)
    assert weak.scale == pytest.approx((0.55, 1.0))  # 1 - 0.9 s
    assert (weak.jitter, weak.hue, weak.jitter_p, weak.gray_p) == pytest.approx((0.2, 0.05, 0.4, 0.1))
    assert weak.random_order and weak.flip == 0.5


@pytest.mark.parametrize("variant, expected", [("acl-ds", True), ("dynacl", True), ("robust", False), ("plain", False)])
def test_the_peers_train_with_their_authors_augmentation_and_the_rest_with_the_shared_recipe(variant, expected):
    assert PretrainConfig(variant=variant).authors_augment is expected


def test_hue_jitter_matches_torchvision():
    tf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.rand(3, 3, 8, 8)
    for shift in (0.1, -0.25):
        torch.testing.assert_close(shift_hue(x, torch.full((3,), shift)), tf.adjust_hue(x, shift), atol=1e-5, rtol=0)


def test_a_non_boolean_ema_or_augmentation_flag_is_refused():
    with pytest.raises(TypeError, match="ema must be True, False or None"):
        PretrainConfig(variant="dynacl", ema="false")  # a string would be truthy: the faithful form in disguise


def test_n_fgsm_perturbs_beyond_eps_within_three_eps_in_one_step():
    from harness import _robust_step, regularizer_for

    config = PretrainConfig(variant="robust", epsilon=0.05, inner="n-fgsm")
    reg = regularizer_for(config)
    assert (reg.inner, reg.steps, reg.epsilon) == ("n-fgsm", 1, pytest.approx(0.05))  # the package's own step
    torch.manual_seed(0)
    model = simclr()
    x0, x1 = torch.rand(8, 3, 16, 16) * 0.5 + 0.25, torch.rand(8, 3, 16, 16)  # inside [0, 1] with room for 3 eps
    seen = []
    original = reg.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((out.adversarial_inputs - args[1]).abs().max().item())
        return out

    reg.forward = spy
    _robust_step(model, reg, x0, x1, config)
    assert 0.05 < seen[0] <= 0.15 + 1e-6


def test_reuse_step_moves_the_stored_perturbation_by_one_sign_step_of_the_training_gradient():
    from harness import reuse_step

    from robust_reg import PerturbationMemory

    eps = 0.05
    config = PretrainConfig(variant="robust", epsilon=eps, warm_start=True, inner="reuse")
    torch.manual_seed(0)
    model = simclr()
    x0, x1 = torch.rand(8, 3, 16, 16) * 0.5 + 0.25, torch.rand(8, 3, 16, 16)  # inside [0, 1] with room for eps
    memory, index = PerturbationMemory(num_samples=8), torch.arange(8)
    memory.write(index, torch.zeros_like(x0))  # the visit starts at the clean view: the step alone moves it
    seen = {}
    loss, _ = reuse_step(model, x0, x1, config, memory.at(index))
    original = memory.write

    def spy(i, perturbation, geometry=None):
        seen["written"] = perturbation.clone()
        original(i, perturbation, geometry)

    memory.write = spy
    assert "written" not in seen  # nothing moves before the training backward
    loss.backward()
    written = seen["written"]
    assert written.abs().max() <= eps + 1e-6 and (written.abs() > eps / 2).float().mean() > 0.9
    assert torch.equal(memory.read(index, x0), written)


def _forward_inputs(model):
    """Every input ``model`` is called on, in order (a forward hook)."""
    inputs = []
    model.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach().clone()))
    return inputs


def test_clean_gradient_step_moves_view_0_one_sign_step_of_the_clean_gradient_plus_the_noise():
    from harness import _robust_step, regularizer_for

    eps = 0.05
    config = PretrainConfig(variant="robust", epsilon=eps, inner="n-fgsm-clean")
    torch.manual_seed(0)
    model = simclr()
    x0, x1 = torch.rand(8, 3, 16, 16) * 0.5 + 0.25, torch.rand(8, 3, 16, 16)  # room for 3 eps inside [0, 1]
    clean = x0.clone().requires_grad_(True)
    positive = torch.nn.functional.normalize(model(x1).detach(), dim=1)
    score = (torch.nn.functional.normalize(model(clean), dim=1) - positive).pow(2).sum()
    (grad,) = torch.autograd.grad(score, clean)
    torch.manual_seed(1)
    expected = x0 + (2 * torch.rand_like(x0) - 1) * (2 * eps) + eps * grad.sign()
    inputs = _forward_inputs(model)
    torch.manual_seed(1)
    _robust_step(model, regularizer_for(config), x0, x1, config)
    torch.testing.assert_close(inputs[-1], expected)


def test_noisy_anchor_step_takes_n_fgsms_step_from_the_noisy_point_it_anchors_on():
    from harness import _robust_step, regularizer_for

    eps = 0.05
    config = PretrainConfig(variant="robust", epsilon=eps, inner="n-fgsm-noisy")
    torch.manual_seed(0)
    model = simclr()
    x0, x1 = torch.rand(8, 3, 16, 16) * 0.5 + 0.25, torch.rand(8, 3, 16, 16)  # room for 3 eps inside [0, 1]
    torch.manual_seed(1)
    noisy = (x0 + (2 * torch.rand_like(x0) - 1) * (2 * eps)).requires_grad_(True)
    positive = torch.nn.functional.normalize(model(x1).detach(), dim=1)
    score = (torch.nn.functional.normalize(model(noisy), dim=1) - positive).pow(2).sum()
    (grad,) = torch.autograd.grad(score, noisy)
    inputs = _forward_inputs(model)
    torch.manual_seed(1)
    _robust_step(model, regularizer_for(config), x0, x1, config)
    torch.testing.assert_close(inputs[0], noisy.detach())  # view 0's only pass besides the adversarial one
    torch.testing.assert_close(inputs[-1], noisy.detach() + eps * grad.sign())


def test_one_pass_steps_take_one_forward_fewer_than_n_fgsm():
    from harness import _robust_step, regularizer_for

    counts = {}
    steps = (("n-fgsm", "clean"), ("n-fgsm-clean", "clean"), ("n-fgsm-noisy", "clean"), ("n-fgsm", "start"))
    for inner, anchor in steps:
        config = PretrainConfig(variant="robust", epsilon=0.05, inner=inner, anchor=anchor)
        model = simclr()
        inputs = _forward_inputs(model)
        _robust_step(model, regularizer_for(config), torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16), config)
        counts[inner, anchor] = len(inputs)
    assert counts == dict(zip(steps, (4, 3, 3, 3)))  # the one-pass steps: no clean pass of view 0


def test_refine_steps_the_least_moved_share_once_more_from_where_n_fgsm_left_them():
    from harness import _robust_step, regularizer_for

    eps = 0.05
    config = PretrainConfig(variant="robust", epsilon=eps, inner="n-fgsm", refine=0.25)
    model = simclr()
    passes = []
    model.register_forward_hook(lambda module, args, output: passes.append((args[0].detach(), output.detach())))
    x0 = torch.rand(8, 3, 16, 16) * 0.5 + 0.25
    _robust_step(model, regularizer_for(config), x0, torch.rand(8, 3, 16, 16), config)
    (_, clean), _, _, (adversarial, moved_to), (refining, _), (refined, _) = passes  # 2 of 8 samples refined
    unit = torch.nn.functional.normalize
    least_moved = (unit(moved_to, dim=1) - unit(clean, dim=1)).pow(2).sum(dim=1).topk(2, largest=False).indices
    torch.testing.assert_close(refining, adversarial[least_moved])
    assert (refined - refining).abs().max() <= eps + 1e-6 and not torch.equal(refined, refining)
    assert (refined - x0[least_moved]).abs().max() <= 3 * eps + 1e-6


@pytest.mark.parametrize("fields", [{"refine": 1.0}, {"refine": -0.1}, {"refine": 0.25, "inner": "pgd"}])
def test_refine_outside_a_share_of_n_fgsms_samples_is_refused_by_name(fields):
    with pytest.raises(ValueError, match="refine"):
        PretrainConfig(**{"variant": "robust", "inner": "n-fgsm", **fields})


def test_the_anchor_at_the_start_is_the_packages_noisy_anchor_step():
    config = PretrainConfig(variant="robust", epsilon=0.05, inner="n-fgsm", anchor="start", detach_anchor=True)
    from harness import regularizer_for

    reg = regularizer_for(config)
    assert reg.anchor == "start" and "inner='n-fgsm-start'" in repr(reg) and reg.detach_anchor
    with pytest.raises(ValueError, match="anchor='start' replaces view 0's clean pass"):
        PretrainConfig(variant="robust", anchor="start")  # inner pgd


def test_clean_gradient_step_leaves_batch_norm_statistics_to_the_clean_passes():
    from harness import clean_gradient_step

    config = PretrainConfig(variant="robust", epsilon=0.05, inner="n-fgsm-clean", detach_anchor=True)
    model = simclr()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    clean_gradient_step(model, torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16), config)
    assert {int(m.num_batches_tracked) for m in norms} == {2}  # view 0's clean pass and view 1's, not the adversarial


def test_noisy_anchor_step_leaves_batch_norm_statistics_to_the_clean_view():
    from harness import clean_gradient_step

    config = PretrainConfig(variant="robust", epsilon=0.05, inner="n-fgsm-noisy")
    model = simclr()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    clean_gradient_step(model, torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16), config, at_noise=True)
    assert {int(m.num_batches_tracked) for m in norms} == {1}  # view 1's clean pass only


def test_reuse_step_needs_the_memory():
    with pytest.raises(ValueError, match="inner='reuse'.*warm_start"):
        PretrainConfig(variant="robust", inner="reuse")


def test_n_fgsm_is_for_the_robust_variant_only():
    with pytest.raises(ValueError, match="inner='n-fgsm' needs variant 'robust'"):
        PretrainConfig(variant="acl", inner="n-fgsm")
    with pytest.raises(ValueError, match="inner='n-fgsm-clean' needs variant 'robust'"):
        PretrainConfig(variant="acl", inner="n-fgsm-clean")
    with pytest.raises(ValueError, match="inner='n-fgsm-noisy' needs variant 'robust'"):
        PretrainConfig(variant="acl", inner="n-fgsm-noisy")


def test_free_step_moves_the_perturbation_one_sign_step_of_each_replays_training_gradient():
    from harness import free_step

    eps = 0.05
    config = PretrainConfig(variant="robust", epsilon=eps, inner="free", replays=2, detach_anchor=True)
    model = simclr()
    x = torch.rand(8, 3, 16, 16) * 0.5 + 0.25  # inside [0, 1] with room for eps
    state: dict = {}
    loss, _ = free_step(model, x, lambda v: v.clone(), config, state)
    first = state["delta"].clone()
    assert first.abs().max() <= eps  # the batch's uniform draw
    loss.backward()
    moved = state["delta"] - first
    assert moved.abs().max() <= 2 * eps + 1e-6 and not torch.equal(moved, torch.zeros_like(moved))
    assert state["delta"].abs().max() <= eps + 1e-6  # projected back onto the ball


def test_free_step_replays_the_same_views_until_a_new_batch_comes():
    from harness import free_step

    config = PretrainConfig(variant="robust", epsilon=0.05, inner="free", replays=2)
    model = simclr()
    x, other = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    state: dict = {}
    free_step(model, x, lambda v: v + 0.01 * torch.rand_like(v), config, state)
    views = state["views"]
    free_step(model, x, lambda v: v + 0.01 * torch.rand_like(v), config, state)
    assert state["views"] is views  # a replay: the same augmented views
    free_step(model, other, lambda v: v + 0.01 * torch.rand_like(v), config, state)
    assert state["views"] is not views


def test_free_training_steps_each_batch_replays_times():
    config = PretrainConfig(variant="robust", epochs=1, batch_size=16, epsilon=8 / 255, inner="free", replays=3)
    result = pretrain(tiny_data(), config, progress_bar=False)
    assert result.steps == 3 * 2  # 32 images in batches of 16, each stepped 3 times


def test_replays_are_for_free_training_only():
    with pytest.raises(ValueError, match="inner='free' replays each batch 2 or more times"):
        PretrainConfig(variant="robust", inner="free")
    with pytest.raises(ValueError, match="inner='free' replays each batch 2 or more times"):
        PretrainConfig(variant="robust", inner="n-fgsm", replays=2)
