"""The screening harness: every pretraining variant the benchmarks measured, on the package's loop.

Not shipped in the wheel: ``benchmarks/compare.py`` and ``benchmarks/overhead.py`` use it
(they run from this folder). The models and the loop are the package's
(:mod:`robust_reg.demo.training`); this module adds the configurations that only the
benchmarks use, including those that lost on MNIST (they may matter on natural images). Variants:

- ``plain``: the SSL loss alone.
- ``reg``: SSL loss + ``weight * RobustnessRegularizer(...)`` on view 0, reusing its features.
- ``advview``: as ``reg``, and the regulariser's deviation-maximising input
  replaces view 0 in the SSL loss (its features come for free).
- ``robust``: the recommended configuration (the package default): the
  regulariser on the embedding the SSL loss compares (``model(x)``: SimCLR's
  projection, BYOL's prediction), L2-normalised as the loss normalises it, and
  its deviation-maximising embedding replaces view 0's in the SSL loss (no
  extra forward; BYOL's momentum targets stay on the clean views).
  ``adversarial_views=2`` does the same for view 1 too.
- ``acl``: a reduced adversarial-contrastive baseline in the style of ACL (Jiang
  et al. 2020) / RoCL (Kim et al. 2020): view 0 alone is attacked with PGD on the
  SSL loss, one BatchNorm, no clean term; the model trains on the attacked view
  (BYOL's momentum targets stay on the clean views). Rows ``*-acl-lite``.
- ``acl-ds``: ACL as published (Jiang et al. 2020, "ACL_DS"), SimCLR: dual
  BatchNorm (one set of BatchNorm layers for clean inputs, one for adversarial
  ones, every other weight shared), both views attacked together with PGD on
  NT-Xent through the adversarial BatchNorm (eval mode, random start, step
  eps / 4: 2/255 at 8/255), loss ``(clean NT-Xent + adversarial NT-Xent) / 2``; the
  encoder evaluated downstream carries the adversarial BatchNorm.
- ``dynacl``: DynACL (Luo, Wang and Wang 2023) on ``acl-ds``: the augmentation
  strength annealed from 1 towards 0, refreshed every 5 % of the epochs
  (50 of 1,000 in the paper), and the loss ``((2 - w) clean + w adv) / 2`` with
  ``w = min(1 + k * (R / E) * 2/3, 2)`` after ``k`` refreshes of ``R`` of ``E`` epochs
  (the authors' swap parameter 2/3). As the authors' ``train_DynACL.py`` does, view 0 goes
  through the trained (online) encoder and view 1 through a momentum copy of it (EMA, m = 0.99,
  no gradient, updated after each step's forwards) in both the attack and the loss, and the
  momentum copy is the encoder evaluated downstream (``ema=false``: the online encoder alone, as
  0.2's rows did).

``acl-ds`` and ``dynacl`` train with the authors' augmentation on natural images
(``authors_augment``: crop scale down to 0.1, hue jitter 0.1, colour jitter in a random order per
sample; ``train_simCLR.py`` and ``train_DynACL.py``); the other rows keep the shared recipe (crop
0.2, no hue).

Any variant takes ``lp_aft=true``: DynACL++'s post-processing as a separate, timed stage after
pretraining (k-means pseudo labels on the encoder's training features, for ``dynacl`` the momentum
encoder's through its clean BatchNorm as the authors' ``assign_label.py`` does; a linear probe on them,
then TRADES adversarial full fine-tuning of encoder and probe on them: ``robust_reg.finetune``'s
AFF with the probe as its start); its seconds count in the run's training time. Row
``simclr-dynacl++`` is ``simclr-dynacl[lp_aft=true]``.

Any variant takes ``anneal_augment=true``: the same annealed augmentation strength
(``robust_reg.augmentation.augmentation_strength``) applied to the package's batch augmentation.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust_reg import (
    BackboneRobustnessRegularizer,
    PerturbationMemory,
    RegularizerOutput,
    RobustnessRegularizer,
    ThreatModel,
    WarmStart,
    preserved_state,
    projected_gradient_ascent,
    ramped_epsilon,
)
from robust_reg.augmentation import augmentation_strength
from robust_reg.demo.augment import BatchAugment, gray, jitter_factor
from robust_reg.demo.data import ImageData
from robust_reg.demo.training import DATASET_DEFAULTS, METHODS, build_model, check_method, training_defaults
from robust_reg.demo.training import pretrain as _pretrain
from robust_reg.finetune import AFF_CPU
from robust_reg.methods import METHOD_SETTINGS

__all__ = ["DATASET_DEFAULTS", "RECOMMENDED_WEIGHT", "PretrainConfig", "build_model", "pretrain", "training_defaults"]

VARIANTS = ("plain", "reg", "advview", "robust", "acl", "acl-ds", "dynacl")
DUAL_BN = ("acl-ds", "dynacl")
# DynACL's momentum encoder (resnet18_momentum's m) and refresh interval as a fraction of the run (50 of 1,000
# epochs) and its loss-weight swap parameter.
DYNACL_MOMENTUM = 0.99
DYNACL_REFRESH, DYNACL_SWAP = 0.05, 2 / 3
# DynACL++'s adversarial fine-tuning on pseudo labels, shortened for 2 CPU cores as the evaluation's AFF_CPU
# (the authors: 25 epochs, lr 0.1, PGD-10).
LP_AFT = AFF_CPU
PENALTIES = ("embedding", "backbone", "both", "positive", "kl")
# The inner maximisations whose view-0 pass is the penalty's anchor and the ascent's only forward.
_ONE_PASS = ("n-fgsm-clean", "n-fgsm-noisy")
INNERS = ("pgd", "n-fgsm", "n-fgsm-clean", "n-fgsm-noisy", "reuse", "free")

# The recommended weight per method (variant "robust"): the package's table.
RECOMMENDED_WEIGHT = {name: METHOD_SETTINGS[name].weight for name in METHODS}


@dataclass
class PretrainConfig:
    """Settings of one pretraining run.

    Attributes:
        method: ``simclr`` or ``byol``.
        variant: ``plain``, ``reg``, ``advview`` or ``acl`` (see module docstring).
        arch: Encoder architecture (``cnn`` or ``resnet18``).
        epochs: Passes over the training images.
        batch_size: Images per step (two views each).
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        robust_weight: Weight of the regulariser (``reg``/``advview``/``robust``).
        epsilon: Radius of the threat ball (pixel units).
        norm: ``linf`` or ``l2``.
        steps: Ascent steps of the regulariser's inner maximisation.
        step_size: Ascent step of the regulariser (``None``: ``2.5 * epsilon / steps``).
        batch_norm: The regulariser's BatchNorm mode, ``batch`` or ``running``.
        adversarial_views: ``robust`` only: perturb view 0 (1) or both views (2).
        detach_anchor: ``robust`` only: the clean embedding of a perturbed view, used only as the
            regulariser's anchor, is computed without gradient (the deviation pulls the adversarial
            embedding toward it, not both ways; one backward pass fewer per step).
        random_start: Start the regulariser's ascent from a uniform draw in the ball (``False``: at
            the clean input; for ``robust`` with one adversarial view the perturbed view's clean pass
            is then the ascent's first iterate, one forward fewer per step).
        ascent: What the regulariser's ascent maximises (``RobustnessRegularizer(ascent=...)``;
            ``None``: ``"positive"`` for ``robust``, the recommended configuration: away from the
            other view's clean embedding; ``"deviation"`` for the backbone forms); ``"instance"``
            searches toward the batch's other samples.
        clean_view_loss: ``robust`` only: the SSL loss averages the clean and the adversarial
            embedding of each perturbed view (no extra forward), instead of the adversarial one alone.
        adversarial_fraction: ``robust`` only: the share of each perturbed view's batch that the
            regulariser perturbs (the first samples of the shuffled batch); the SSL loss sees
            their adversarial embeddings and the others' clean ones. Below 1 the ascent is cheaper.
        robust_start: Fraction of the epochs trained with the plain SSL loss before the robust
            term (or the ACL attack) starts (a late start, cheaper).
        epsilon_ramp: Fraction of the epochs over which the training eps grows linearly
            to ``epsilon`` (0: constant eps).
        epsilon_from: ``robust`` only: the training eps of the first epoch, moved linearly to ``epsilon`` at the
            last (``None``: ``epsilon`` throughout). Above ``epsilon``: a larger ball early that shrinks to the
            threat's as the annealed augmentation weakens (the cost issue's "larger training eps early").
        steps_from: The regulariser's ascent steps in the first epochs (``None``: ``steps`` throughout):
            the epochs are split into equal parts, one per count from ``steps_from`` to ``steps``
            (e.g. 1, 2, 3 over thirds: a cheaper start; 2, 3, 4: a curriculum at the same mean cost).
        inner: ``robust`` only: the inner maximisation, ``"pgd"`` (the regulariser's ``steps`` from a uniform
            start in the ball; the harness's default, so ``simclr+robust-reg`` is 0.2's default throughout the
            committed results, and 0.3's package default is ``[inner=n-fgsm,anneal_augment=true]``) or
            ``"n-fgsm"`` (the package's ``RobustnessRegularizer(inner="n-fgsm")``: uniform noise of 2 eps,
            one sign step of eps, not projected back onto the eps-ball) or
            ``"reuse"`` (no ascent pass: the training backward's input gradient on the adversarial view moves
            the sample's stored perturbation one sign step of ``step_size``, default eps, for its next visit;
            "free" adversarial training, Shafahi et al. 2019, with ATTA's memory; needs ``warm_start``, L-inf) or
            ``"n-fgsm-clean"`` (N-FGSM whose sign step is the gradient at the clean view, taken in view 0's clean
            pass, which is also the anchor: one forward fewer than ``"n-fgsm"``, whose gradient is taken at the
            noisy point; :func:`clean_gradient_step`; a negative result: level with N-FGSM on the CIFAR-10 subset,
            15 points below it on MNIST, ``benchmarks/results/negative-results.md``; the MNIST batch ran a package
            implementation of the same step, commit 1d173eb, not kept) or ``"n-fgsm-noisy"`` (N-FGSM itself, its
            gradient taken at the noisy point, whose pass is also the penalty's anchor: view 0 has no clean pass,
            one forward fewer than ``"n-fgsm"``; :func:`clean_gradient_step` with ``at_noise``) or ``"free"``
            (free adversarial training's minibatch replay, Shafahi et al. 2019: each batch is trained ``replays``
            times in a row on the same views; view 0 carries a perturbation that starts as a uniform draw in the
            ball and moves one projected sign step of eps along the input gradient of each replay's training
            backward; no ascent pass; :func:`free_step`).
        refine: ``inner="n-fgsm"`` only: the share of view 0's samples that take one more ascent step after
            N-FGSM's, those whose adversarial embedding moved least from the anchor (0: none;
            :func:`least_moved_step`; the cost issue's "extra steps on the samples the cheap step moves least").
        replays: ``inner="free"`` only (2 or more): optimizer steps on each batch in a row.
        anchor: ``robust`` with ``inner="n-fgsm"`` only: ``"start"`` runs the package's
            ``RobustnessRegularizer(inner="n-fgsm-start")``, which anchors the penalty in the pass at N-FGSM's noisy
            start, in place of view 0's clean pass (the package's form of ``inner="n-fgsm-noisy"``, the harness's
            copy that the first runs used; rows ``[inner=n-fgsm,anchor=start]``).
        penalty: ``robust`` only: where the regulariser's deviation is measured at the point its
            ascent found: ``"embedding"`` (the normalised embedding the loss compares, the
            recommended configuration), ``"backbone"`` (the backbone's raw features, the bound's
            quantity and what a downstream probe reads; relative to their batch spread) or
            ``"both"`` (the sum). The ascent is the same in all three. ``"positive"``: the anchor is the
            other view's clean embedding (the ascent's positive), not view 0's, so view 0 has no clean
            pass (the step costs about what ACL-style PGD-3 costs); needs the positive ascent. ``"kl"``
            (SimCLR): TRADES-style, the KL divergence between the clean and the adversarial view-0
            embedding's softmax over NT-Xent's similarities to the batch's view-1 embeddings.
        warm_start: ``robust`` only (one whole adversarial view, the embedding penalty, the positive
            ascent): view 0's ascent starts from the perturbation its sample ended at in the previous
            epoch, kept in the package's :class:`~robust_reg.PerturbationMemory` in image coordinates and
            warped into the new view's crop (ATTA, Zheng et al. 2020; the crop's ``geometry=``), instead of
            a uniform draw; the first epoch starts as ``random_start`` says. Fewer steps then reach a
            strong point.
        warm_warp: With ``warm_start``: warp the carried perturbation through each view's crop (``False``:
            carry it in view coordinates, as the adapters do for a pipeline that does not expose its
            crops' geometry).
        acl_steps: PGD steps of the ``acl``, ``acl-ds`` and ``dynacl`` baselines' attack.
        lp_aft: Post-process the encoder as DynACL++ does (pseudo-label LP-AFT, timed, counted in the time).
        anneal_augment: Anneal the augmentation strength from strong to weak (DynACL's schedule; always on for
            ``dynacl``).
        ema: ``dynacl`` only: view 1 through a momentum (EMA) copy of the encoder in the attack and the loss,
            the copy evaluated downstream (``None``: on for ``dynacl``, the authors' method).
        authors_augment: ``acl-ds``/``dynacl`` on natural images: the authors' augmentation
            (:func:`authors_augment`) instead of the shared recipe (``None``: on for those variants).
        seed: Seed of initialisation, shuffling and augmentation.
        amp: Use bfloat16 autocast (on CUDA).
    """

    method: str = "simclr"
    variant: str = "plain"
    arch: str = "cnn"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    robust_weight: float = 1.0
    epsilon: float = 0.1
    norm: str = "linf"
    steps: int = 3
    step_size: float | None = None
    batch_norm: str = "batch"
    adversarial_views: int = 1
    detach_anchor: bool = False
    random_start: bool = True
    ascent: str | None = None
    clean_view_loss: bool = False
    adversarial_fraction: float = 1.0
    robust_start: float = 0.0
    epsilon_ramp: float = 0.0
    epsilon_from: float | None = None
    steps_from: int | None = None
    inner: str = "pgd"
    anchor: str = "clean"
    replays: int = 1
    refine: float = 0.0
    penalty: str = "embedding"
    warm_start: bool = False
    warm_warp: bool = True
    acl_steps: int = 5
    anneal_augment: bool = False
    ema: bool | None = None
    authors_augment: bool | None = None
    lp_aft: bool = False
    seed: int = 0
    amp: bool = False

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant in ("reg", "advview") and not self.robust_weight > 0:
            raise ValueError(f"robust_weight must be > 0 for variant {self.variant!r}")
        if self.variant == "robust" and not self.robust_weight >= 0:
            raise ValueError(f"robust_weight must be >= 0 for variant {self.variant!r}")
        if self.adversarial_views not in (1, 2):
            raise ValueError(f"adversarial_views must be 1 or 2, got {self.adversarial_views}")
        if self.clean_view_loss and self.adversarial_views != 1:
            raise ValueError("clean_view_loss supports adversarial_views=1 only")
        if self.ascent is None:
            self.ascent = "positive" if self.variant == "robust" else "deviation"
        if self.ascent not in ("deviation", "instance", "positive"):
            raise ValueError(f"ascent must be 'deviation', 'instance' or 'positive', got {self.ascent!r}")
        if not 0.0 < self.adversarial_fraction <= 1.0:
            raise ValueError(f"adversarial_fraction must be in (0, 1], got {self.adversarial_fraction}")
        for name in ("robust_start", "epsilon_ramp"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.epsilon_from is not None and (
            self.variant != "robust" or self.epsilon_ramp or not 0 < self.epsilon_from < float("inf")
        ):
            raise ValueError(
                f"epsilon_from must be a positive eps of variant 'robust' without epsilon_ramp, got {self.epsilon_from}"
            )
        if self.steps_from is not None and not 0 <= self.steps_from <= self.steps:
            raise ValueError(f"steps_from must be in [0, steps={self.steps}], got {self.steps_from}")
        if self.inner not in INNERS:
            raise ValueError(f"inner must be one of {INNERS}, got {self.inner!r}")
        if self.inner == "reuse" and (not self.warm_start or self.norm != "linf"):
            raise ValueError("inner='reuse' keeps its perturbations in the memory: it needs warm_start and norm linf")
        single = self.inner in ("n-fgsm", "free", *_ONE_PASS)
        if single and (self.variant != "robust" or self.warm_start or self.penalty != "embedding"):
            raise ValueError(
                f"inner={self.inner!r} needs variant 'robust', penalty 'embedding' and no warm_start: add inner=pgd"
            )
        if single and (self.steps != 3 or self.step_size is not None or self.steps_from is not None):
            raise ValueError(
                f"inner={self.inner!r} takes one step of eps: steps, step_size and steps_from set inner=pgd's ascent"
            )
        if (self.inner == "free") != (self.replays >= 2) or self.replays < 1:
            raise ValueError(f"inner='free' replays each batch 2 or more times, other inners once; got {self.replays}")
        if self.inner in (*_ONE_PASS, "free") and (
            self.norm != "linf"
            or self.ascent != "positive"
            or self.adversarial_views != 1
            or self.clean_view_loss
            or self.adversarial_fraction != 1
            or not self.random_start
        ):
            raise ValueError(
                f"inner={self.inner!r} perturbs all of view 0 from noise along the positive ascent's L-inf sign: it "
                "needs norm linf, ascent positive, one adversarial view, no clean_view_loss, no adversarial_fraction "
                "and random_start"
            )
        if not 0.0 <= self.refine < 1.0 or self.refine and (self.inner != "n-fgsm" or self.anchor != "clean"):
            raise ValueError(f"refine is a share in [0, 1) of N-FGSM's samples (inner='n-fgsm'), got {self.refine}")
        if self.anchor not in ("clean", "start"):
            raise ValueError(f"anchor must be 'clean' or 'start', got {self.anchor!r}")
        if self.anchor == "start" and (
            self.variant != "robust"
            or self.inner != "n-fgsm"
            or self.penalty != "embedding"
            or self.adversarial_views != 1
            or self.adversarial_fraction != 1
            or self.clean_view_loss
            or self.warm_start
        ):
            raise ValueError(
                "anchor='start' replaces view 0's clean pass: it needs variant 'robust', inner 'n-fgsm', penalty "
                "'embedding', one whole adversarial view, no clean_view_loss and no warm_start"
            )
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if self.penalty != "embedding" and (
            self.variant != "robust" or self.adversarial_views != 1 or self.adversarial_fraction != 1
        ):
            raise ValueError("penalty other than 'embedding' needs variant 'robust' with one whole adversarial view")
        if self.penalty != "embedding" and (not self.random_start or self.clean_view_loss):
            raise ValueError("penalty other than 'embedding' needs random_start and no clean_view_loss")
        if self.penalty == "kl" and (self.method != "simclr" or self.detach_anchor):
            raise ValueError("penalty='kl' needs method 'simclr' and no detach_anchor")
        if self.penalty == "positive" and (self.ascent != "positive" or self.detach_anchor):
            raise ValueError("penalty='positive' needs ascent='positive' and no detach_anchor")
        if self.warm_start and (
            self.variant != "robust"
            or self.adversarial_views != 1
            or self.adversarial_fraction != 1
            or self.penalty != "embedding"
            or self.ascent != "positive"
            or self.clean_view_loss
        ):
            raise ValueError(
                "warm_start needs variant 'robust' with one whole adversarial view, penalty 'embedding', "
                "ascent 'positive' and no clean_view_loss"
            )
        if not self.warm_warp and not self.warm_start:
            raise ValueError("warm_warp=False needs warm_start (it says how the perturbation is carried)")
        for name in ("ema", "authors_augment"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.ema is None:
            self.ema = self.variant == "dynacl"
        if self.ema and self.variant != "dynacl":
            raise ValueError("ema (DynACL's momentum encoder) is for variant 'dynacl' only")
        if self.authors_augment is None:
            self.authors_augment = self.variant in DUAL_BN
        if self.variant in DUAL_BN and self.method != "simclr":
            raise ValueError(f"variant {self.variant!r} is SimCLR's (ACL and DynACL as published): method 'simclr'")
        if self.clean_view_loss and self.detach_anchor:
            raise ValueError("clean_view_loss needs the clean embedding's gradient: not with detach_anchor")


def pretrain(data: ImageData, config: PretrainConfig, *, device: str | torch.device = "cpu", **options: Any):
    """Pretrain with the configured method and variant: the package's loop (``options``: its ``augment``,
    ``progress_bar``, ``log``) with this harness's step."""
    device = torch.device(device)
    # The package's own memory: in image coordinates moved with the crops (warm_warp), else as the view saw it.
    memory = PerturbationMemory(num_samples=data.x_train.shape[0], device=device) if config.warm_start else None
    cluster_on = None
    if config.authors_augment and data.kind != "digits":
        options.setdefault("augment", authors_augment())
    if config.variant not in DUAL_BN:
        step = harness_step(config, memory)
        result = _pretrain(data, config, device=device, step=step, replays=config.replays, **options)
    else:
        prepare = add_dual_batch_norm_and_ema if config.ema else add_dual_batch_norm
        result = _pretrain(data, config, device=device, step=harness_step(config), prepare=prepare, **options)
        if config.ema:  # the authors evaluate the momentum encoder, and cluster its clean branch for LP-AFT
            if config.lp_aft:  # the copy is only for the clustering
                cluster_on = batch_norm_branch(result.model.ema.backbone, "clean")
            result.encoder = result.model.ema.backbone
        keep_adversarial_batch_norm(result.model)  # the encoder evaluated downstream: ACL's adversarial branch
    if config.lp_aft:
        start = time.perf_counter()
        result.encoder, pseudo = lp_aft(result.encoder, data, config, device, cluster_on=cluster_on)
        seconds = time.perf_counter() - start
        result.seconds += seconds  # every baseline's cost, post-processing included, counts in the budgets
        purity = pseudo_label_purity(pseudo, data.y_train)  # after the stage: a diagnostic, not training input
        result.history.append({"stage": "lp-aft", "seconds": seconds, "pseudo_label_purity": purity})
    return result


