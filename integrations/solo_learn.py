"""One-line robustness for solo-learn methods (SimCLR, BYOL, MoCo v3, VICReg, DINO, ...).

solo-learn's methods subclass ``solo.methods.base.BaseMethod``: the encoder is
``self.backbone``, batches are ``[indexes, [views...], targets]`` with the large
crops first, and ``training_step`` returns the loss. Add a block to the hydra
config and one line to ``main_pretrain.py``::

    # config.yaml
    robust_reg:
      epsilon: 0.0314   # 8/255, pixel units
      # weight: 1.0     # default: the method's (robust_reg.METHOD_SETTINGS; BYOL 0.05)
      # steps: 3        # 0.2's PGD-3; default: one noisy N-FGSM step

    # main_pretrain.py, after `model = METHODS[cfg.method](cfg)`
    from robust_reg.integrations.solo_learn import robustify
    robustify(model, cfg=cfg)

By default the regulariser works on the embedding the method's loss compares
(the entry of ``forward``'s output dict named in ``EMBEDDING_KEYS``,
L2-normalised), and the deviation-maximising embedding replaces the clean one
in the loss (the adversarial view, no extra forward). The search moves the
perturbed crop's embedding away from the other large crop's clean one
(``ascent: positive``), which solo-learn computes in the same step. ``encoder: backbone``
regularises the backbone features instead (the paper's form).

The views arrive normalised with the mean/std solo-learn uses for
``cfg.data.dataset`` (or the augmentation config's own ``mean``/``std``); the
adapter reads them from solo-learn's own transform pipeline, so ``epsilon``
stays in pixel units. solo-learn is imported only when a method is robustified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from robust_reg import ThreatModel, method_settings
from robust_reg.methods import METHOD_SETTINGS

from ._wrap import (
    REGULARIZER_KEYS,
    UNSET,
    AdapterConfig,
    collapse_callback,
    resolve_threat,
    robust_step,
    robustify_module,
)

if TYPE_CHECKING:
    from pytorch_lightning import Callback

__all__ = [
    "robustify",
    "is_robustified",
    "collapse_monitor",
    "solo_normalization",
    "threat_from_config",
    "EMBEDDING_KEYS",
]

# solo-learn 1.0.6's method classes that robust_reg knows (read from their ``training_step``s).
_SOLO_METHODS = (
    "SimCLR",
    "BYOL",
    "MoCoV3",
    "MoCoV2Plus",
    "VICReg",
    "VIbCReg",
    "BarlowTwins",
    "DINO",
    "SimSiam",
    "NNBYOL",
    "ReSSL",
    "WMSE",
)
#: The entry of each method's ``forward`` output that its SSL loss compares, from
#: ``robust_reg.METHOD_SETTINGS``. A method not listed (or a subclass that changes what its loss
#: compares) needs ``key=``.
EMBEDDING_KEYS = {name: METHOD_SETTINGS[name.lower()].solo_key for name in _SOLO_METHODS}

_ADAPTER_KEYS = (
    "weight",
    "encoder",
    "key",
    "adversarial_view",
    "log",
    "mean",
    "std",
    "normalize",
    "enabled",
    "warm_start",
    "epsilon_ramp",
)
# view / positive_view / index / geometry are callables: keyword arguments only, not config keys.
_OPTION_KEYS = (*REGULARIZER_KEYS, *_ADAPTER_KEYS)


def _config_block(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    found: Any = cfg.get("robust_reg", None) if hasattr(cfg, "get") else None
    if found is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(found):
            found = OmegaConf.to_container(found, resolve=True)
    except ImportError:  # a plain mapping
        pass
    if not isinstance(found, Mapping):
        raise ValueError(f"the robust_reg config block must be a mapping of options, got {type(found).__name__}")
    block: dict[str, Any] = dict(found)
    unknown = set(block) - set(_OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) in the robust_reg config block: {', '.join(sorted(unknown))}")
    return block


def threat_from_config(
    cfg: Any,
    *,
    epsilon: float | None = None,
    norm: str | None = None,
    bounds: tuple[float, float] | None = None,
) -> ThreatModel:
    """The ball of a solo-learn pretraining config.

    ``epsilon``, ``norm`` and ``bounds`` come from the arguments, else from the
    config's ``robust_reg`` block, else 8/255, ``"linf"``, ``(0, 1)``. The
    normalisation is what solo-learn's own ``build_transform_pipeline`` applies
    for ``cfg.data.dataset`` and ``cfg.augmentations[0]`` (solo-learn must be
    importable).

    Raises:
        ValueError: If ``cfg`` has no ``data.dataset`` or ``augmentations``.
    """
    block = getattr(cfg, "robust_reg", None) or {}
    get = block.get if hasattr(block, "get") else (lambda k, d=None: getattr(block, k, d))
    try:
        dataset = cfg.data.dataset
        augmentation = cfg.augmentations[0]
    except (AttributeError, KeyError, IndexError, TypeError) as err:
        raise ValueError(
            "cfg must be a solo-learn pretrain config with data.dataset and augmentations to tell the input "
            f"normalisation ({err}); or build ThreatModel(epsilon, mean=..., std=...) directly"
        ) from err
    from solo.data.pretrain_dataloader import build_transform_pipeline

    return ThreatModel.from_transform(
        build_transform_pipeline(dataset, augmentation),
        epsilon if epsilon is not None else get("epsilon", 8 / 255),
        norm=norm if norm is not None else get("norm", "linf"),
        bounds=tuple(bounds if bounds is not None else get("bounds", (0.0, 1.0))),
    )


def solo_normalization(cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) solo-learn's transform pipeline applies for this config (``None``: no normalisation).

    Read through ``threat_from_config``, so it follows whatever solo-learn does.
    """
    threat = threat_from_config(cfg, epsilon=0.0)
    if threat.mean is None or threat.std is None:
        return None
    return tuple(threat.mean), tuple(threat.std)


