"""The lightly adapter, with real lightly heads, losses, transforms and Lightning training."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("lightly")
pl = pytest.importorskip("pytorch_lightning")

from lightly.transforms import SimCLRTransform  # noqa: E402
from lightly.transforms.utils import IMAGENET_NORMALIZE  # noqa: E402

from robust_reg import PerturbationMemory, crop_geometry  # noqa: E402
from robust_reg.integrations.lightly import is_robustified, robustify  # noqa: E402

from helpers import capture_callback, spy_on_regularizer  # noqa: E402
from lightly_modules import BYOL, SimCLR, loader, trainer  # noqa: E402

Capture = capture_callback(pl.Callback)


def as_loader(batches):
    """A DataLoader yielding these batches unchanged."""
    return torch.utils.data.DataLoader(batches, batch_size=None)


def fit(module, tmp_path, steps=2):
    capture = Capture()
    torch.manual_seed(0)
    trainer(tmp_path, max_steps=steps, callbacks=[capture]).fit(module, loader())
    return capture


def twins(cls):
    torch.manual_seed(0)
    plain = cls()
    return plain, copy.deepcopy(plain)


@pytest.mark.parametrize("cls", [SimCLR, BYOL])
def test_backbone_form_adds_exactly_the_weighted_term_and_logs_it(cls, tmp_path):
    plain, robust = twins(cls)
    robustify(robust, epsilon=8 / 255, weight=2.0, encoder="backbone")
    plain_run, robust_run = fit(plain, tmp_path), fit(robust, tmp_path)
    logged = robust_run.metrics[0]
    for key in (
        "robust_reg/value",
        "robust_reg/mean_squared_deviation",
        "robust_reg/mean_deviation",
        "robust_reg/variance",
    ):
        assert math.isfinite(logged[key])
    assert logged["robust_reg/value"] > 0
    # Same weights, batch and seed on the first step: the difference is exactly the added term.
    assert robust_run.losses[0] - plain_run.losses[0] == pytest.approx(2.0 * logged["robust_reg/value"], rel=1e-4)


@pytest.mark.parametrize("cls", [SimCLR, BYOL])
def test_encoder_gradient_differs_from_the_unrobustified_run(cls, tmp_path):
    plain, robust = twins(cls)
    robustify(robust)
    g_plain, g_robust = fit(plain, tmp_path, steps=1).grads, fit(robust, tmp_path, steps=1).grads
    assert any(not torch.allclose(a, b) for a, b in zip(g_plain, g_robust))


@pytest.mark.parametrize("cls", [SimCLR, BYOL])
def test_checkpoint_loads_into_the_unmodified_class(cls, tmp_path):
    original_keys = set(cls().state_dict())
    module = robustify(cls())
    assert set(module.state_dict()) == original_keys
    run = trainer(tmp_path, max_steps=2)
    run.fit(module, loader())
    path = tmp_path / "robust.ckpt"
    run.save_checkpoint(path)
    loaded = cls.load_from_checkpoint(path)
    assert not is_robustified(loaded)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    "options, forwards",
    [
        # The step's two views, three ascent steps, one adversarial forward whose output (with the
        # adversarial view) is what the loss sees: nothing computed twice.
        ({}, 2 + 3 + 1),
        ({"encoder": "backbone"}, 2 + 3 + 1),
        ({"encoder": "backbone", "adversarial_view": True}, 2 + 3 + 1),
        # Starting at the clean input, the first ascent forward is the perturbed view's clean pass.
        ({"random_start": False}, 1 + 3 + 1),
    ],
    ids=["default", "backbone", "backbone+adversarial-view", "default-clean-start"],
)
def test_the_step_pays_no_second_clean_forward_and_no_extra_adversarial_forward(options, forwards, tmp_path):
    calls = []
    module = robustify(SimCLR(), steps=3, **options)
    module.backbone.register_forward_hook(lambda *_: calls.append(1))
    trainer(tmp_path, max_steps=1).fit(module, loader())
    assert len(calls) == forwards


@pytest.mark.parametrize(
    "options, forwards", [({}, 2 + 1 + 1), ({"inner": "n-fgsm-start"}, 1 + 1 + 1)], ids=["n-fgsm", "n-fgsm-start"]
)
def test_the_anchor_at_the_start_replaces_the_perturbed_views_clean_forward(options, forwards, tmp_path):
    calls = []
    module = robustify(SimCLR(), **options)
    module.backbone.register_forward_hook(lambda *_: calls.append(1))
    trainer(tmp_path, max_steps=1).fit(module, loader())
    assert len(calls) == forwards


@pytest.mark.parametrize("options", [{"key": 0}, {"adversarial_view": False}], ids=["key", "no-adversarial-view"])
def test_the_anchor_at_the_start_is_refused_where_the_clean_forward_runs_anyway(options):
    module = SimCLR()
    with pytest.raises(ValueError, match="inner='n-fgsm-start'.*save nothing"):
        robustify(module, inner="n-fgsm-start", **options)
    assert not is_robustified(module)


class Recording(SimCLR):
    """Records what its (unchanged) SSL loss is given."""

    def training_step(self, batch, batch_index):
        (x0, x1) = batch[0]
        z0, z1 = self.forward(x0), self.forward(x1)
        self.seen = (x0, z0.detach().clone(), z1.detach().clone())
        return self.criterion(z0, z1)


@pytest.mark.parametrize(
    "options, perturbed",
    [({}, 1), ({"ascent": "instance"}, 0), ({"random_start": False}, 1), ({"inner": "n-fgsm"}, 1)],
    ids=["default-positive-second-view", "instance-first-view", "clean-start-second-view", "n-fgsm-second-view"],
)
def test_default_feeds_the_regularisers_adversarial_embedding_to_the_loss(options, perturbed):
    torch.manual_seed(0)
    module = robustify(Recording(), epsilon=0.05, weight=2.0, normalize=None, log=False, **options)
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    loss = module.training_step((views, torch.zeros(8)), 0)
    x0, *seen = module.seen
    assert x0 is views[0]  # the batch itself is not changed
    stats = module.training_step.regularizer.last_stats
    with torch.no_grad():
        clean = module.forward(views[perturbed])  # train-mode BN: the same batch statistics as in the step
    moved = torch.nn.functional.normalize(seen[perturbed], dim=1) - torch.nn.functional.normalize(clean, dim=1)
    assert moved.pow(2).sum(1).mean().item() == pytest.approx(stats.mean_squared_deviation.item(), rel=1e-4)
    assert stats.mean_squared_deviation.item() > 0
    ssl = module.criterion(*seen)
    assert loss.item() == pytest.approx(ssl.item() + 2.0 * stats.value.item(), rel=1e-5)


@pytest.mark.parametrize(
    "options, ascent",
    [({}, "positive"), ({"encoder": "backbone"}, "deviation"), ({"ascent": "instance"}, "instance")],
    ids=["default", "backbone", "chosen"],
)
def test_the_recommended_configuration_searches_away_from_the_other_view(options, ascent):
    module = robustify(Recording(), normalize=None, log=False, **options)
    assert module.training_step.regularizer.ascent == ascent


def test_the_single_step_inner_maximisation_reaches_the_regulariser():
    module = robustify(Recording(), epsilon=0.05, normalize=None, log=False, inner="n-fgsm")
    assert module.training_step.regularizer.inner == "n-fgsm" and module.training_step.regularizer.steps == 1


def test_a_warm_start_with_the_single_step_is_refused_and_the_module_left_alone():
    module = Recording()
    step = module.training_step
    with pytest.raises(ValueError, match="warm_start .*inner='n-fgsm'.*steps=2"):
        robustify(module, normalize=None, inner="n-fgsm", warm_start=True, index=lambda b: b[2])
    assert module.training_step == step and not is_robustified(module)


def test_the_adapter_takes_the_regularisers_default_n_fgsm_and_pgd_when_steps_are_given():
    assert robustify(Recording(), normalize=None, log=False).training_step.regularizer.inner == "n-fgsm"
    assert robustify(Recording(), normalize=None, log=False, steps=3).training_step.regularizer.inner == "pgd"


def test_a_warm_start_without_steps_is_refused_at_robustify_naming_the_multi_step_ascent():
    module = Recording()
    with pytest.raises(ValueError, match="warm_start .*N-FGSM \\(the default for this ball\\).*steps=2"):
        robustify(module, normalize=None, warm_start=True, index=lambda b: b[2])
    assert not is_robustified(module)


class Reversed(SimCLR):
    """Encodes the second view first."""

    def training_step(self, batch, batch_index):
        (x0, x1) = batch[0]
        z1 = self.forward(x1)
        return self.criterion(self.forward(x0), z1)


@pytest.mark.parametrize("cls, first", [(Recording, 0), (Reversed, 1)], ids=["in-order", "reversed"])
def test_the_positive_is_the_clean_embedding_of_the_view_encoded_first(cls, first):
    torch.manual_seed(0)
    module = robustify(cls(), normalize=None, log=False)
    calls = spy_on_regularizer(module)
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    module.training_step((views, None), 0)
    [(x, positive)] = calls
    assert x is views[1 - first]  # the second view encoded is the one perturbed
    with torch.no_grad():
        expected = module.forward(views[first])
    assert not positive.requires_grad
    torch.testing.assert_close(positive, expected)


def test_positive_view_is_required_with_a_custom_view():
    with pytest.raises(ValueError, match="positive_view"):
        robustify(SimCLR(), view=lambda batch: batch[0][1])
    assert robustify(SimCLR(), view=lambda batch: batch[0][1], ascent="instance").training_step.positive_view is None


def test_a_custom_positive_view_names_the_other_view():
    module = robustify(Recording(), normalize=None, log=False, view=lambda b: b[0][1], positive_view=lambda b: b[0][0])
    calls = spy_on_regularizer(module)
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    module.training_step((views, None), 0)
    assert calls[0][0] is views[1] and calls[0][1] is not None


def test_an_unreadable_positive_view_is_named():
    module = robustify(Recording(), normalize=None, log=False)
    with pytest.raises(ValueError, match=r"positive_view=.*robustify|could not read the view \(batch\[0\]\[1\]\)"):
        module.training_step(([torch.rand(8, 3, 28, 28)], None), 0)


def test_views_of_different_shapes_are_named():
    module = robustify(Recording(), normalize=None, log=False)
    with pytest.raises(ValueError, match="differ in shape"):
        module.training_step(([torch.rand(8, 3, 28, 28), torch.rand(4, 3, 28, 28)], None), 0)


class Concatenated(SimCLR):
    """Encodes both views in one call: the adapter cannot reuse the step's own features."""

    def training_step(self, batch, batch_index):
        (x0, x1) = batch[0]
        z0, z1 = self.forward(torch.cat([x0, x1])).chunk(2)
        return self.criterion(z0, z1)