def pseudo_label_purity(pseudo: Tensor, labels: Tensor) -> float:
    """The share of samples whose class is their cluster's most common class (1: clusters are the classes)."""
    pseudo, labels = pseudo.cpu(), labels.cpu()
    agreeing = sum(int(torch.bincount(labels[pseudo == c]).max()) for c in pseudo.unique())
    return agreeing / labels.numel()


def lp_aft(
    encoder: nn.Module,
    data: ImageData,
    config: PretrainConfig,
    device: torch.device,
    *,
    cluster_on: nn.Module | None = None,
) -> tuple[nn.Module, Tensor]:
    """DynACL++'s post-processing: k-means pseudo labels, a linear probe on them, then TRADES on encoder and probe.

    Labels are never read: the pseudo labels cluster the training features (of ``cluster_on``, default
    ``encoder``: DynACL's momentum encoder through its clean BatchNorm) into as many groups as the
    dataset has classes (the authors' choice). The fine-tuning is ``robust_reg.finetune.adversarial_finetune``
    with :data:`LP_AFT` from the probe, with the crop-and-flip augmentation of the evaluation's fine-tuning.
    Returns the fine-tuned encoder and the pseudo labels.
    """
    from sklearn.cluster import KMeans

    from robust_reg.demo.pipeline import ShuffledBatches, crop_flip, fixed_batches
    from robust_reg.finetune import adversarial_finetune
    from robust_reg.probe import extract_features, fit_linear_probe

    features, _ = extract_features(cluster_on or encoder, fixed_batches(data.x_train, data.y_train), device=device)
    k = data.num_classes
    clusters = KMeans(n_clusters=k, n_init=10, random_state=config.seed).fit_predict(features.cpu().numpy())
    pseudo = torch.as_tensor(clusters, dtype=torch.long)
    # A strongly decayed probe: the L-BFGS optimum on small-spread features has a norm that makes TRADES at
    # lr 0.1 diverge (NaN on MNIST); the authors' probe is 10 SGD epochs from zero, also small.
    probe = fit_linear_probe(encoder, fixed_batches(data.x_train, pseudo), k, weight_decay=1e-2, device=device)
    loader = ShuffledBatches(data.x_train, pseudo, LP_AFT.batch_size, config.seed)
    augment = crop_flip(data.kind != "digits", config.seed)
    model = adversarial_finetune(
        encoder,
        loader,
        k,
        epsilon=config.epsilon,
        norm=config.norm,
        schedule=LP_AFT,
        augment=augment,
        head=probe,
        device=device,
    )
    return model.encoder, pseudo


