"""One-line robustness for LightningModules written the lightly way.

lightly ships losses, heads and transforms; its users write their own
LightningModule (``self.backbone``, the views in ``batch[0]``, a
``training_step`` returning the loss; see lightly's
``examples/pytorch_lightning/simclr.py``). ``robustify`` adds the
``RobustnessRegularizer`` to every training step's loss
without touching that ``training_step``::

    model = SimCLR()                                  # your module, unchanged
    robustify(model, epsilon=8 / 255)                 # the one added line
    trainer.fit(model, dataloader)

By default the regulariser works on what the SSL loss compares: the module's
``forward`` output (the projection for SimCLR, the prediction for BYOL),
L2-normalised, searched with ``ascent="positive"`` (away from the other view's
clean embedding, which the step computes anyway), and the perturbed embedding
replaces the clean one in the loss (the adversarial view, at no extra forward).
``encoder="backbone"`` regularises the backbone features instead (the quantity
of the bound).

A plain PyTorch loop needs no adapter:

    reg = RobustnessRegularizer(epsilon=8 / 255)
    z0, z1 = model(x0), model(x1)
    out = reg(model, x1, features=z1, positive=z0)
    loss = criterion(z0, out.adversarial_features) + weight * out.loss
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from robust_reg import PerturbationMemory, ThreatModel, method_settings
from robust_reg.augmentation import augmentation_strength

from ._wrap import (
    UNSET,
    AdapterConfig,
    collapse_callback,
    lightning_callback,
    resolve_threat,
    robust_step,
    robustify_module,
)

if TYPE_CHECKING:
    from pytorch_lightning import Callback

__all__ = ["robustify", "is_robustified", "annealed_augmentation", "collapse_monitor"]


def _lightly_default(epsilon: float, norm: str, bounds: tuple[float, float]) -> ThreatModel:
    """Inputs normalised with lightly's ``IMAGENET_NORMALIZE``, which its transforms apply by default."""
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    return ThreatModel(epsilon, norm=norm, bounds=bounds, **IMAGENET_NORMALIZE)