def test_a_step_that_never_encodes_the_views_alone_gets_the_positive_from_its_own_forward():
    torch.manual_seed(0)
    plain = Concatenated()
    robust = robustify(copy.deepcopy(plain), normalize=None, log=False)
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    plain_loss = plain.training_step((views, None), 0)
    with pytest.warns(UserWarning, match="two extra forwards"):
        robust_loss = robust.training_step((views, None), 0)
    value = robust.training_step.regularizer.last_stats.value
    assert value > 0
    assert robust_loss.item() == pytest.approx(plain_loss.item() + value.item(), rel=1e-5)
    # The adapter's own forwards leave BatchNorm's running statistics as the step left them.
    for (name, a), b in zip(plain.backbone.named_buffers(), robust.backbone.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "options", [{}, {"encoder": "backbone", "adversarial_view": True}], ids=["default", "backbone"]
)
def test_batchnorm_running_statistics_come_from_the_clean_views_only(options):
    torch.manual_seed(0)
    plain = Recording()
    robust = robustify(copy.deepcopy(plain), normalize=None, log=False, **options)
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    plain.training_step((views, None), 0)
    robust.training_step((views, None), 0)
    for (name, a), b in zip(plain.backbone.named_buffers(), robust.backbone.buffers()):
        assert torch.equal(a, b), name