def harness_step(config: PretrainConfig, memory: PerturbationMemory | None = None):
    """The package loop's ``step`` for ``config``: each epoch's schedule, its regulariser, the variant's loss."""
    current: dict[str, Any] = {}

    def step(model: nn.Module, x: Tensor, index: Tensor, epoch: int, augment: BatchAugment) -> tuple[Tensor, float]:
        if current.get("epoch") != epoch:
            epoch_config = scheduled(config, epoch)
            current.update(
                epoch=epoch,
                config=epoch_config,
                reg=regularizer_for(epoch_config),
                threat=ThreatModel(epoch_config.epsilon, norm=config.norm),
            )
        epoch_config, reg = current["config"], current["reg"]
        if config.anneal_augment or config.variant == "dynacl":
            strength = augmentation_strength(epoch, config.epochs, refresh=DYNACL_REFRESH)
            if ("augment", strength) not in current:
                current["augment", strength] = augment.with_strength(strength)
            augment = current["augment", strength]
        if epoch_config.variant in DUAL_BN:
            return acl_ds_step(model, current["threat"], augment(x), augment(x), epoch_config, epoch)
        if epoch_config.inner == "free" and epoch_config.variant == "robust":
            return free_step(model, x, augment, epoch_config, current)
        if memory is None or epoch_config.variant != "robust":
            return step_loss(model, reg, current["threat"], augment(x), augment(x), epoch_config)
        (x0, theta), x1 = augment(x, return_theta=True), augment(x)
        if epoch_config.inner == "reuse":
            return reuse_step(model, x0, x1, epoch_config, memory.at(index, theta if config.warm_warp else None))
        return warm_start_step(model, reg, x0, x1, epoch_config, memory.at(index, theta if config.warm_warp else None))

    return step


