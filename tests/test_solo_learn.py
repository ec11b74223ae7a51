"""The solo-learn adapter against real solo-learn methods (skipped when solo-learn is absent).

PyPI has no current solo-learn; to run these, put solo-learn 1.0.6's ``solo/``
folder and its pinned dependencies on ``PYTHONPATH`` (see README, "Use with
solo-learn").
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch

from helpers import QUIET_TRAINER, capture_callback, spy_on_regularizer
from solo_setup import loader, small_cfg, solo_available

available, reason = solo_available()
pytestmark = pytest.mark.skipif(not available, reason=reason)

if available:
    import lightning as L
    from solo.methods import BYOL, SimCLR

    from robust_reg.integrations.solo_learn import is_robustified, robustify, solo_normalization

    Capture = capture_callback(L.Callback)


def trainer(tmp_path, steps=2, callbacks=()):
    return L.Trainer(
        max_steps=steps,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
        **QUIET_TRAINER,
    )


def fit(method, tmp_path, steps=2):
    capture = Capture()
    torch.manual_seed(0)
    trainer(tmp_path, steps, [capture]).fit(method, loader())
    return capture


def _env_with_absolute_pythonpath() -> dict:
    """The environment for a subprocess in another folder: relative PYTHONPATH entries made absolute."""
    env = os.environ.copy()
    entries = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(e) for e in entries)
    return env


CLASSES = {"simclr": lambda: SimCLR, "byol": lambda: BYOL}


@pytest.mark.parametrize("name, key", [("simclr", "z"), ("byol", "p")])
def test_default_regularises_the_embedding_the_loss_compares_with_the_adversarial_view(name, key, tmp_path):
    cfg = small_cfg(name)
    torch.manual_seed(0)
    plain = CLASSES[name]()(cfg)
    robust = robustify(copy.deepcopy(plain), cfg=cfg)
    step = robust.training_step
    assert (step.encoder, step.key, step.adversarial_view) == ("forward", key, True)
    assert step.regularizer.normalize_features and step.regularizer.ascent == "positive"
    plain_run, robust_run = fit(plain, tmp_path), fit(robust, tmp_path)
    value = robust_run.metrics[0]["robust_reg/value"]
    assert math.isfinite(value) and value > 0
    assert math.isfinite(robust_run.losses[-1])
    assert any(not torch.allclose(a, b) for a, b in zip(plain_run.grads, robust_run.grads))


def test_a_method_without_a_known_embedding_asks_for_key():
    from solo.methods.base import BaseMethod

    cfg = small_cfg("simclr")
    with pytest.raises(ValueError, match="key='<entry>'.*encoder='backbone'"):
        robustify(BaseMethod(cfg), cfg=cfg)
    assert robustify(BaseMethod(cfg), cfg=cfg, key="feats").training_step.key == "feats"


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_backbone_form_adds_exactly_the_weighted_term_and_logs_it(name, tmp_path):
    cfg = small_cfg(name, **{"robust_reg.encoder": "backbone"})
    torch.manual_seed(0)
    plain = CLASSES[name]()(cfg)
    robust = robustify(copy.deepcopy(plain), cfg=cfg)
    plain_run, robust_run = fit(plain, tmp_path), fit(robust, tmp_path)
    value = robust_run.metrics[0]["robust_reg/value"]
    assert math.isfinite(value) and value > 0
    assert robust_run.losses[0] - plain_run.losses[0] == pytest.approx(cfg.robust_reg.weight * value, rel=1e-4)
    assert any(not torch.allclose(a, b) for a, b in zip(plain_run.grads, robust_run.grads))


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_checkpoint_loads_into_the_unmodified_solo_class(name, tmp_path):
    cfg = small_cfg(name)
    cls = CLASSES[name]()
    keys = set(cls(cfg).state_dict())
    method = robustify(cls(cfg), cfg=cfg)
    assert set(method.state_dict()) == keys
    run = trainer(tmp_path)
    run.fit(method, loader())
    run.save_checkpoint(tmp_path / "robust.ckpt")
    loaded = cls.load_from_checkpoint(tmp_path / "robust.ckpt", cfg=cfg)
    assert not is_robustified(loaded)
    for key, value in method.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_settings_come_from_the_config_block_and_keywords_override_them():
    cfg = small_cfg("simclr", **{"robust_reg.steps": 5, "robust_reg.norm": "l2", "robust_reg.weight": 0.5})
    step = robustify(SimCLR(cfg), cfg=cfg, weight=2.0).training_step
    assert (step.regularizer.steps, step.regularizer.norm, step.weight) == (5, "l2", 2.0)


def test_normalisation_is_solo_learns_for_the_configured_dataset():
    cfg = small_cfg("simclr")
    step = robustify(SimCLR(cfg), cfg=cfg).training_step
    assert step.regularizer.threat.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert step.regularizer.threat.std == pytest.approx((0.2470, 0.2435, 0.2616))
    cfg100 = small_cfg("simclr", **{"data.dataset": "cifar100"})
    assert solo_normalization(cfg100)[0] == pytest.approx((0.5071, 0.4865, 0.4409))


def test_threat_from_a_solo_config_reads_the_block_and_solo_learns_normalisation():
    from robust_reg.integrations.solo_learn import threat_from_config

    cfg = small_cfg("simclr", **{"robust_reg.epsilon": 0.02, "robust_reg.norm": "l2"})
    threat = threat_from_config(cfg)
    assert (threat.epsilon, threat.norm) == (0.02, "l2")
    assert threat.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert threat_from_config(cfg, epsilon=0.1).epsilon == 0.1  # arguments win over the block


def test_the_adapter_builds_its_ball_with_threat_from_config():
    from robust_reg.integrations.solo_learn import threat_from_config

    cfg = small_cfg("simclr", **{"robust_reg.epsilon": 0.02})
    assert robustify(SimCLR(cfg), cfg=cfg).training_step.regularizer.threat == threat_from_config(cfg)


def test_threat_model_from_solo_config_still_works_and_warns():
    from robust_reg import ThreatModel
    from robust_reg.integrations.solo_learn import threat_from_config

    cfg = small_cfg("simclr")
    with pytest.warns(DeprecationWarning, match="threat_from_config"):
        assert ThreatModel.from_solo_config(cfg) == threat_from_config(cfg)


def test_the_method_cfg_is_used_when_none_is_given():
    cfg = small_cfg("simclr", **{"robust_reg.steps": 4})
    assert robustify(SimCLR(cfg)).training_step.regularizer.steps == 4


def test_enabled_false_leaves_the_method_unchanged():
    cfg = small_cfg("simclr", **{"robust_reg.enabled": False})
    assert not is_robustified(robustify(SimCLR(cfg), cfg=cfg))


def test_the_clean_features_solo_computed_are_reused(tmp_path):
    cfg = small_cfg("simclr", **{"robust_reg.steps": 2})
    method = robustify(SimCLR(cfg), cfg=cfg)
    calls = []
    method.backbone.register_forward_hook(lambda *_: calls.append(1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, steps=1).fit(method, loader())
    assert not [w for w in record if "cannot be reused" in str(w.message)]
    assert len(calls) == 2 + 2 + 1  # two crops, two ascent steps, one adversarial forward


def test_the_default_perturbs_the_second_large_crop_away_from_the_first(tmp_path):
    cfg = small_cfg("simclr", **{"robust_reg.steps": 1})
    method = robustify(SimCLR(cfg), cfg=cfg)
    calls = spy_on_regularizer(method)
    batches = []

    class KeepBatch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            batches.append(batch)

    trainer(tmp_path, steps=1, callbacks=[KeepBatch()]).fit(method, loader())
    [(x, positive)] = calls
    crops = batches[0][1]
    assert torch.equal(x, crops[1])  # solo-learn encodes the crops in order: the second is perturbed
    assert positive is not None and not positive.requires_grad and positive.shape[0] == x.shape[0]


def test_adversarial_view_trains(tmp_path):
    cfg = small_cfg("byol", **{"robust_reg.adversarial_view": True})
    run = fit(robustify(BYOL(cfg), cfg=cfg), tmp_path)
    assert math.isfinite(run.losses[-1]) and run.metrics[0]["robust_reg/value"] > 0


def test_robustifying_twice_and_unknown_keys_are_errors():
    cfg = small_cfg("simclr")
    method = robustify(SimCLR(cfg), cfg=cfg)
    with pytest.raises(RuntimeError, match="already robustified"):
        robustify(method, cfg=cfg)
    bad = small_cfg("simclr", **{"robust_reg.epsilom": 0.1})
    with pytest.raises(ValueError, match="unknown key.*epsilom"):
        robustify(SimCLR(bad), cfg=bad)


def test_a_non_solo_module_is_refused():
    with pytest.raises(TypeError, match="solo-learn method"):
        robustify(torch.nn.Linear(2, 2), normalize=None)


def test_the_example_launcher_trains_with_a_yaml_robust_reg_block(tmp_path):
    import subprocess
    import sys

    from PIL import Image
    from sklearn.datasets import load_digits

    from solo_setup import EXAMPLES

    digits = load_digits()
    for i in range(32):
        folder = tmp_path / "train" / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * 16).clip(0, 255).astype("uint8")
        Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(folder / f"{i}.png")
    overrides = [
        "data.dataset=custom",
        f"data.train_path={tmp_path / 'train'}",
        "data.num_workers=0",
        "optimizer.batch_size=8",
        "accelerator=cpu",
        "devices=[0]",
        "strategy=auto",
        "precision=32",
        "sync_batchnorm=False",
        "max_epochs=1",
        "+limit_train_batches=2",
        "checkpoint.enabled=False",
        "method_kwargs.proj_hidden_dim=64",
        "robust_reg.steps=1",
    ]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "pretrain.py"), "--config-name", "simclr_cifar10_robust", *overrides],
        cwd=tmp_path,
        env=_env_with_absolute_pythonpath(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_epochs=1` reached" in result.stdout + result.stderr


def test_a_vision_transformer_method_trains_through_the_adapter(tmp_path):
    """solo-learn's own vit_tiny (timm) with dropout, attention dropout and drop-path, on 32x32 crops."""
    vit = {"img_size": 32, "patch_size": 8, "drop_rate": 0.1, "attn_drop_rate": 0.1, "drop_path_rate": 0.1}
    cfg = small_cfg("simclr", **{"backbone.name": "vit_tiny", "backbone.kwargs": vit, "robust_reg.steps": 1})
    method = robustify(SimCLR(cfg), cfg=cfg)
    with pytest.warns(UserWarning, match="recomputed with those layers in eval mode"):
        run = fit(method, tmp_path)
    assert len(run.metrics) == 2
    assert all(math.isfinite(m["robust_reg/value"]) and m["robust_reg/value"] > 0 for m in run.metrics)