def test_a_dotted_encoder_path_trains(tmp_path):
    class Nested(SimCLR):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.backbone = self.backbone

    capture = Capture()
    module = robustify(Nested(), encoder="model.backbone")
    trainer(tmp_path, max_steps=2, callbacks=[capture]).fit(module, loader())
    assert all(m["robust_reg/value"] > 0 for m in capture.metrics)


class DictOutput(SimCLR):
    def forward(self, x):
        h = self.backbone(x).flatten(start_dim=1)
        return {"feats": h, "z": self.projection_head(h)}

    def training_step(self, batch, batch_index):
        (x0, x1) = batch[0]
        return self.criterion(self.forward(x0)["z"], self.forward(x1)["z"])


def test_key_names_the_embedding_inside_a_dict_output(tmp_path):
    capture = Capture()
    module = robustify(DictOutput(), key="z")
    trainer(tmp_path, max_steps=1, callbacks=[capture]).fit(module, loader())
    assert capture.metrics[0]["robust_reg/value"] > 0


@pytest.mark.parametrize("options", [{}, {"random_start": False}], ids=["default", "clean-start"])
def test_a_dict_output_without_key_is_named_at_the_first_step(options):
    module = robustify(DictOutput(), normalize=None, log=False, **options)
    views = [torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)]
    with pytest.raises(TypeError, match="pass key="):
        module.training_step((views, None), 0)
    assert "forward" not in module.__dict__  # the temporary override is gone after the error