def scheduled(config: PretrainConfig, epoch: int) -> PretrainConfig:
    """The settings of one epoch: plain SSL before ``robust_start``, eps ramped linearly over ``epsilon_ramp``
    (or moved linearly from ``epsilon_from`` over the run), the ascent's steps from ``steps_from`` up to ``steps``."""
    if epoch < round(config.robust_start * config.epochs):
        return replace(config, variant="plain")
    if config.steps_from is not None:
        counts = config.steps - config.steps_from + 1
        config = replace(config, steps=config.steps_from + counts * epoch // config.epochs, steps_from=None)
    epsilon = ramped_epsilon(config.epsilon, epoch, config.epochs, config.epsilon_ramp)
    if config.epsilon_from is not None:
        share = epoch / (config.epochs - 1) if config.epochs > 1 else 1.0
        epsilon = config.epsilon_from + (config.epsilon - config.epsilon_from) * share
    if epsilon != config.epsilon:
        return replace(config, epsilon=epsilon)
    return config


def regularizer_for(config: PretrainConfig) -> RobustnessRegularizer:
    """The regulariser of a variant: on the normalised embedding for ``robust``, on the backbone otherwise.

    The screens still reach 0.2's options that lost their measurements (``batch_norm``, ``ascent``,
    ``random_start``, ``normalize_features``) through their deprecated spelling, until 0.4 removes them.
    """
    # The other variants regularise the backbone with no positive: the paper's form, its own class since 0.3.
    form = RobustnessRegularizer if config.variant == "robust" else BackboneRobustnessRegularizer
    # N-FGSM is the package's own inner maximisation (inner="n-fgsm"): the harness measures the shipped code.
    pgd = {"inner": "pgd", "steps": config.steps, "step_size": config.step_size}
    inner = {"inner": "n-fgsm-start" if config.anchor == "start" else "n-fgsm"} if config.inner == "n-fgsm" else pgd
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"\w*RobustnessRegularizer\(.*deprecated", DeprecationWarning)
        return form(
            config.epsilon,
            norm=config.norm,
            **inner,
            batch_norm=config.batch_norm,
            normalize_features=config.variant == "robust",
            ascent=config.ascent,
            random_start=config.random_start,
            detach_anchor=config.detach_anchor,
        )