def test_warm_start_from_the_config_block_reads_solo_learns_indexes(tmp_path):
    cfg = small_cfg("simclr", **{"robust_reg.warm_start": True, "robust_reg.steps": 1, "robust_reg.epsilon_ramp": 0.5})
    method = robustify(SimCLR(cfg), cfg=cfg)
    calls, epsilon = spy_on_regularizer(method, extra=("index",)), method.training_step.threat.epsilon
    reg, seen = method.training_step.regularizer, []
    spied = reg.forward
    reg.forward = lambda *args, **kwargs: seen.append(reg.epsilon) or spied(*args, **kwargs)
    fit = L.Trainer(
        max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0, default_root_dir=str(tmp_path), **QUIET_TRAINER
    )
    fit.fit(method, loader())  # unshuffled, batches of 8: samples 0-15 in each epoch
    assert [index.tolist() for *_, index in calls] == [list(range(8)), list(range(8, 16))] * 2
    assert seen == pytest.approx([epsilon / 2] * 2 + [epsilon] * 2)  # max_epochs 2, ramp 0.5: one epoch at eps / 2
    memory = method.training_step.memory
    assert memory.is_stored(torch.arange(32)).tolist() == [True] * 16 + [False] * 16
    assert memory.sample_shape == (3, 32, 32)