def test_adversarial_view_adds_the_regulariser_and_needs_no_extra_backward(tmp_path):
    capture = Capture()
    module = robustify(SimCLR(), adversarial_view=True)
    trainer(tmp_path, max_steps=1, callbacks=[capture]).fit(module, loader())
    assert capture.metrics[0]["robust_reg/value"] > 0
    assert all(torch.isfinite(g).all() for g in capture.grads)


def test_default_normalisation_is_lightlys_imagenet_normalize():
    step = robustify(SimCLR()).training_step
    assert step.regularizer.threat.mean == tuple(IMAGENET_NORMALIZE["mean"])
    assert step.regularizer.threat.std == tuple(IMAGENET_NORMALIZE["std"])


def test_normalisation_is_read_from_the_transform_used():
    transform = SimCLRTransform(input_size=28, normalize={"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]})
    step = robustify(SimCLR(), transform=transform).training_step
    assert step.regularizer.threat.mean == (0.1, 0.2, 0.3)
    assert step.regularizer.threat.std == (0.4, 0.5, 0.6)


def test_a_transform_without_normalize_means_raw_pixels():
    step = robustify(SimCLR(), transform=SimCLRTransform(input_size=28, normalize=None)).training_step
    assert not step.regularizer.threat.normalized


def test_normalize_none_means_raw_pixels():
    assert not robustify(SimCLR(), normalize=None).training_step.regularizer.threat.normalized


def test_regulariser_options_are_passed_through():
    reg = robustify(SimCLR(), epsilon=0.1, norm="l2", steps=5, relative=False).training_step.regularizer
    assert (reg.epsilon, reg.norm, reg.steps, reg.relative) == (0.1, "l2", 5, False)


def test_a_custom_view_getter_and_encoder_attribute(tmp_path):
    class Renamed(SimCLR):
        def __init__(self):
            super().__init__()
            self.encoder = self.backbone

    capture = Capture()
    module = robustify(Renamed(), encoder="encoder", view=lambda batch: batch[0][1])
    trainer(tmp_path, max_steps=1, callbacks=[capture]).fit(module, loader())
    assert capture.metrics[0]["robust_reg/value"] > 0


def test_robustifying_twice_is_an_error():
    module = robustify(SimCLR())
    with pytest.raises(RuntimeError, match="already robustified"):
        robustify(module)


def test_a_module_without_the_encoder_attribute_is_named():
    with pytest.raises(AttributeError, match="no attribute 'encoder_net' to use as the encoder"):
        robustify(SimCLR(), encoder="encoder_net")


def test_an_unreadable_batch_layout_is_reported_at_the_first_step(tmp_path):
    class FlatBatches(SimCLR):
        def training_step(self, batch, batch_index):
            return self.criterion(self.forward(batch), self.forward(batch))

    module = robustify(FlatBatches())
    images = torch.rand(16, 3, 28, 28)
    with pytest.raises(ValueError, match=r"could not read the view \(batch\[0\]\[0\]\)|expected the view"):
        trainer(tmp_path, max_steps=1).fit(module, as_loader([images]))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="epsilon"):
        robustify(SimCLR(), epsilon=-1.0)
    with pytest.raises(ValueError, match="weight"):
        robustify(SimCLR(), weight=math.nan)
    with pytest.raises(TypeError, match="unknown regulariser option"):
        robustify(SimCLR(), wieght=1.0)
    with pytest.raises(ValueError, match="only one of normalize, transform or mean/std"):
        robustify(SimCLR(), normalize=None, mean=[0.5] * 3, std=[0.2] * 3)


def test_a_failed_robustify_leaves_the_module_untouched():
    module = SimCLR()
    with pytest.raises(ValueError):
        robustify(module, epsilon=-1.0)
    assert not is_robustified(module)
    robustify(module)  # and it can still be robustified


def test_manual_optimization_is_refused_with_a_clear_message(tmp_path):
    class Manual(SimCLR):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_index):
            loss = super().training_step(batch, batch_index)
            self.manual_backward(loss)
            return loss

    module = robustify(Manual())
    with pytest.raises(RuntimeError, match="manual optimization"):
        trainer(tmp_path, max_steps=1).fit(module, loader())