def step_loss(
    model: nn.Module, reg: RobustnessRegularizer, threat: ThreatModel, x0: Tensor, x1: Tensor, config: PretrainConfig
) -> tuple[Tensor, float]:
    """One training step's loss for ``config.variant``; returns ``(loss, regulariser value or 0)``.

    ``reg`` is the variant's regulariser and ``threat`` the ACL baseline's ball (see :func:`pretrain`).
    """
    backbone = model.backbone
    if config.variant == "acl":
        h1 = backbone(x1)
        x0_adv = _contrastive_attack(model, x0, x1, h1.detach(), threat, config.acl_steps)
        return model.loss_from_features((x0, x1), (backbone(x0_adv), h1)), 0.0
    if config.variant == "robust":
        return _robust_step(model, reg, x0, x1, config)
    h0 = backbone(x0)
    h1 = backbone(x1)
    if config.variant == "reg":
        # The one added line: the regulariser reuses the features the SSL loss uses.
        reg_term = reg(backbone, x0, features=h0).loss
        return model.loss_from_features((x0, x1), (h0, h1)) + config.robust_weight * reg_term, reg_term.item()
    if config.variant == "advview":
        out = reg(backbone, x0, features=h0)
        ssl = model.loss_from_features((out.adversarial_inputs, x1), (out.adversarial_features, h1))
        return ssl + config.robust_weight * out.loss, out.loss.item()
    return model.loss_from_features((x0, x1), (h0, h1)), 0.0


def _robust_step(
    model: nn.Module, reg: RobustnessRegularizer, x0: Tensor, x1: Tensor, config: PretrainConfig
) -> tuple[Tensor, float]:
    """The recommended configuration: regularise the embedding the loss compares, feed it the adversarial one."""
    if config.penalty != "embedding":
        return _PENALTY_STEPS[config.penalty](model, reg, x0, x1, config)
    if config.refine:
        return least_moved_step(model, reg, x0, x1, config)
    if config.inner in _ONE_PASS:
        return clean_gradient_step(model, x0, x1, config, at_noise=config.inner == "n-fgsm-noisy")
    # Without a random start, the regulariser's first ascent forward is view 0's clean pass.
    reuse = config.anchor == "start" or (
        not (reg.random_start or config.clean_view_loss)
        and config.adversarial_views == 1
        and config.adversarial_fraction == 1
    )
    with torch.set_grad_enabled(not config.detach_anchor):
        z = [None if reuse else model(x) for x in (x0, x1)[: config.adversarial_views]]
    z += [model(x1)] * (2 - len(z))
    clean = list(z)
    terms = []
    for i in range(config.adversarial_views):
        x = (x0, x1)[i]
        k = max(2, round(config.adversarial_fraction * x.shape[0]))
        positive = clean[1 - i][:k].detach() if config.ascent == "positive" else None
        features = None if z[i] is None else z[i][:k]
        out = reg(model, x[:k], features=features, positive=positive)
        adversarial = torch.cat([out.adversarial_features, z[i][k:]]) if k < x.shape[0] else out.adversarial_features
        z[i] = (z[i], adversarial) if config.clean_view_loss else adversarial
        terms.append(out.loss)
    term = sum(terms) / len(terms)
    # Views feed BYOL's momentum targets: they stay clean.
    return model.loss_from_embeddings((x0, x1), (z[0], z[1])) + config.robust_weight * term, term.item()


def _backbone_penalty_step(
    model: nn.Module, reg: RobustnessRegularizer, x0: Tensor, x1: Tensor, config: PretrainConfig
) -> tuple[Tensor, float]:
    """``_robust_step`` with the deviation also (or only) measured on the backbone's raw features."""
    # The backbone's output of the first pass (view 0, clean) and of the last (the adversarial view):
    # the regulariser's adversarial forward is the last backbone call of the step.
    seen: dict[str, Tensor] = {}

    def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        seen.setdefault("clean", output)
        seen["last"] = output

    handle = model.backbone.register_forward_hook(record)
    try:
        _, z1, out = _perturbed_view0(model, reg, x0, x1, config)
    finally:
        handle.remove()
    backbone_term = _relative_deviation(seen["last"], seen["clean"])
    term = backbone_term if config.penalty == "backbone" else backbone_term + out.loss
    ssl = model.loss_from_embeddings((x0, x1), (out.adversarial_features, z1))
    return ssl + config.robust_weight * term, term.item()