def robustify(
    module: nn.Module,
    *,
    epsilon: float = 8 / 255,
    weight: float | None = None,
    encoder: str = "forward",
    key: str | int | None = None,
    view: Callable[[Any], Tensor] | None = None,
    positive_view: Callable[[Any], Tensor] | None = None,
    normalize: Mapping[str, Sequence[float]] | None = UNSET,
    transform: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    adversarial_view: bool | None = None,
    log: bool = True,
    warm_start: bool | PerturbationMemory = False,
    index: Callable[[Any], Tensor] | None = None,
    epsilon_ramp: float = 0.0,
    geometry: Callable[[Any], Any] | None = None,
    **regularizer_options: Any,
) -> nn.Module:
    """Add the robustness regulariser to every training step of a lightly-style LightningModule.

    The module's ``training_step`` runs unchanged; its returned loss (a tensor,
    or a dict's ``"loss"``) gets ``weight * RobustnessRegularizer(...)(encoder, x)``
    added, where ``x`` is the view to perturb. For the duration of the step the
    encoder's ``forward`` is overridden on the instance: its call on ``x``
    returns the step's own clean output (reused, not recomputed) and runs the
    regulariser from it; with the adversarial view, the deviation-maximising
    output is returned in its place, so the SSL loss sees it without an extra
    forward. Other views and momentum branches are untouched, and BatchNorm
    running statistics are updated by the clean forwards only. The value, raw
    deviation, distance and spread are logged under ``robust_reg/``.

    Recommended (the default): ``encoder="forward"``, the embedding the SSL loss
    compares, with the regulariser's default form (normalised, ``ascent="positive"``)
    and ``adversarial_view=True``. With ``ascent="positive"`` the adapter watches
    the two views ``batch[0][0]`` and ``batch[0][1]``: the first the step
    encodes gives the positive (its clean embedding), the second is perturbed
    away from it (how it compares with adversarial contrastive training: docs,
    Results). For BYOL ``weight=0.05``: its adversarial view carries the robustness and a
    larger weight costs clean accuracy. The backbone form (``encoder="backbone"``) is the paper's: it
    lowers the quantity the bound of ``estimate_bound`` uses.

    The module is changed in place and returned. No parameter, buffer or
    submodule is added: ``state_dict()`` keeps exactly its keys, and checkpoints
    load into the unmodified class.

    Args:
        module: The LightningModule instance (any ``nn.Module`` with ``training_step``).
        epsilon: Radius of the threat ball, a fraction of the pixel range (``8 / 255``).
        weight: Multiplier of the regulariser in the loss. ``None`` (default): the
            method's from ``robust_reg.METHOD_SETTINGS``, found by the module's
            class name (``BYOL`` -> 0.05, ``SimCLR`` -> 1.0), else 1.0.
        encoder: ``"forward"`` (default): the module's own forward, whose output
            is the embedding the SSL loss compares (lightly's examples return the
            projection or prediction there). Otherwise the dotted path of a
            submodule, e.g. ``"backbone"`` or ``"model.backbone"``.
        key: If the encoder returns a dict, tuple or list: the entry holding the
            embedding (e.g. ``"z"`` or ``0``). ``None``: the output is the tensor.
        view: ``callable(batch) -> Tensor`` returning the view to perturb.
            Default: the first view of ``batch[0]`` (with ``ascent="positive"``:
            one of the two views, see above).
        positive_view: With ``ascent="positive"``: ``callable(batch) -> Tensor``
            returning the other view. Default: ``batch[0][1]`` when ``view`` is
            not given; required when it is.
        normalize: Normalisation applied to the views, as lightly describes it
            (``{"mean": [...], "std": [...]}``). Default: lightly's
            ``IMAGENET_NORMALIZE``, which every lightly transform applies unless
            told otherwise. ``None``: raw ``[0, 1]`` inputs.
        transform: Alternatively, the lightly/torchvision transform used; its
            ``Normalize`` (if any) is read.
        mean: Alternatively, the per-channel mean directly (with ``std``).
        std: Per-channel std (with ``mean``).
        adversarial_view: Return the encoder's output on the deviation-maximising
            input in place of its clean output on the perturbed view, so the SSL loss
            trains on it. Default: on for ``encoder="forward"``, off otherwise.
        log: Log the regulariser's statistics through ``self.log``.
        warm_start: Start each sample's ascent where it ended the last time the
            sample was drawn (ATTA; ``PerturbationMemory``):
            ``True`` keeps a new memory on the views' device, or pass your own
            (e.g. ``PerturbationMemory(len(dataset), device="cpu")``). Needs
            ``index`` and a multi-step ascent (``steps=``; N-FGSM, the default, starts
            from fresh noise and is refused with it). The measured form (docs: Warm start) is SimCLR with
            ``steps=2``, ``step_size=epsilon / 2``, ``detach_anchor=True`` and
            ``epsilon_ramp=0.3``; it gained nothing for BYOL.
            Memory: one view-sized tensor per training sample. Lightning
            checkpoints carry it beside the ``state_dict`` (key
            ``"robust_reg_warm_start"``) and a run resumed with ``ckpt_path=``
            restores it; the module's own checkpoint hooks still run.
        index: With ``warm_start``: ``callable(batch) -> Tensor``, each sample's
            index in the training set, a 1-D integer tensor (lightly's datasets do
            not yield it: return it from your dataset, e.g. as a third field).
        geometry: With ``warm_start`` (optional): ``callable(batch)`` returning
            each view's crops as ``crop_geometry`` builds them from
            the boxes your crop transform drew: a pair of ``(N, 2, 3)`` tensors,
            the view's and the positive view's (one tensor without a positive).
            The memory then keeps each perturbation in image coordinates and moves
            it with the next crop, the stronger form measured (docs: Warm start). Without it the
            memory keeps the perturbation as the view saw it.
        epsilon_ramp: Share of the epochs (of the Trainer's ``max_epochs``) over
            which eps grows linearly to ``epsilon``: epoch ``e`` of the first
            ``r = round(epsilon_ramp * max_epochs)`` trains at ``epsilon * (e + 1) / (r + 1)``.
            0 (default): constant. 0.3 is part of the measured warm-start form.
        **regularizer_options: ``norm``, ``inner`` (default ``"n-fgsm"``, one noisy step; ``"pgd"``: 0.2's
            three projected steps, also chosen by ``steps``/``step_size``), ``steps``, ``step_size``,
            ``random_start``, ``relative``, ``bounds``, ``form`` (default: ``"embedding"`` for
            ``encoder="forward"``, ``"backbone"`` for a submodule), ``normalize_features``, ``ascent``,
            ...: as in ``RobustnessRegularizer``.

    Returns:
        The same module.

    Raises:
        AttributeError: If the module has no ``encoder`` submodule.
        RuntimeError: If the module is already robustified.
        ValueError: For bad regulariser options, several normalisation sources,
            ``ascent="positive"`` with ``view`` but no ``positive_view``, or
            ``warm_start`` without ``index`` (or ``index`` or ``geometry`` without
            it). At a training step, a batch the adapter cannot read, or indices
            or crops that do not fit the view.

    Examples:
        >>> import pytorch_lightning as pl
        >>> import torch
        >>> from torch import nn
        >>> from lightly.loss import NTXentLoss
        >>> from lightly.models.modules import SimCLRProjectionHead
        >>> class SimCLR(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        ...         self.projection_head = SimCLRProjectionHead(8, 16, 8)
        ...         self.criterion = NTXentLoss()
        ...     def forward(self, x):
        ...         return self.projection_head(self.backbone(x).flatten(start_dim=1))
        ...     def training_step(self, batch, batch_index):
        ...         (x0, x1), _ = batch
        ...         return self.criterion(self.forward(x0), self.forward(x1))
        >>> model = robustify(SimCLR(), epsilon=8 / 255, weight=1.0, normalize=None)
        >>> views = [torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)]
        >>> loss = model.training_step((views, torch.zeros(4)), 0)
        >>> loss.backward()
        >>> is_robustified(model)
        True
    """
    options = {"epsilon": epsilon, **regularizer_options}
    assumed = normalize is UNSET and transform is None and mean is None and std is None
    threat = resolve_threat(
        options, normalize=normalize, transform=transform, mean=mean, std=std, default=_lightly_default
    )
    if weight is None:
        settings = method_settings(module) if isinstance(module, nn.Module) else None
        weight = 1.0 if settings is None else settings.weight
    config = AdapterConfig(
        framework="lightly",
        threat=threat,
        encoder=encoder,
        key=key,
        view=view,
        positive_view=positive_view,
        views_field=0,  # lightly: (views, targets, filenames)
        weight=weight,
        adversarial_view=adversarial_view,
        log=log,
        regularizer_options=options,
        warm_start=warm_start,
        index=index,
        epsilon_ramp=epsilon_ramp,
        geometry=geometry,
        assumed_normalization="lightly's default IMAGENET_NORMALIZE" if assumed else None,
    )
    return robustify_module(module, config)