def test_the_robustified_module_still_pickles():
    import pickle

    module = robustify(SimCLR(), steps=2)
    clone = pickle.loads(pickle.dumps(module))
    assert is_robustified(clone)
    assert clone.training_step.module is clone


class ViTSimCLR(SimCLR):
    """The lightly-style SimCLR on a small torchvision VisionTransformer with dropout and attention dropout."""

    def __init__(self):
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead
        from torchvision.models import VisionTransformer

        vit = VisionTransformer(
            image_size=28,
            patch_size=7,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            dropout=0.2,
            attention_dropout=0.2,
        )
        vit.heads = torch.nn.Identity()
        self.backbone = vit
        self.projection_head = SimCLRProjectionHead(32, 32, 16)


def test_a_vision_transformer_with_dropout_trains_through_the_adapter(tmp_path):
    pytest.importorskip("torchvision")
    capture = Capture()
    torch.manual_seed(0)
    module = robustify(ViTSimCLR())
    with pytest.warns(UserWarning, match="recomputed with those layers in eval mode"):
        trainer(tmp_path, max_steps=2, callbacks=[capture]).fit(module, loader())
    assert len(capture.metrics) == 2
    assert all(math.isfinite(m["robust_reg/value"]) and m["robust_reg/value"] > 0 for m in capture.metrics)
    dropouts = [m for m in module.backbone.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.training for m in dropouts)  # back on for the SSL loss's own passes


def third_field(batch):
    """The sample indices of :class:`IndexedDigitViews` batches (module level: it pickles)."""
    return batch[2]


def test_warm_start_keeps_the_perturbation_of_each_drawn_sample_by_its_index(tmp_path):
    memory = PerturbationMemory(num_samples=64)
    module = robustify(SimCLR(), warm_start=memory, steps=2, index=third_field)
    torch.manual_seed(0)
    trainer(tmp_path, max_steps=2).fit(module, loader(indexed=True))  # unshuffled: samples 0-31
    assert memory.is_stored(torch.arange(64)).tolist() == [True] * 32 + [False] * 32
    stored = memory.read(torch.arange(32), torch.zeros(32, 3, 28, 28))
    assert 0 < stored.abs().max() <= 8 / 255 + 1e-6  # pixel units, inside the ball


def test_each_step_hands_the_memory_and_the_batchs_indices_to_the_regulariser():
    module = robustify(SimCLR(), warm_start=True, steps=2, index=third_field, normalize=None, log=False)
    calls = spy_on_regularizer(module, extra=("memory", "index"))
    views, index = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)], torch.arange(8) + 20
    module.training_step((views, torch.zeros(8), index), 0)
    [(x, _, memory, seen)] = calls
    assert x is views[1] and memory is module.training_step.memory and torch.equal(seen, index)
    assert memory.is_stored(index).all()


def test_warm_start_needs_index_and_index_needs_warm_start():
    module = SimCLR()
    with pytest.raises(ValueError, match="warm_start needs index="):
        robustify(module, warm_start=True)
    with pytest.raises(ValueError, match="index= is read only with warm_start"):
        robustify(module, index=third_field)
    with pytest.raises(TypeError, match="warm_start must be a bool or a PerturbationMemory"):
        robustify(module, warm_start="yes", index=third_field)
    with pytest.raises(TypeError, match="index must be a callable"):
        robustify(module, warm_start=True, index=2)
    assert not is_robustified(module)


@pytest.mark.parametrize(
    "index, error, match",
    [
        (lambda batch: batch[2][:4], ValueError, "index must have one entry per sample"),
        (lambda batch: batch[2].float(), TypeError, "index must be an integer tensor"),
        (lambda batch: batch[5], ValueError, r"could not read the sample indices"),
    ],
)
def test_indices_that_do_not_fit_the_view_are_named_at_the_step(index, error, match):
    module = robustify(SimCLR(), warm_start=True, steps=2, index=index, normalize=None, log=False)
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    with pytest.raises(error, match=match):
        module.training_step((views, torch.zeros(8), torch.arange(8)), 0)
    assert len(module.training_step.memory) == 0