def _perturbed_view0(
    model: nn.Module,
    reg: RobustnessRegularizer,
    x0: Tensor,
    x1: Tensor,
    config: PretrainConfig,
    start: WarmStart | None = None,
) -> tuple[Tensor, Tensor, RegularizerOutput]:
    """The recommended step's passes for one whole adversarial view: ``(z0, z1, reg(...) on view 0)``,
    warm-started from ``start`` (``memory.at(index, geometry)``) if given."""
    with torch.set_grad_enabled(not config.detach_anchor):
        z0 = model(x0)
    z1 = model(x1)
    positive = z1.detach() if config.ascent == "positive" else None
    return z0, z1, reg(model, x0, features=z0, positive=positive, start=start)


def _relative_deviation(features: Tensor, anchor: Tensor, *, normalize: bool = False) -> Tensor:
    """The regulariser's value: mean squared distance of ``features`` to ``anchor`` over the anchor's spread
    (``normalize``: of both L2-normalised first, as the regulariser measures embeddings)."""
    z, h = features.flatten(start_dim=1).float(), anchor.flatten(start_dim=1).float()
    if normalize:
        z, h = F.normalize(z, dim=1), F.normalize(h, dim=1)
    spread = (h - h.mean(dim=0, keepdim=True)).pow(2).sum(dim=1).mean()  # the regulariser's sigma squared
    return (z - h).pow(2).sum(dim=1).mean() / spread.clamp_min(torch.finfo(spread.dtype).tiny)


def _kl_penalty_step(
    model: nn.Module, reg: RobustnessRegularizer, x0: Tensor, x1: Tensor, config: PretrainConfig
) -> tuple[Tensor, float]:
    """SimCLR's recommended step with a TRADES-style penalty: KL(clean || adversarial) of view 0's
    softmax over NT-Xent's similarities to the batch's view-1 embeddings."""
    z0, z1, out = _perturbed_view0(model, reg, x0, x1, config)
    others = F.normalize(z1.flatten(start_dim=1).float(), dim=1).T / model.criterion.temperature
    clean, adversarial = (
        F.normalize(z.flatten(start_dim=1).float(), dim=1) @ others for z in (z0, out.adversarial_features)
    )
    term = F.kl_div(adversarial.log_softmax(dim=1), clean.log_softmax(dim=1), log_target=True, reduction="batchmean")
    ssl = model.loss_from_embeddings((x0, x1), (out.adversarial_features, z1))
    return ssl + config.robust_weight * term, term.item()


def _positive_anchor_step(
    model: nn.Module, reg: RobustnessRegularizer, x0: Tensor, x1: Tensor, config: PretrainConfig
) -> tuple[Tensor, float]:
    """The positive ascent on view 0, penalised by the adversarial embedding's relative distance to view 1's
    clean one (which the loss computes anyway): no clean pass of view 0."""
    z1 = model(x1)
    positive = F.normalize(z1.detach().flatten(start_dim=1).float(), dim=1)

    def objective(v: Tensor) -> Tensor:
        return (F.normalize(model(v).flatten(start_dim=1).float(), dim=1) - positive).pow(2).sum(dim=1)

    # As in the regulariser: batch statistics, running statistics untouched by these passes.
    with preserved_state(model):
        x_adv = projected_gradient_ascent(
            objective, x0, reg.threat, steps=reg.steps, step_size=reg.step_size, random_start=reg.random_start
        )
        z_adv = model(x_adv)
    term = _relative_deviation(z_adv, z1, normalize=True)
    return model.loss_from_embeddings((x0, x1), (z_adv, z1)) + config.robust_weight * term, term.item()


def warm_start_step(
    model: nn.Module, reg: RobustnessRegularizer, x0: Tensor, x1: Tensor, config: PretrainConfig, start: WarmStart
) -> tuple[Tensor, float]:
    """The recommended step with view 0's ascent warm-started from ``start`` (``memory.at(index, geometry)``)
    instead of a uniform draw."""
    _, z1, out = _perturbed_view0(model, reg, x0, x1, config, start)
    loss = model.loss_from_embeddings((x0, x1), (out.adversarial_features, z1)) + config.robust_weight * out.loss
    return loss, out.loss.item()


def reuse_step(
    model: nn.Module, x0: Tensor, x1: Tensor, config: PretrainConfig, start: WarmStart
) -> tuple[Tensor, float]:
    """The gradient-reusing step (``inner="reuse"``): view 0 carries the perturbation its sample's last visit left
    in the memory (a uniform draw on the first); the input gradient that the training backward computes anyway
    moves it one projected sign step, written back when the backward reaches the input. No ascent pass: the
    step costs plain SSL, the anchor's clean forward (no graph) and the input gradient."""
    eps = config.epsilon
    step = config.step_size if config.step_size is not None else eps
    memory = start.memory
    delta = memory.read(start.index, x0, start.geometry, fill=lambda: (2 * torch.rand_like(x0) - 1) * eps)
    x_adv = (x0 + delta.clamp(-eps, eps)).clamp(0, 1).requires_grad_(True)
    with torch.no_grad():
        anchor = model(x0)
    z1 = model(x1)
    z_adv = model(x_adv)
    term = _relative_deviation(z_adv, anchor, normalize=True)

    def advance(grad: Tensor) -> None:
        memory.write(start.index, _sign_step(x_adv, grad, x0, step, eps) - x0, start.geometry)

    x_adv.register_hook(advance)
    return model.loss_from_embeddings((x0, x1), (z_adv, z1)) + config.robust_weight * term, term.item()


def _sign_step(x_adv: Tensor, grad: Tensor, x0: Tensor, step: float, eps: float) -> Tensor:
    """``x_adv`` moved a sign step of ``step`` along ``grad``, projected onto the eps-ball around ``x0`` and [0, 1]."""
    return (x_adv.detach() + step * grad.sign()).clamp(x0 - eps, x0 + eps).clamp(0, 1)


def free_step(
    model: nn.Module, x: Tensor, augment: BatchAugment, config: PretrainConfig, state: dict[str, Any]
) -> tuple[Tensor, float]:
    """One replay of free adversarial training (``inner="free"``): the first replay of a batch (a new ``x``) draws
    its two views and view 0's perturbation, uniform in the eps-ball; each replay trains on view 0 so perturbed,
    and the input gradient its backward computes anyway (of the whole loss: the SSL term and the penalty) moves the
    perturbation one sign step of eps, projected onto the ball, for the next replay. The anchor, view 0's clean
    embedding, is computed once per batch without a graph when detached, else in each replay."""
    eps = config.epsilon
    if state.get("batch") is not x:
        x0, x1 = augment(x), augment(x)
        with torch.no_grad():
            anchor = model(x0) if config.detach_anchor else None
        state.update(batch=x, views=(x0, x1), anchor=anchor, delta=(2 * torch.rand_like(x0) - 1) * eps)
    x0, x1 = state["views"]
    anchor = state["anchor"] if config.detach_anchor else model(x0)
    x_adv = (x0 + state["delta"]).clamp(0, 1).requires_grad_(True)
    with preserved_state(model):  # BatchNorm's running statistics from the clean views, as the regulariser's
        z_adv = model(x_adv)
    z1 = model(x1)
    term = _relative_deviation(z_adv, anchor, normalize=True)

    def advance(grad: Tensor) -> None:
        state["delta"] = _sign_step(x_adv, grad, x0, eps, eps) - x0

    x_adv.register_hook(advance)
    return model.loss_from_embeddings((x0, x1), (z_adv, z1)) + config.robust_weight * term, term.item()


