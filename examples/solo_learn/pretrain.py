"""A small solo-learn pretraining launcher with robust-reg: solo-learn's own pipeline plus one line.

    python examples/solo_learn/pretrain.py --config-name simclr_cifar10_robust
    python examples/solo_learn/pretrain.py --config-name byol_cifar10_robust robust_reg.weight=0.5

Needs solo-learn >= 1.0.6 from its repository (see the README, "Use with
solo-learn"). The configs beside this file are complete solo-learn configs with
a ``robust_reg:`` block; any hydra override works as in solo-learn's
``main_pretrain.py``, which this launcher mirrors minus DALI, auto-resume,
UMAP and wandb (use solo-learn's own script for those: it needs only the one
``robustify(model, cfg=cfg)`` line added after the model is built).

With the regulariser on, the views are annealed from strong to weak over the epochs (DynACL's schedule,
``robust_reg.augmentation``): with the regulariser's default N-FGSM step, the recommended recipe.
``augmentation_schedule=constant`` keeps ``cfg.augmentations`` as written.
"""

from __future__ import annotations

import copy
import inspect
import os

import hydra
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies.ddp import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from solo.args.pretrain import parse_cfg
from solo.data.pretrain_dataloader import (
    FullTransformPipeline,
    NCropAugmentation,
    build_transform_pipeline,
    prepare_dataloader,
    prepare_datasets,
)
from solo.methods import METHODS
from solo.utils.checkpointer import Checkpointer

from robust_reg.augmentation import augmentation_strength
from robust_reg.integrations.solo_learn import robustify


def scaled_augmentation(aug: DictConfig, strength: float) -> DictConfig:
    """One ``cfg.augmentations`` entry at an augmentation ``strength`` in (0, 1] (1: as configured): the colour
    jitter, its probability, grayscale's probability and how small a crop may be scale with it, as
    ``robust_reg.augmentation`` describes DynACL's annealed augmentation; flips, blur and the rest stay."""
    aug = copy.deepcopy(aug)  # DictConfig.copy() would share the nested nodes
    aug.rrc.crop_min_scale = 1 - (1 - aug.rrc.crop_min_scale) * strength
    for name in ("prob", "brightness", "contrast", "saturation", "hue"):
        aug.color_jitter[name] = aug.color_jitter[name] * strength
    aug.grayscale.prob = aug.grayscale.prob * strength
    return aug


def views(cfg: DictConfig, strength: float = 1.0) -> FullTransformPipeline:
    """solo-learn's multi-crop pipeline of ``cfg.augmentations``, each at ``strength``."""
    crops = [
        NCropAugmentation(build_transform_pipeline(cfg.data.dataset, scaled_augmentation(aug, strength)), aug.num_crops)
        for aug in cfg.augmentations
    ]
    return FullTransformPipeline(crops)


class AnnealedViews(Callback):
    """Rebuild the training set's views at ``augmentation_strength`` of each epoch (the loader's workers are not
    persistent, so each epoch's workers see them)."""

    def __init__(self, cfg: DictConfig, dataset) -> None:
        self.cfg, self.dataset = cfg, dataset

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.dataset.transform = views(self.cfg, augmentation_strength(trainer.current_epoch, trainer.max_epochs))


@hydra.main(version_base="1.2", config_path=".", config_name="simclr_cifar10_robust")
def main(cfg: DictConfig) -> None:
    OmegaConf.set_struct(cfg, False)  # solo-learn adds defaults to the config
    cfg = parse_cfg(cfg)
    seed_everything(cfg.seed)

    model = METHODS[cfg.method](cfg)
    robustify(model, cfg=cfg)  # <- the one robust-reg line: settings from cfg.robust_reg

    dataset = prepare_datasets(
        cfg.data.dataset,
        views(cfg),
        train_data_path=cfg.data.train_path,
        data_format=cfg.data.format,
        no_labels=cfg.data.no_labels,
        data_fraction=cfg.data.fraction,
    )
    loader = prepare_dataloader(dataset, batch_size=cfg.optimizer.batch_size, num_workers=cfg.data.num_workers)

    schedule = cfg.get("augmentation_schedule", "annealed")
    if schedule not in ("annealed", "constant"):
        raise ValueError(f"augmentation_schedule must be 'annealed' or 'constant', got {schedule!r}")
    robust = (cfg.get("robust_reg") or {}).get("enabled", True)
    callbacks = [AnnealedViews(cfg, dataset)] if schedule == "annealed" and robust else []
    if cfg.checkpoint.enabled:
        logdir = os.path.join(cfg.checkpoint.dir, cfg.method)
        callbacks.append(Checkpointer(cfg, logdir=logdir, frequency=cfg.checkpoint.frequency))
    options = OmegaConf.to_container(cfg)
    accepted = inspect.signature(Trainer.__init__).parameters
    trainer_kwargs = {name: options[name] for name in accepted if name in options}
    if cfg.accelerator == "cpu" and isinstance(trainer_kwargs.get("devices"), list):
        trainer_kwargs["devices"] = len(trainer_kwargs["devices"])  # solo-learn lists GPU ids; CPU wants a count
    trainer_kwargs.update(
        logger=None,
        callbacks=callbacks,
        enable_checkpointing=False,
        strategy=DDPStrategy(find_unused_parameters=False) if cfg.strategy == "ddp" else cfg.strategy,
    )
    Trainer(**trainer_kwargs).fit(model, loader)


if __name__ == "__main__":
    main()