def test_a_warm_started_module_keeps_its_state_dict_keys_and_pickles():
    import pickle

    plain = SimCLR()
    module = robustify(copy.deepcopy(plain), warm_start=True, steps=2, index=third_field, normalize=None, log=False)
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    module.training_step((views, torch.zeros(8), torch.arange(8)), 0)
    assert module.state_dict().keys() == plain.state_dict().keys()
    clone = pickle.loads(pickle.dumps(module))
    assert clone.training_step.memory.is_stored(torch.arange(8)).all()


def crops_of_both_views(batch):
    """The two views' crops of :class:`CroppedDigitViews` batches (module level: it pickles)."""
    return [crop_geometry(boxes, (28, 28)) for boxes in batch[3]]


def test_geometry_keeps_the_memory_in_image_coordinates_through_a_trainer(tmp_path):
    memory = PerturbationMemory(num_samples=64)
    module = robustify(
        SimCLR(), warm_start=memory, steps=2, index=third_field, geometry=crops_of_both_views, normalize=None
    )
    torch.manual_seed(0)
    trainer(tmp_path, max_steps=2).fit(module, loader(cropped=True))  # unshuffled: samples 0-31
    assert memory.is_stored(torch.arange(64)).tolist() == [True] * 32 + [False] * 32
    assert memory.state_dict()["frame"] == "image"
    whole = crop_geometry(torch.tensor([[0, 0, 28, 28]] * 32), (28, 28))
    stored = memory.read(torch.arange(32), torch.zeros(32, 3, 28, 28), geometry=whole)
    assert 0 < stored.abs().max() <= 8 / 255 + 1e-6


def test_geometry_hands_the_perturbed_views_own_crops_to_the_regulariser():
    module = robustify(
        SimCLR(), warm_start=True, steps=2, index=third_field, geometry=crops_of_both_views, normalize=None, log=False
    )
    calls = spy_on_regularizer(module, extra=("geometry",))
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    boxes = [torch.tensor([[0, 0, 28, 28]] * 8), torch.tensor([[2, 3, 20, 20]] * 8)]
    module.training_step((views, torch.zeros(8), torch.arange(8), boxes), 0)
    [(x, _, geometry)] = calls
    assert x is views[1]  # SimCLR encodes view 0 first: view 1 is perturbed, with its own crops
    torch.testing.assert_close(geometry, crop_geometry(boxes[1], (28, 28)))


def test_geometry_needs_warm_start_and_a_callable():
    module = SimCLR()
    with pytest.raises(ValueError, match="geometry= is read only with warm_start"):
        robustify(module, geometry=crops_of_both_views)
    with pytest.raises(TypeError, match="geometry must be a callable"):
        robustify(module, warm_start=True, index=third_field, geometry=torch.zeros(8, 2, 3))
    assert not is_robustified(module)


@pytest.mark.parametrize(
    "geometry, error, match",
    [
        (lambda batch: crops_of_both_views(batch)[0], ValueError, "geometry= of robustify must return two tensors"),
        (
            lambda batch: [g[:4] for g in crops_of_both_views(batch)],
            ValueError,
            r"geometry must have shape \(8, 2, 3\)",
        ),
        (lambda batch: batch[7], ValueError, "could not read the crops"),
    ],
)
def test_crops_that_do_not_fit_the_views_are_named_at_the_step_before_the_users_step(geometry, error, match):
    module = robustify(
        SimCLR(), warm_start=True, steps=2, index=third_field, geometry=geometry, normalize=None, log=False
    )
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    boxes = [torch.tensor([[0, 0, 28, 28]] * 8)] * 2
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(error, match=match):
        module.training_step((views, torch.zeros(8), torch.arange(8), boxes), 0)
    assert len(module.training_step.memory) == 0
    for name, value in module.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(value, before[name]), name


def test_a_lightning_checkpoint_carries_the_memory_and_resuming_restores_it(tmp_path):
    memory = PerturbationMemory(num_samples=64)
    module = robustify(SimCLR(), warm_start=memory, steps=2, index=third_field, log=False)
    first = trainer(tmp_path, max_steps=2)
    torch.manual_seed(0)
    first.fit(module, loader(indexed=True))
    path = tmp_path / "warm.ckpt"
    first.save_checkpoint(path)
    restored = PerturbationMemory(num_samples=64)
    resumed = robustify(SimCLR(), warm_start=restored, steps=2, index=third_field, log=False)
    trainer(tmp_path, max_steps=2).fit(resumed, loader(indexed=True), ckpt_path=path)  # restores, trains no step
    assert restored.is_stored(torch.arange(64)).tolist() == [True] * 32 + [False] * 32
    like = torch.zeros(64, 3, 28, 28)
    assert torch.equal(restored.read(torch.arange(64), like), memory.read(torch.arange(64), like))