def robustify(
    method: nn.Module,
    *,
    cfg: Any = None,
    view: Callable[[Any], Tensor] | None = None,
    positive_view: Callable[[Any], Tensor] | None = None,
    index: Callable[[Any], Tensor] | None = None,
    geometry: Callable[[Any], Any] | None = None,
    epsilon: float | object = UNSET,
    weight: float | object = UNSET,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    normalize: Mapping[str, Sequence[float]] | None | object = UNSET,
    **options: Any,
) -> nn.Module:
    """Add the robustness regulariser to every training step of a solo-learn method.

    Settings come from the ``robust_reg`` block of ``cfg`` (default: the
    method's own ``cfg``), overridden by keyword arguments. The keys are those
    of ``robust_reg.integrations.lightly.robustify``: ``epsilon``,
    ``weight``, ``norm``, ``inner`` (default ``n-fgsm``, one noisy step; ``pgd``: 0.2's three), ``steps``,
    ``step_size``, ``random_start``,
    ``relative``, ``bounds``, ``form``, ``normalize_features``, ``ascent``, ``encoder``, ``key``,
    ``adversarial_view``, ``log``, ``warm_start``, ``epsilon_ramp`` (as in the
    lightly adapter: a share of ``max_epochs`` over which eps grows), and ``mean``/``std``/``normalize`` to
    override the normalisation; plus ``enabled: false`` to leave the method as
    it is.

    ``warm_start: true`` starts each sample's ascent where it ended the last time
    the sample was drawn (ATTA; ``PerturbationMemory``), read
    by the batch's ``indexes`` (``batch[0]``), so it needs no other change. The
    memory holds one large-crop-sized tensor per training sample on the views'
    device (CIFAR-10 at 32x32: 0.6 GB); pass ``warm_start=PerturbationMemory(...,
    device="cpu", dtype=torch.float16)`` to keep it elsewhere. Checkpoints carry
    it beside the ``state_dict`` (key ``"robust_reg_warm_start"``), and a run
    resumed from one restores it. The measured form (docs: Warm start) is
    SimCLR with ``steps: 2``, ``step_size: eps / 2``, ``detach_anchor: true`` and
    ``epsilon_ramp: 0.3``; it gained nothing for BYOL.

    Default (recommended): ``encoder: forward`` with the method's embedding key
    from ``EMBEDDING_KEYS`` (SimCLR ``z``, BYOL ``p``, MoCo v3 ``q``, ...),
    normalised, ``ascent: positive``, with the adversarial view; ``encoder: backbone`` for the
    backbone form. With ``ascent: positive`` the two large crops ``batch[1][0]``
    and ``batch[1][1]`` are watched: the first the method encodes gives the
    positive, the second is perturbed (solo-learn encodes them in order, so
    ``batch[1][1]``); otherwise the perturbed view is ``batch[1][0]``. The clean
    outputs solo-learn computed are reused. No parameter, buffer
    or submodule is added, so checkpoints load with
    ``solo.methods.<Method>.load_from_checkpoint``.

    Args:
        method: A solo-learn method instance (a ``BaseMethod`` subclass).
        cfg: The hydra config (default ``method.cfg``).
        view: ``callable(batch) -> Tensor`` for another view than ``batch[1][0]``.
        positive_view: With ``ascent: positive``, the other view (default
            ``batch[1][1]`` when ``view`` is not given; required when it is).
        index: With ``warm_start``: ``callable(batch) -> Tensor``, each sample's
            index in the training set (default ``batch[0]``, solo-learn's ``indexes``).
        geometry: With ``warm_start`` (optional): ``callable(batch)`` returning the
            two large crops' boxes as ``crop_geometry`` builds them
            (the view's and the positive view's), so the memory moves each
            perturbation with the crop. solo-learn's own pipelines do not report
            their crops; a dataset of yours that does can pass them here.
        epsilon: Radius of the threat ball, a fraction of the pixel range (default 8/255).
        weight: Multiplier of the regulariser (default: the method's from
            ``robust_reg.METHOD_SETTINGS``, BYOL 0.05, others 1.0).
        mean: Per-channel mean of the inputs (default: solo-learn's, for the dataset).
        std: Per-channel std of the inputs.
        normalize: ``None`` for raw ``[0, 1]`` inputs, or ``{"mean": ..., "std": ...}``.
        **options: Further keys as listed above.

    Returns:
        The same method instance.

    Raises:
        ValueError: For unknown keys in the config block, bad options, a
            config from which the normalisation cannot be read, or a method
            without a known embedding key (pass ``key=`` or ``encoder="backbone"``).
        RuntimeError: If the method is already robustified.
    """
    if cfg is None:
        cfg = getattr(method, "cfg", None)
    explicit = {"epsilon": epsilon, "weight": weight, "normalize": normalize, **options}
    if mean is not None or std is not None:
        explicit.update(mean=mean, std=std)
    settings = _settings(cfg, explicit)
    if not settings.pop("enabled", True):
        return method
    _check_solo_method(method)
    adapter = {name: settings.pop(name) for name in _ADAPTER_KEYS if name in settings and name != "enabled"}
    normalize, mean, std = adapter.pop("normalize", UNSET), adapter.pop("mean", None), adapter.pop("std", None)
    # What is left are the regulariser's keys; epsilon, norm and bounds go to the threat model.
    threat = resolve_threat(
        settings,
        normalize=normalize,
        mean=mean,
        std=std,
        default=lambda eps, norm, bounds: threat_from_config(cfg, epsilon=eps, norm=norm, bounds=bounds),
    )
    if adapter.get("encoder", "forward") == "forward" and adapter.get("key") is None:
        adapter["key"] = _embedding_key(method)
    adapter.setdefault("weight", _recommended_weight(method))
    config = AdapterConfig(
        framework="solo-learn",
        threat=threat,
        view=view,
        positive_view=positive_view,
        views_field=1,  # solo-learn: [indexes, [crops...], targets], large crops first
        regularizer_options=settings,
        index=index,
        default_index=(_solo_indexes, "batch[0]"),
        geometry=geometry,
        **adapter,
    )
    return robustify_module(method, config)


