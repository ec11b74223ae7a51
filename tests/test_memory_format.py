"""Every entry point accepts channels-last inputs (and models) and gives what the contiguous layout gives.

CIFAR-10 loaded from HWC arrays (``permute(0, 3, 1, 2)``) and GPU code tuned for speed both hand
the package channels-last batches; torchattacks' FAB reshapes with ``.view`` and used to crash on them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_reg import (
    BackboneRobustnessRegularizer,
    PerturbationMemory,
    ThreatModel,
    crop_geometry,
    estimate_bound,
    extract_features,
    fit_linear_probe,
    pgd_attack,
)
from robust_reg.evaluation import PGD, AutoAttack, LinearProbeClassifier, Square, evaluate_robustness

CL = torch.channels_last


def _images(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images laid out as CIFAR-10 arrays load: HWC permuted to NCHW (channels-last strides)."""
    g = torch.Generator().manual_seed(seed)
    hwc = torch.rand(n, 8, 8, 3, generator=g)
    y = (hwc.mean(dim=(1, 2, 3)) > 0.5).long() + 2 * (hwc[..., 0].mean(dim=(1, 2)) > 0.5).long()
    return hwc.permute(0, 3, 1, 2), y


def _encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Flatten()
    )


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The same encoder twice: contiguous weights, and channels-last weights (what GPU users pick)."""
    plain = _encoder(seed)
    fast = _encoder(seed).to(memory_format=CL)
    return plain, fast


def test_the_cifar_style_batch_really_is_channels_last():
    x, _ = _images()
    assert not x.is_contiguous() and x.is_contiguous(memory_format=CL)


def test_random_start_is_the_same_draw_in_either_layout():
    x, _ = _images()
    for norm in ("linf", "l2"):
        threat = ThreatModel(8 / 255, norm=norm)
        torch.manual_seed(3)
        a = threat.random_start(x.contiguous())
        torch.manual_seed(3)
        b = threat.random_start(x)
        assert torch.equal(a, b), norm


@pytest.mark.parametrize("options", [{}, {"normalize_features": True, "ascent": "instance"}])
def test_regularizer_value_and_gradients_match_the_contiguous_call(options):
    x, _ = _images()
    plain, fast = _pair()
    values, grads = [], []
    for encoder, batch in ((plain, x.contiguous()), (fast, x)):
        reg = BackboneRobustnessRegularizer(8 / 255, steps=2, **options)
        torch.manual_seed(1)
        out = reg(encoder, batch)
        out.loss.backward()
        values.append((out.loss.detach(), out.adversarial_inputs))
        grads.append([p.grad for p in encoder.parameters()])
    assert torch.allclose(values[0][0], values[1][0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(values[0][1], values[1][1], atol=1e-6)
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, rtol=1e-3, atol=1e-5)


def test_warm_start_memory_with_crops_matches_the_contiguous_call():
    x, _ = _images(8)
    geometry = crop_geometry(torch.tensor([[1, 1, 6, 6]] * 8), (8, 8))
    results = []
    for encoder, batch in zip(_pair(), (x.contiguous(), x)):
        reg, memory = BackboneRobustnessRegularizer(8 / 255, steps=2), PerturbationMemory(num_samples=8)
        index = torch.arange(8)
        torch.manual_seed(2)
        for _ in range(2):  # the second call starts from what the first stored
            value = reg(encoder, batch, start=memory.at(index, geometry)).loss
        results.append((value.detach(), memory.read(index, batch.contiguous(), geometry)))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_pgd_attack_matches_the_contiguous_call():
    x, y = _images()
    model = nn.Sequential(_encoder(), nn.Linear(8 * 3 * 3, 4))
    fast = nn.Sequential(_encoder(), nn.Linear(8 * 3 * 3, 4)).to(memory_format=CL)
    fast.load_state_dict(model.state_dict())
    model.eval(), fast.eval()
    threat = ThreatModel(8 / 255)
    torch.manual_seed(4)
    a = pgd_attack(model, x.contiguous(), y, threat, steps=5)
    torch.manual_seed(4)
    b = pgd_attack(fast, x, y, threat, steps=5)
    assert torch.allclose(a, b, atol=1e-6)


def test_probe_and_features_match_the_contiguous_loader():
    x, y = _images(64)
    plain, fast = _pair()
    fa, la = extract_features(plain, [(x.contiguous(), y)])
    fb, lb = extract_features(fast, [(x, y)])
    assert torch.allclose(fa, fb, atol=1e-5) and torch.equal(la, lb)
    heads = []
    for encoder, batch in ((plain, x.contiguous()), (fast, x)):
        torch.manual_seed(0)  # the head's initialisation
        heads.append(fit_linear_probe(encoder, [(batch, y)], num_classes=4))
    # L-BFGS stops at its own tolerance: the two fits agree to it, and predict alike.
    assert torch.allclose(heads[0].weight, heads[1].weight, rtol=1e-2, atol=1e-2)
    assert torch.equal(heads[0](fa).argmax(1), heads[1](fb).argmax(1))


def test_bound_matches_the_contiguous_loader():
    x, y = _images(32)
    plain, fast = _pair()
    head = nn.Linear(8 * 3 * 3, 4)
    reports = []
    for encoder, batch in ((plain, x.contiguous()), (fast, x)):
        torch.manual_seed(5)
        reports.append(estimate_bound(encoder, head, [(batch, y)], epsilon=8 / 255, steps=3))
    a, b = reports
    for name in ("clean_loss", "adversarial_loss", "mean_deviation", "sigma", "bound"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-4, abs=1e-6), name
    assert a.adversarial_accuracy == b.adversarial_accuracy


def _brittle_but_not_hopeless(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """A linear probe on smooth (pooled) features: some test samples survive APGD at a tiny eps, so
    AutoAttack goes on to FAB with them."""
    encoder = nn.Sequential(nn.AvgPool2d(4), nn.Flatten())
    head = fit_linear_probe(encoder, [(x.contiguous(), y)], num_classes=4)
    return LinearProbeClassifier(encoder, head).eval()


def test_autoattack_runs_fab_on_channels_last_inputs_and_agrees_with_contiguous(monkeypatch):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = _images(96)
    model = _brittle_but_not_hopeless(x, y)
    fab_batches = []
    original = torchattacks.FAB.forward

    def spy(self, images, labels):
        fab_batches.append(images.shape[0])
        return original(self, images, labels)

    monkeypatch.setattr(torchattacks.FAB, "forward", spy)
    kwargs = dict(epsilons=[1 / 255], attacks=[PGD(5), AutoAttack(), Square(queries=50)], check_steps=10)
    fast = evaluate_robustness(model.to(memory_format=CL), x, y, **kwargs)
    assert fab_batches and sum(fab_batches) > 0, "no sample survived APGD: FAB never ran"
    plain = evaluate_robustness(model.to(memory_format=torch.contiguous_format), x.contiguous(), y, **kwargs)
    for attack in ("clean", "PGD-5", "AutoAttack", "Square"):
        assert torch.equal(plain.correct(attack, 1 / 255), fast.correct(attack, 1 / 255)), attack
    assert fast.robust_accuracy(1 / 255) > 0


def test_pretraining_in_channels_last_gives_the_contiguous_loss_and_gradients():
    from dataclasses import replace

    from robust_reg.demo.data import load_dataset
    from robust_reg.demo.training import TrainConfig, pretrain, recommended_step

    data = load_dataset("fake", fake_size=40)  # 32 training images: one step per epoch
    # steps=0: the ascent is the random start alone (the same draw in either layout, tested above). With sign
    # steps in the loop a rounding difference flips a step's sign on a few pixels, and the gradients then differ
    # by an amount that depends on the thread count and the CPU's kernels (3.6e-3 relative on one thread).
    config = TrainConfig(method="simclr", epochs=2, batch_size=32, epsilon=0.1, seed=0, steps=0)

    def first_gradients(config):
        inner, grads = recommended_step(config), {}

        def step(model, x, index, epoch, augment):
            if epoch == 1 and not grads:  # the first step's gradients, not yet zeroed by the second
                grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            return inner(model, x, index, epoch, augment)

        return pretrain(data, config, progress_bar=False, step=step), grads

    plain, plain_grads = first_gradients(config)
    fast, fast_grads = first_gradients(replace(config, channels_last=True))
    # The first conv of a grayscale input is ambiguous (one channel): look at one with several.
    conv = next(m for m in fast.encoder.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=CL) and not conv.weight.is_contiguous()
    assert fast.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], rel=1e-5)
    # Later losses are not compared: Adam's first step (about lr * sign(grad)) turns rounding differences into
    # whole steps, by an amount that depends on the CPU's kernels.
    assert plain_grads and plain_grads.keys() == fast_grads.keys()
    # BatchNorm's backward subtracts batch means of the incoming gradient: on 32 images this cancellation lifts
    # float32 rounding in the conv kernels (which differ between the layouts) to ~1e-3 of the gradient, 6e-3 on
    # one thread (measured); a layout bug (channels mixed up) moves it by O(1).
    for name, grad in plain_grads.items():
        assert (fast_grads[name] - grad).norm() <= 2e-2 * grad.norm(), name