def clean_gradient_step(
    model: nn.Module, x0: Tensor, x1: Tensor, config: PretrainConfig, *, at_noise: bool = False
) -> tuple[Tensor, float]:
    """N-FGSM from one view-0 pass that is also the penalty's anchor.

    ``at_noise=False`` (``inner="n-fgsm-clean"``): the pass is view 0's clean one, taken with its input's gradient;
    view 0 moves one sign step of eps along that gradient (the positive ascent's: away from view 1's clean
    embedding) plus N-FGSM's uniform noise of 2 eps, not projected back onto the eps-ball. ``at_noise=True``
    (``inner="n-fgsm-noisy"``): the pass is at N-FGSM's noisy point, so the step is N-FGSM's own and the anchor is
    the noisy view's embedding; view 0 has no clean pass. N-FGSM (``"n-fgsm"``) takes its gradient at the noisy
    point in a forward of its own beside view 0's clean pass: both are one forward fewer. The adversarial pass
    (and the noisy one) leave BatchNorm's running statistics alone, as the regulariser's passes do."""
    eps = config.epsilon
    noise = (2 * torch.rand_like(x0) - 1) * (2 * eps)
    x = ((x0.detach() + noise).clamp(0, 1) if at_noise else x0.detach()).requires_grad_(True)
    with preserved_state(model) if at_noise else nullcontext():
        z0 = model(x)
    z1 = model(x1)
    positive = F.normalize(z1.detach().flatten(start_dim=1).float(), dim=1)
    score = (F.normalize(z0.flatten(start_dim=1).float(), dim=1) - positive).pow(2).sum()
    (grad,) = torch.autograd.grad(score, x, retain_graph=not config.detach_anchor)
    start = x.detach() if at_noise else x.detach() + noise
    x_adv = (start + eps * grad.sign()).clamp(0, 1)
    with preserved_state(model):
        z_adv = model(x_adv)
    term = _relative_deviation(z_adv, z0.detach() if config.detach_anchor else z0, normalize=True)
    return model.loss_from_embeddings((x0, x1), (z_adv, z1)) + config.robust_weight * term, term.item()


def least_moved_step(
    model: nn.Module, reg: RobustnessRegularizer, x0: Tensor, x1: Tensor, config: PretrainConfig
) -> tuple[Tensor, float]:
    """N-FGSM (the package's), then one more sign step of eps for the share ``config.refine`` of view 0's samples
    whose adversarial embedding moved least from their anchor, along the positive ascent's gradient (away from
    view 1's clean embedding), kept within N-FGSM's reach of 3 eps; those samples' adversarial embeddings are
    replaced by the refined ones. Costs about ``refine`` times one more forward and backward of view 0."""
    eps = config.epsilon
    with torch.set_grad_enabled(not config.detach_anchor):
        z0 = model(x0)
    z1 = model(x1)
    out = reg(model, x0, features=z0, positive=z1.detach())
    z_adv = out.adversarial_features
    with torch.no_grad():
        unit = [F.normalize(z.flatten(start_dim=1).float(), dim=1) for z in (z_adv, z0, z1)]
        moved = (unit[0] - unit[1]).pow(2).sum(dim=1)
    index = moved.topk(max(1, round(config.refine * len(x0))), largest=False).indices
    x = out.adversarial_inputs[index].detach().requires_grad_(True)
    with preserved_state(model):
        score = (F.normalize(model(x).flatten(start_dim=1).float(), dim=1) - unit[2][index]).pow(2).sum()
    (grad,) = torch.autograd.grad(score, x)
    x_refined = _sign_step(x, grad, x0[index], eps, 3 * eps)  # within N-FGSM's reach, not eps
    with preserved_state(model):
        z_adv = z_adv.index_copy(0, index, model(x_refined).to(z_adv.dtype))
    term = _relative_deviation(z_adv, z0.detach() if config.detach_anchor else z0, normalize=True)
    return model.loss_from_embeddings((x0, x1), (z_adv, z1)) + config.robust_weight * term, term.item()


_PENALTY_STEPS = {
    "backbone": _backbone_penalty_step,
    "both": _backbone_penalty_step,
    "kl": _kl_penalty_step,
    "positive": _positive_anchor_step,
}


def _contrastive_attack(
    model: nn.Module, x0: Tensor, x1: Tensor, h1: Tensor, threat: ThreatModel, steps: int
) -> Tensor:
    """PGD on the SSL loss w.r.t. view 0 (the ACL/RoCL-style label-free attack); ``h1`` is view 1's
    features from the step, detached."""

    def objective(v: Tensor) -> Tensor:
        loss = model.loss_from_features((x0, x1), (model.backbone(v), h1))
        return loss.expand(v.shape[0])  # a batch loss: every sample ascends the same objective

    with preserved_state(model):
        return projected_gradient_ascent(objective, x0, threat, steps=steps)


class _DualBatchNorm(nn.Module):
    """One BatchNorm layer for clean inputs and a copy for adversarial ones (ACL's dual BN); ``route[0]`` picks."""

    def __init__(self, bn: nn.Module, route: list[bool]) -> None:
        super().__init__()
        self.clean, self.adversarial, self.route = bn, copy.deepcopy(bn), route

    def forward(self, x: Tensor) -> Tensor:
        return (self.adversarial if self.route[0] else self.clean)(x)