def _settings(cfg: Any, explicit: dict[str, Any]) -> dict[str, Any]:
    """The config block's settings, overridden by the keyword arguments given (``UNSET`` ones are not)."""
    unknown = set(explicit) - set(_OPTION_KEYS)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    settings = _config_block(cfg)
    settings.update({k: v for k, v in explicit.items() if v is not UNSET})
    return settings


def _solo_indexes(batch: Any) -> Tensor:
    """solo-learn's batches open with each sample's index in the dataset (a picklable getter)."""
    return batch[0]


def _solo_class(method: nn.Module) -> type | None:
    """The solo-learn method class ``method`` is (or derives from), if robust_reg knows it."""
    return next(
        (c for c in type(method).__mro__ if c.__name__ in EMBEDDING_KEYS and c.__module__.startswith("solo.")), None
    )


def _recommended_weight(method: nn.Module) -> float:
    """The method's weight from ``robust_reg.METHOD_SETTINGS`` (1.0 for a method not in it)."""
    settings = None if (cls := _solo_class(method)) is None else method_settings(cls)
    return 1.0 if settings is None else settings.weight


def _embedding_key(method: nn.Module) -> str:
    cls = _solo_class(method)
    if cls is not None:
        return EMBEDDING_KEYS[cls.__name__]
    raise ValueError(
        f"robust_reg does not know which entry of {type(method).__name__}.forward's output its loss compares; pass "
        "key='<entry>' (e.g. 'z' or 'p') to regularise that embedding, or encoder='backbone' for the backbone form"
    )