def test_a_warm_started_methods_checkpoint_carries_its_memory(tmp_path):
    cfg = small_cfg("simclr", **{"robust_reg.warm_start": True, "robust_reg.steps": 1})
    method = robustify(SimCLR(cfg), cfg=cfg)
    fit = L.Trainer(
        max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, default_root_dir=str(tmp_path), **QUIET_TRAINER
    )
    fit.fit(method, loader())  # unshuffled, batches of 8: samples 0-15
    fit.save_checkpoint(tmp_path / "warm.ckpt")
    restored = robustify(SimCLR(cfg), cfg=cfg)
    restored.on_load_checkpoint(torch.load(tmp_path / "warm.ckpt", weights_only=False))  # what a resumed fit calls
    assert restored.training_step.memory.is_stored(torch.arange(32)).tolist() == [True] * 16 + [False] * 16


def test_the_solo_learn_page_runs_as_written(tmp_path):
    from solo.methods import METHODS
    from test_docs import run_page

    namespace = run_page("guides/solo-learn.md", {"METHODS": METHODS, "cfg": small_cfg("simclr")})
    assert is_robustified(namespace["model"])
    trainer(tmp_path).fit(namespace["model"], loader())


def test_a_checkpoint_solo_learn_writes_loads_as_its_backbone_taking_pixels(tmp_path):
    from solo.utils.checkpointer import Checkpointer

    from robust_reg.demo.checkpoints import load_checkpoint

    from solo_setup import CIFAR_MEAN, CIFAR_STD

    cfg = small_cfg("simclr")
    method = SimCLR(cfg)
    torch.manual_seed(0)
    checkpointer = Checkpointer(cfg, logdir=tmp_path / "trained_models")
    L.Trainer(max_epochs=1, callbacks=[checkpointer], default_root_dir=str(tmp_path), **QUIET_TRAINER).fit(
        method, loader()
    )
    (ckpt,) = (tmp_path / "trained_models").rglob("*.ckpt")
    assert (ckpt.parent / "args.json").is_file()  # what solo-learn writes beside it
    encoder, meta = load_checkpoint(ckpt)
    assert (meta["source"], meta["arch"], meta["arch_options"]) == ("solo-learn", "resnet18", {"stem_padding": 2})
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = method.backbone.eval()((x - CIFAR_MEAN) / CIFAR_STD)
        torch.testing.assert_close(encoder(x).flatten(1), expected.flatten(1))