def test_a_checkpoint_with_the_memory_still_loads_into_the_unmodified_class(tmp_path):
    module = robustify(SimCLR(), warm_start=True, steps=2, index=third_field, log=False)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(module, loader(indexed=True))
    fit.save_checkpoint(tmp_path / "warm.ckpt")
    plain = SimCLR.load_from_checkpoint(tmp_path / "warm.ckpt")
    assert not is_robustified(plain)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, module.state_dict()[name]), name


def test_the_modules_own_checkpoint_hooks_still_run(tmp_path):
    class Recording(SimCLR):
        def on_save_checkpoint(self, checkpoint):
            checkpoint["mine"] = 1

    module = robustify(Recording(), warm_start=True, steps=2, index=third_field, log=False)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(module, loader(indexed=True))
    fit.save_checkpoint(tmp_path / "warm.ckpt")
    checkpoint = torch.load(tmp_path / "warm.ckpt", weights_only=False)
    assert checkpoint["mine"] == 1 and checkpoint["robust_reg_warm_start"]["stored"].sum() == 16


def test_epsilon_ramp_grows_eps_over_its_share_of_the_epochs(tmp_path):
    module = robustify(SimCLR(), epsilon=0.1, epsilon_ramp=0.5, log=False)
    reg, seen = module.training_step.regularizer, []
    forward = reg.forward
    reg.forward = lambda *args, **kwargs: seen.append(reg.epsilon) or forward(*args, **kwargs)
    trainer(tmp_path, max_steps=-1, max_epochs=4, limit_train_batches=1).fit(module, loader())
    assert seen == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1])  # r = 2 ramp epochs: eps (e + 1) / (r + 1)
    assert module.training_step.threat.epsilon == 0.1


def test_epsilon_ramp_outside_a_trainer_or_out_of_range_is_named():
    with pytest.raises(ValueError, match=r"epsilon_ramp must be a number in \[0, 1\)"):
        robustify(SimCLR(), epsilon_ramp=1.0)
    module = robustify(SimCLR(), epsilon_ramp=0.3, normalize=None, log=False)
    views = [torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)]
    with pytest.raises(RuntimeError, match="epsilon_ramp .* needs the module attached to a Trainer"):
        module.training_step((views, torch.zeros(8)), 0)


def _example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lightly_examples_cropped_views_report_the_crops_they_were_cut_with():
    import torch.nn.functional as F
    import torchvision.transforms.functional as TF

    example = _example("lightly_simclr")
    transform = SimCLRTransform(
        input_size=28, min_scale=0.3, hf_prob=0.5, cj_prob=0.0, random_gray_scale=0.0, gaussian_blur=0.0, normalize=None
    )
    raw = example.Digits(range(16), None)
    dataset = example.CroppedViews(raw, transform)
    torch.manual_seed(0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(16)])
    images = torch.stack([TF.to_tensor(raw[i][0]) for i in range(16)])
    for view, crops, wrong in zip(batch[0], example.view_crops(batch), example.view_crops(batch)[::-1]):
        cut, other = (
            F.grid_sample(images, F.affine_grid(theta, list(view.shape), align_corners=False), align_corners=False)
            for theta in (crops, wrong)
        )
        assert (cut - view).abs().mean() < 0.3 * (other - view).abs().mean()
    assert batch[2].tolist() == list(range(16))