def _batch_norms(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                yield parent, name, child


def add_dual_batch_norm(model: nn.Module) -> None:
    """Give every BatchNorm of ``model`` an adversarial twin (before the optimizer sees the parameters)."""
    route = [False]
    model._dual_bn_route = route
    for parent, name, bn in _batch_norms(model):
        setattr(parent, name, _DualBatchNorm(bn, route))


def add_dual_batch_norm_and_ema(model: nn.Module) -> None:
    """Dual BatchNorm, then ``model.ema``: a momentum copy (no gradient) that routes its BatchNorm with the model."""
    add_dual_batch_norm(model)
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    for module in ema.modules():
        if isinstance(module, _DualBatchNorm):
            module.route = model._dual_bn_route  # one switch for both: adversarial_batch_norm(model) routes the copy
    model.ema = ema


def online_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trained encoder's parameters, in the order of ``model.ema.parameters()``."""
    return [p for name, p in model.named_parameters() if not name.startswith("ema.")]


@torch.no_grad()
def momentum_update(model: nn.Module, momentum: float = DYNACL_MOMENTUM) -> None:
    """``ema = m * ema + (1 - m) * online``, parameter by parameter (BatchNorm statistics are the copy's own)."""
    for online, ema in zip(online_parameters(model), model.ema.parameters(), strict=True):
        ema.mul_(momentum).add_(online, alpha=1 - momentum)


def batch_norm_branch(model: nn.Module, branch: str) -> nn.Module:
    """A copy of ``model`` with each dual BatchNorm replaced by its ``"clean"`` or ``"adversarial"`` layer."""
    model = copy.deepcopy(model)
    _keep_branch(model, branch)
    return model


def _keep_branch(model: nn.Module, branch: str) -> None:
    """Replace, in place, each dual BatchNorm of ``model`` by its ``"clean"`` or ``"adversarial"`` layer."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _DualBatchNorm):
                setattr(parent, name, getattr(child, branch))


class AuthorsAugment(BatchAugment):
    """The demo's batch augmentation with torchvision's ``ColorJitter`` as ACL and DynACL use it: a hue shift
    beside brightness, contrast and saturation, the four in a random order per sample.

    Args:
        hue: Largest hue shift, a fraction of the colour wheel (``ColorJitter(hue=...)``; RGB only; 0 disables).
        random_order: Apply the four in a random order per sample, as ``ColorJitter`` does (else in that order).
        **options: ``BatchAugment``'s; ``strength`` scales the hue shift too.
    """

    def __init__(self, *, hue: float = 0.1, random_order: bool = True, **options: Any) -> None:
        super().__init__(**options)
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue!r}")
        self.base.update(hue=hue, random_order=random_order)
        self.hue, self.random_order = hue * self.strength, random_order

    def _jitters(self) -> bool:
        return self.jitter > 0 or self.hue > 0

    def _jitter(self, x: Tensor, apply: Tensor) -> Tensor:
        n, device, j = x.shape[0], x.device, self.jitter
        b, c, s = (jitter_factor(j, 1.0, apply) for _ in range(3))
        shift = jitter_factor(self.hue, 0.0, apply).view(-1)

        def contrast(y: Tensor) -> Tensor:
            mean = gray(y).mean(dim=(2, 3), keepdim=True)
            return ((y - mean) * c + mean).clamp(0, 1)

        def saturation(y: Tensor) -> Tensor:
            g = gray(y)
            return ((y - g) * s + g).clamp(0, 1)

        ops = [lambda y: (y * b).clamp(0, 1), contrast]
        ops += [saturation, lambda y: shift_hue(y, shift)] if x.shape[1] == 3 else []
        if not self.random_order:
            for op in ops:
                x = op(x)
            return x
        order = torch.rand(n, len(ops), device=device).argsort(dim=1)  # a permutation per sample
        rows = torch.arange(n, device=device)
        for position in range(len(ops)):
            x = torch.stack([op(x) for op in ops])[order[:, position], rows]
        return x


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate each RGB image's hue by ``shift`` (per sample, a fraction of the colour wheel), through HSV."""
    r, g, b = x.unbind(dim=1)
    v, _ = x.max(dim=1)
    delta = v - x.min(dim=1).values
    saturation = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - saturation), v * (1 - saturation * f), v * (1 - saturation * (1 - f))
    sector = i.long() % 6
    table = torch.stack([torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
    return table.gather(1, sector[None, None].expand(3, 1, *sector.shape)).squeeze(1).transpose(0, 1).clamp(0, 1)


def authors_augment() -> AuthorsAugment:
    """ACL's and DynACL's augmentation at full strength (``RandomResizedCrop(32, scale=(1 - 0.9 s, 1))``, flip,
    ``ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s)`` with probability 0.8 s, grayscale 0.2 s, in that order; s = 1
    here, DynACL's annealing lowers it). Remaining difference: ACL resizes bicubically, this bilinearly."""
    return AuthorsAugment(scale=(0.1, 1.0), flip=0.5, jitter=0.4, hue=0.1, jitter_p=0.8, gray_p=0.2, random_order=True)


@contextmanager
def adversarial_batch_norm(model: nn.Module) -> Iterator[None]:
    """Route ``model``'s dual BatchNorm layers to their adversarial twins inside the block."""
    route = model._dual_bn_route
    route[0] = True
    try:
        yield
    finally:
        route[0] = False


def keep_adversarial_batch_norm(model: nn.Module) -> None:
    """Replace each dual BatchNorm by its adversarial twin: a plain model (the encoder evaluated downstream)."""
    _keep_branch(model, "adversarial")


def dynacl_weight(epoch: int, epochs: int) -> float:
    """DynACL's weight of the adversarial term after ``epoch // R`` refreshes of ``R = 5 %`` of the epochs."""
    every = max(1, round(DYNACL_REFRESH * epochs))
    return min(1.0 + (epoch // every) * (every / epochs) * DYNACL_SWAP, 2.0)


def acl_ds_step(
    model: nn.Module, threat: ThreatModel, x0: Tensor, x1: Tensor, config: PretrainConfig, epoch: int
) -> tuple[Tensor, float]:
    """ACL (dual BN, both views attacked, clean + adversarial NT-Xent); DynACL's weights for ``dynacl``."""
    n = x0.shape[0]
    target = model.ema if config.ema else model  # DynACL: view 1 through the momentum encoder, attack and loss

    def embed(v0: Tensor, v1: Tensor) -> tuple[Tensor, Tensor]:
        return model(v0), target(v1)

    def objective(v: Tensor) -> Tensor:
        return model.loss_from_embeddings((v[:n], v[n:]), embed(v[:n], v[n:])).expand(2 * n)

    with adversarial_batch_norm(model), preserved_state(model, eval_mode=True):  # the authors attack in eval mode
        x = torch.cat([x0, x1])
        adv = projected_gradient_ascent(objective, x, threat, steps=config.acl_steps, step_size=threat.epsilon / 4)
    clean = model.loss_from_embeddings((x0, x1), embed(x0, x1))
    with adversarial_batch_norm(model):
        robust = model.loss_from_embeddings((adv[:n], adv[n:]), embed(adv[:n], adv[n:]))
    if config.ema:
        momentum_update(model)  # after the forwards, before the optimizer's step, as train_DynACL.py does
    w = dynacl_weight(epoch, config.epochs) if config.variant == "dynacl" else 1.0
    return ((2 - w) * clean + w * robust) / 2, 0.0