def _check_solo_method(method: Any) -> None:
    try:
        from solo.methods.base import BaseMethod
    except ImportError as err:
        raise ImportError(
            "robust_reg.integrations.solo_learn needs solo-learn (>= 1.0.6), installed from its repository "
            "(PyPI's solo-learn is a 2021 release that does not import on current torch)"
        ) from err
    if not isinstance(method, BaseMethod):
        raise TypeError(
            f"method must be a solo-learn method (a solo.methods.base.BaseMethod), got {type(method).__name__}"
        )


def is_robustified(method: nn.Module) -> bool:
    """Whether ``robustify`` has been applied to ``method``."""
    return robust_step(method) is not None


def collapse_monitor(images: Tensor, **monitor_options: Any) -> Callback:
    """A Lightning callback that watches a robustified module for catastrophic overfitting.

    After every training epoch it runs ``robust_reg.CollapseMonitor``: the regulariser ``robustify`` installed
    re-attacks ``images`` through what it perturbs (its own ascent, and ten smaller steps in the eps-ball),
    logs both findings (``collapse/training_attack``, ``collapse/strong_attack``; estimates from below), keeps
    them in the callback's ``history`` and warns once when the stronger attack finds more than ``tolerance``
    times the training one. The module's state, flags and the random state are left as they were.

    Args:
        images: A small fixed batch (e.g. 128 training images without augmentation), prepared as the views are
            (normalised as solo-learn's views are); at least 2.
        **monitor_options: ``strong_steps``, ``tolerance``, ``floor`` of ``CollapseMonitor``.

    Returns:
        A ``lightning.pytorch.Callback``, solo-learn's trainer's (``pytorch_lightning``'s if that is what is
        installed).

    Raises:
        TypeError: ``images`` is not a floating-point tensor; an unknown option.
        ValueError: fewer than 2 images or a bad option; at the first epoch's end, a module that
            ``robustify`` was not applied to, or images outside the regulariser's ball's range.

    Examples:
        >>> import torch
        >>> callback = collapse_monitor(torch.rand(128, 3, 32, 32))
        >>> type(callback).__name__, callback.history
        ('WatchCollapse', [])
        >>> # trainer = lightning.Trainer(max_epochs=100, callbacks=[callback])
    """
    return collapse_callback(images, unified_first=True, **monitor_options)  # solo-learn trains with `lightning`