def test_the_views_are_recognised_by_identity_never_by_value(monkeypatch):
    """A step that encodes a copy of the perturbed view (equal values, another tensor) before the view itself:
    the copy is left alone and the view's own call is the one perturbed; no value is compared (no sync)."""
    from robust_reg.integrations.lightly import robustify

    from lightly_modules import SimCLR

    class LogsACopyFirst(SimCLR):
        def training_step(self, batch, batch_index):
            (x0, x1) = batch[0]
            self.copy_out = self.forward(x1.clone())  # e.g. a logging pass on equal values
            z0, z1 = self.forward(x0), self.forward(x1)
            self.z1 = z1
            return self.criterion(z0, z1)

    def no_value_comparison(*args, **kwargs):
        raise AssertionError("the adapter compared tensors by value")

    module = robustify(LogsACopyFirst(), normalize=None, log=False)
    torch.manual_seed(0)
    views = [torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)]
    monkeypatch.setattr(torch, "equal", no_value_comparison)
    module.training_step((views, torch.zeros(8)), 0).backward()
    with torch.no_grad():
        clean = module.forward(views[1])  # train mode, as in the step: the same batch statistics
    torch.testing.assert_close(module.copy_out.detach(), clean, atol=1e-5, rtol=1e-5)  # the copy: a plain forward
    assert not torch.allclose(module.z1.detach(), clean, atol=1e-3)  # the view's own call: the adversarial one


def test_the_lightly_examples_annealing_rebuilds_the_views_at_each_strength():
    example = _example("lightly_simclr")

    def crop_scale(transform):
        view = transform.transforms[0].transform
        return next(t.scale for t in view.transforms if "RandomResizedCrop" in type(t).__name__)

    digits = example.Digits(range(4), example.simclr_transform("mnist5k"))
    assert crop_scale(digits.transform) == pytest.approx((0.4, 1.0))  # full strength: the example's own views
    example.set_strength(digits, "mnist5k", 0.5)
    assert crop_scale(digits.transform) == pytest.approx((0.7, 1.0))
    example.set_strength(example.WithIndex(digits), "mnist5k", 0.25)
    assert crop_scale(digits.transform) == pytest.approx((0.85, 1.0))
    cropped = example.CroppedViews(example.Digits(range(4), None), example.simclr_transform("mnist5k"))
    example.set_strength(cropped, "mnist5k", 0.5)
    assert cropped.scale == pytest.approx((0.7, 1.0))


def monitor_images():
    views, _ = next(iter(loader(n=32, batch_size=32)))
    return views[0]  # normalised as the views are


def test_the_collapse_monitor_callback_checks_and_logs_each_epoch(tmp_path):
    from robust_reg.integrations.lightly import collapse_monitor

    module, watch = robustify(SimCLR(), epsilon=8 / 255), collapse_monitor(monitor_images())
    torch.manual_seed(0)
    fitted = trainer(tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=2, callbacks=[watch])
    fitted.fit(module, loader())
    assert [report.epoch for report in watch.history] == [0, 1]
    assert all(report.training_attack > 0 and report.strong_attack > 0 for report in watch.history)
    assert fitted.callback_metrics["collapse/strong_attack"] == pytest.approx(watch.history[-1].strong_attack)


def test_the_collapse_monitor_callback_leaves_the_training_as_it_was(tmp_path):
    from robust_reg.integrations.lightly import collapse_monitor

    weights = []
    for callbacks in ([], [collapse_monitor(monitor_images())]):
        module = robustify(twins(SimCLR)[0], epsilon=8 / 255)
        torch.manual_seed(0)
        trainer(tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=1, callbacks=callbacks).fit(module, loader())
        weights.append(copy.deepcopy(module.state_dict()))
    for mine, other in zip(weights[0].values(), weights[1].values(), strict=True):
        assert torch.equal(mine, other)


def test_the_collapse_monitor_callback_needs_a_robustified_module(tmp_path):
    from robust_reg.integrations.lightly import collapse_monitor

    watch = collapse_monitor(monitor_images())
    with pytest.raises(ValueError, match=r"robustify\(SimCLR\)"):
        trainer(tmp_path, max_steps=-1, max_epochs=1, limit_train_batches=1, callbacks=[watch]).fit(SimCLR(), loader())


@pytest.mark.parametrize(
    "images, options, error, match",
    [
        ("not images", {}, TypeError, "images must be a floating-point tensor"),
        (torch.rand(1, 3, 28, 28), {}, ValueError, "at least 2 samples"),
        (torch.rand(8, 3, 28, 28), {"strong_step": 5}, TypeError, r"unknown option\(s\) \['strong_step'\]"),
        (torch.rand(8, 3, 28, 28), {"tolerance": 1}, ValueError, "tolerance must be a number > 1"),
    ],
)
def test_bad_collapse_monitor_arguments_are_named_before_training(images, options, error, match):
    from robust_reg.integrations.lightly import collapse_monitor

    with pytest.raises(error, match=match):
        collapse_monitor(images, **options)