def test_the_example_launchers_annealing_scales_a_copy_of_each_augmentation():
    import importlib.util

    from omegaconf import OmegaConf

    from solo_setup import EXAMPLES

    spec = importlib.util.spec_from_file_location("solo_launcher", EXAMPLES / "pretrain.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    aug = OmegaConf.load(EXAMPLES / "simclr_cifar10_robust.yaml").augmentations[0]
    half = launcher.scaled_augmentation(aug, 0.5)
    assert half.rrc.crop_min_scale == pytest.approx(1 - 0.92 * 0.5)
    assert (half.color_jitter.prob, half.color_jitter.brightness, half.grayscale.prob) == pytest.approx((0.4, 0.4, 0.1))
    assert half.horizontal_flip.prob == aug.horizontal_flip.prob and half.gaussian_blur.prob == aug.gaussian_blur.prob
    assert (aug.rrc.crop_min_scale, aug.color_jitter.prob) == pytest.approx((0.08, 0.8))  # the config is unchanged


def test_the_collapse_monitor_callback_checks_a_solo_method_each_epoch(tmp_path):
    from robust_reg.integrations.solo_learn import collapse_monitor

    cfg = small_cfg("simclr")
    method = robustify(SimCLR(cfg), cfg=cfg)
    images = torch.stack([views[0] for _, views, _ in (loader().dataset[i] for i in range(16))])
    watch = collapse_monitor(images)
    torch.manual_seed(0)
    L.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[watch],
        **QUIET_TRAINER,
    ).fit(method, loader())
    assert [report.epoch for report in watch.history] == [0, 1]
    assert all(report.strong_attack > 0 for report in watch.history)