def is_robustified(module: nn.Module) -> bool:
    """Whether ``robustify`` has been applied to ``module``."""
    return robust_step(module) is not None


def annealed_augmentation(
    set_strength: Callable[[float], Any], *, refresh: float = 0.05, final: float = 0.0
) -> Callback:
    """A Lightning callback that anneals the augmentation from strong to weak (DynACL's schedule).

    At the start of every training epoch it calls ``set_strength(s)`` with
    ``robust_reg.augmentation.augmentation_strength`` of that epoch and the
    trainer's ``max_epochs``; ``set_strength`` rebuilds the views' transform at
    that strength (lightly's transforms are built once, so the callback cannot
    scale them itself). DataLoader workers must not be persistent, so that each
    epoch's workers see the new transform.

    Args:
        set_strength: Called with the strength in ``(final, 1]`` once per epoch.
        refresh: The fraction of the run between two changes of strength.
        final: The strength the schedule falls towards.

    Returns:
        A ``pytorch_lightning.Callback`` (``lightning.pytorch`` if that is what is installed).

    Raises:
        ValueError: At the first epoch, if the trainer has no ``max_epochs``.

    Examples:
        >>> from lightly.transforms import SimCLRTransform
        >>> def set_strength(s):  # doctest: +SKIP
        ...     dataset.transform = SimCLRTransform(
        ...         input_size=32, cj_strength=0.5 * s, cj_prob=0.8 * s, random_gray_scale=0.2 * s,
        ...         min_scale=1 - 0.92 * s)
        >>> callback = annealed_augmentation(print)
        >>> type(callback).__name__
        'AnnealedAugmentation'
    """
    if not callable(set_strength):
        raise TypeError(f"set_strength must be callable, got {type(set_strength).__name__}")
    augmentation_strength(0, 1, refresh=refresh, final=final)  # checks refresh and final before training
    Callback = lightning_callback(unified_first=False)

    class AnnealedAugmentation(Callback):  # type: ignore[misc, valid-type]
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            epochs = trainer.max_epochs
            if not isinstance(epochs, int) or epochs < 1:
                raise ValueError(f"annealed_augmentation needs Trainer(max_epochs=N), got max_epochs={epochs!r}")
            set_strength(augmentation_strength(trainer.current_epoch, epochs, refresh=refresh, final=final))

    return AnnealedAugmentation()


def collapse_monitor(images: Tensor, **monitor_options: Any) -> Callback:
    """A Lightning callback that watches a robustified module for catastrophic overfitting.

    After every training epoch it runs ``robust_reg.CollapseMonitor``: the regulariser ``robustify`` installed
    re-attacks ``images`` through what it perturbs (its own ascent, and ten smaller steps in the eps-ball),
    logs both findings (``collapse/training_attack``, ``collapse/strong_attack``; estimates from below), keeps
    them in the callback's ``history`` and warns once when the stronger attack finds more than ``tolerance``
    times the training one. The module's state, flags and the random state are left as they were.

    Args:
        images: A small fixed batch (e.g. 128 training images without augmentation), prepared as the views are
            (normalised with the transform's mean/std); at least 2.
        **monitor_options: ``strong_steps``, ``tolerance``, ``floor`` of ``CollapseMonitor``.

    Returns:
        A ``pytorch_lightning.Callback`` (``lightning.pytorch`` if that is what is installed).

    Raises:
        TypeError: ``images`` is not a floating-point tensor; an unknown option.
        ValueError: fewer than 2 images or a bad option; at the first epoch's end, a module that
            ``robustify`` was not applied to, or images outside the regulariser's ball's range.

    Examples:
        >>> import torch
        >>> callback = collapse_monitor(torch.rand(128, 3, 32, 32))
        >>> type(callback).__name__, callback.history
        ('WatchCollapse', [])
        >>> # trainer = pl.Trainer(max_epochs=100, callbacks=[callback])
    """
    return collapse_callback(images, **monitor_options)
