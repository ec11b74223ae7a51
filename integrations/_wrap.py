"""The machinery both adapters share: wrap a module's ``training_step`` in place.

The wrapper is an object stored on the instance (not a parameter, buffer or
submodule), so the ``state_dict`` keeps exactly the keys of the original class
and a checkpoint loads into the unmodified class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from robust_reg import (
    BackboneRobustnessRegularizer,
    PerturbationMemory,
    RobustnessRegularizer,
    ThreatModel,
    preserved_state,
    ramped_epsilon,
)
from robust_reg.attacks import _find_normalize
from robust_reg.regularizer import _RESEARCH

ViewGetter = Callable[[Any], Tensor]


def _view_at(batch: Any, *, field: int, index: int) -> Tensor:
    """``batch[field][index]``: the frameworks' default views (a partial of this pickles)."""
    views = batch[field]
    if not isinstance(views, (list, tuple)):
        raise TypeError(f"batch[{field}] should be the list of views, got {type(views).__name__}")
    return views[index]


def _default_views(
    view: ViewGetter | None, positive_view: ViewGetter | None, field: int
) -> tuple[ViewGetter, str, ViewGetter | None, str]:
    """The view getters and their descriptions: given ones, else ``batch[field][0]`` and ``[1]``
    (the positive's default only when ``view`` is not given either)."""
    positive_description = getattr(positive_view, "__name__", "positive_view(batch)")
    if view is not None:
        return view, getattr(view, "__name__", "view(batch)"), positive_view, positive_description
    if positive_view is None:
        positive_view, positive_description = functools.partial(_view_at, field=field, index=1), f"batch[{field}][1]"
    return functools.partial(_view_at, field=field, index=0), f"batch[{field}][0]", positive_view, positive_description


# The regulariser's own keywords, read from its signature, and bounds (the adapters build the ThreatModel from
# epsilon, norm, bounds and their normalisation, and hand it over as threat=).
REGULARIZER_KEYS = (
    *(
        name
        for name, parameter in inspect.signature(RobustnessRegularizer.__init__).parameters.items()
        if name not in ("self", "threat") and parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ),
    "bounds",
    *_RESEARCH,  # 0.2's options that lost their measurements: still forwarded (the regulariser warns) until 0.4
)


def resolve_attribute(module: nn.Module, path: str, what: str) -> nn.Module:
    """``module.<path>`` (dotted), with a clear error if it is missing or not a module."""
    obj: Any = module
    for part in path.split("."):
        if not hasattr(obj, part):
            available = sorted(n for n, _ in module.named_children())
            raise AttributeError(
                f"{type(module).__name__} has no attribute {path!r} to use as the {what}; "
                f"pass encoder='<attribute>' (its submodules are: {', '.join(available) or 'none'})"
            )
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        raise TypeError(
            f"{type(module).__name__}.{path} must be an nn.Module to use as the {what}, got {type(obj).__name__}"
        )
    return obj


#: "Not given" for adapter options whose ``None`` means something (``normalize=None``: raw pixels).
UNSET: Any = object()


def resolve_threat(
    options: dict[str, Any],
    *,
    normalize: Any = UNSET,
    transform: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    default: Callable[[float, str, tuple[float, float]], ThreatModel],
) -> ThreatModel:
    """The threat model of the views: ``epsilon``/``norm``/``bounds`` popped from ``options``, the
    normalisation from the one source given, else ``default(epsilon, norm, bounds)``.

    Sources: ``mean``/``std``; ``transform`` (``ThreatModel.from_transform``); ``normalize``
    (``None``: raw pixels, or ``{"mean": ..., "std": ...}`` as lightly writes it). Both adapters
    use this, with their framework's default.
    """
    given = [
        name
        for name, value in (("transform", transform), ("mean/std", mean if mean is not None else std))
        if value is not None
    ] + (["normalize"] if normalize is not UNSET else [])
    if len(given) > 1:
        raise ValueError(f"pass only one of normalize, transform or mean/std to describe the inputs, got {given}")
    epsilon = options.pop("epsilon", 8 / 255)
    norm = options.pop("norm", "linf")
    bounds = options.pop("bounds", (0.0, 1.0))
    if transform is not None:
        return ThreatModel.from_transform(transform, epsilon, norm=norm, bounds=bounds)
    if normalize is UNSET and mean is None and std is None:
        return default(epsilon, norm, bounds)
    if normalize is not UNSET and normalize is not None:
        if not isinstance(normalize, Mapping) or not {"mean", "std"} <= set(normalize):
            raise ValueError(f"normalize must be None or a dict with 'mean' and 'std', got {normalize!r}")
        mean, std = normalize["mean"], normalize["std"]
    return ThreatModel(epsilon, norm=norm, bounds=bounds, mean=mean, std=std)


_FORWARD = "forward"


class RobustTrainingStep:
    """Replaces a module's ``training_step``: runs the original, adds the regulariser.

    For the duration of the step, the forward of the *target* (the module itself
    for ``encoder="forward"``, else the submodule at the dotted path) is
    overridden on the instance. Its first call on the perturbed view returns the
    clean output as usual (capture: the step's own features are reused) and runs
    the regulariser from it; with the adversarial view it returns the
    regulariser's adversarial output in place of the clean one (substitute: no
    extra forward). Everything else the step computes is untouched: other views,
    momentum branches, BatchNorm running statistics (updated by the clean
    forwards only). With ``random_start=False``, the adversarial view and an
    output that is the embedding itself (no ``key``), the perturbed view's clean
    pass is the regulariser's first ascent forward instead of the step's own
    (one forward fewer; that view then does not update BatchNorm's running
    statistics, the other view's clean forward does).

    With ``ascent="positive"`` the step's two views (``view`` and
    ``positive_view``) are watched: the first of them the step encodes gives the
    positive (its clean output, detached), the second is the one perturbed. The
    positive is then computed by the step itself, whatever order it encodes the
    views in, and costs nothing.

    Stored as an instance attribute named ``training_step``; picklable (it holds
    the original *function*, looked up on the class, not a bound method).
    """

    def __init__(
        self,
        module: nn.Module,
        config: AdapterConfig,
        regularizer: RobustnessRegularizer,
        memory: PerturbationMemory | None,
    ) -> None:
        self.module = module
        self.config = config
        self.function = type(module).training_step  # type: ignore[attr-defined]  # checked by robustify_module
        self.encoder, self.key, self.framework = config.encoder, config.key, config.framework
        self.view, self.view_description, self.positive_view, self.positive_description = _default_views(
            config.view, config.positive_view, config.views_field
        )
        if regularizer.ascent != "positive":
            self.positive_view = None
        self.regularizer = regularizer
        self.weight, self.log, self.epsilon_ramp = config.weight, config.log, config.epsilon_ramp
        self.adversarial_view = config.embedding if config.adversarial_view is None else config.adversarial_view
        self.memory, self.geometry = memory, config.geometry
        self.index, self.index_description = config.index_getter()
        self.threat = regularizer.threat  # the full ball; with epsilon_ramp the regulariser's grows to it
        # Set when the inputs' normalisation was assumed, not given: checked against the first batch.
        self.assumed_normalization = config.assumed_normalization
        self._warned = False
        functools.update_wrapper(self, self.function)
        self.__signature__ = inspect.signature(self.function.__get__(module))

    def __repr__(self) -> str:
        owner = type(self.module).__name__
        where = f"encoder={self.encoder!r}" + (f", key={self.key!r}" if self.key is not None else "")
        return (
            f"<robust training_step ({self.framework}) of {owner}: {self.regularizer!r}, {where}, "
            f"weight={self.weight}, adversarial_view={self.adversarial_view}"
            + (f", warm_start={self.memory!r}" if self.memory is not None else "")
            + (", geometry=" + getattr(self.geometry, "__name__", "geometry(batch)") if self.geometry else "")
            + (f", epsilon_ramp={self.epsilon_ramp}" if self.epsilon_ramp else "")
            + ">"
        )

    def __call__(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if getattr(module, "automatic_optimization", True) is False:
            raise RuntimeError(
                f"{type(module).__name__} uses manual optimization, so the loss its training_step returns is not "
                "what gets optimised; call the RobustnessRegularizer inside your training_step instead"
            )
        target = resolve_target(module, self.encoder)
        if self.epsilon_ramp:
            self._ramp_epsilon(module)
        batch = self._in_the_steps_layout(module, batch)
        x = self._get_view(batch, self.view, self.view_description)
        other = None
        if self.positive_view is not None:
            other = self._get_view(batch, self.positive_view, self.positive_description)
            if other.shape != x.shape:
                raise ValueError(
                    f"robust_reg: the two views differ in shape: {self.view_description} {tuple(x.shape)}, "
                    f"{self.positive_description} {tuple(other.shape)}; pass view= and positive_view= to robustify()"
                )
        if self.assumed_normalization is not None:
            self._check_assumption(x)
        warm, crops = ({}, None) if self.memory is None else self._get_warm(batch, x, other)
        capture = _Capture(self, target, x, other, warm, crops)
        with capture.installed():
            output = self.function(module, batch, *args, **kwargs)
        if output is None:  # the user skipped this batch
            return None
        value = capture.value
        if value is None:
            value = self._own_forward(target, x, other, capture.warm_for(x))
        self._log(module, x.shape[0])
        return _add_to_loss(output, self.weight * value)

    def _in_the_steps_layout(self, module: nn.Module, batch: Any) -> Any:
        """solo-learn converts each view to channels-last inside its forward; converting the batch's views first
        makes that conversion return the very tensors read here, so the step's views are recognised by identity
        (no value comparison, no device synchronisation). Other batches are passed on as they are."""
        field = self.config.views_field
        if self.framework != "solo-learn" or getattr(module, "no_channel_last", True) is not False:
            return batch
        if not isinstance(batch, (list, tuple)) or len(batch) <= field or not isinstance(batch[field], (list, tuple)):
            return batch
        views = [
            v.to(memory_format=torch.channels_last) if isinstance(v, Tensor) and v.dim() == 4 else v
            for v in batch[field]
        ]
        return type(batch)([*batch[:field], type(batch[field])(views), *batch[field + 1 :]])

    def _check_assumption(self, x: Tensor) -> None:
        """The first batch against the assumed normalisation, before the user's step runs (then never again)."""
        threat, assumed = self.threat, self.assumed_normalization
        fix = (
            "pass normalize=None for raw [0, 1] pixels, or transform=<your transform> (or mean=/std=) to say how "
            "the views were normalised"
        )
        channels = len(threat.mean or threat.std or ())
        if x.dim() < 2 or (channels > 1 and x.shape[1] != channels):
            raise ValueError(
                f"robust_reg: the views have shape {tuple(x.shape)} but robustify() assumed {assumed} "
                f"({channels} channels in dimension 1); {fix}"
            )
        self._check_training_transform(fix)
        low, high = torch.aminmax(x.detach()) if x.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        if threat.normalized and float(low) >= 0 and float(high) <= 1:
            raise ValueError(
                f"robust_reg: the views look like raw pixels (values in [{float(low):.3g}, {float(high):.3g}]) but "
                f"robustify() assumed {assumed}, which would make the threat ball the wrong size; {fix}"
            )
        self.assumed_normalization = None

    def _check_training_transform(self, fix: str) -> None:
        """The transform of the trainer's training data, where it can be found, against the assumed normalisation:
        a lightly transform normalising otherwise (e.g. mean = std = 0.5) changes the ball's size in silence."""
        trainer = getattr(self.module, "_trainer", None)  # LightningModule.trainer raises when not attached
        try:
            loader = getattr(trainer, "train_dataloader", None)
        except Exception:  # noqa: BLE001 - a trainer without a loader yet: nothing to compare
            return
        transform = getattr(getattr(loader, "dataset", None), "transform", None)
        found = _find_normalize(transform)
        threat = self.threat
        if found is None or threat.std is None or threat.mean is None:
            return
        (mean, std), channels = found, max(len(threat.std), len(found[1]))
        spread = lambda v: list(v) * channels if len(v) == 1 else list(v)  # noqa: E731
        given, assumed = spread(mean) + spread(std), spread(threat.mean) + spread(threat.std)
        if all(abs(a - b) <= 1e-3 for a, b in zip(given, assumed)):
            return
        ratios = [s / t for s, t in zip(spread(std), spread(threat.std))]
        low, high = min(ratios) * threat.epsilon, max(ratios) * threat.epsilon
        raise ValueError(
            f"robust_reg: the training data's transform normalises with mean={tuple(mean)}, std={tuple(std)} but "
            f"robustify() assumed {self.assumed_normalization} (mean={threat.mean}, std={threat.std}): the ball "
            f"would be {255 * low:.1f}-{255 * high:.1f}/255 of the pixels instead of {255 * threat.epsilon:.1f}/255; "
            f"{fix}"
        )

    def _own_forward(self, target: nn.Module, x: Tensor, other: Tensor | None, warm: dict[str, Any]) -> Tensor:
        views = self.view_description if other is None else f"{self.view_description}, {self.positive_description}"
        if not self._warned:
            self._warned = True
            lost = " and the adversarial view cannot be fed to the loss" if self.adversarial_view else ""
            extra = "one extra forward" if other is None else "two extra forwards: the view and the positive"
            warnings.warn(
                f"robust_reg: the training_step never passed the views ({views}) through "
                f"{_describe(self.encoder)} unchanged, so their features cannot be reused{lost}; the regulariser "
                f"runs its own clean forward ({extra} per step)",
                stacklevel=3,
            )
        encoder = _Target(target, self.key)
        if other is None:
            return self.regularizer(encoder, x, positive=None, **warm).loss  # the backbone form, or 0.2's ascents
        with torch.no_grad(), preserved_state(target):  # the positive is a constant; BN statistics untouched
            positive = encoder(other)
        return self.regularizer(encoder, x, positive=positive, **warm).loss

    def pick(self, output: Any) -> Tensor:
        """The embedding inside ``output`` (the output itself, or its ``key`` entry)."""
        if self.key is None:
            if isinstance(output, Tensor):
                return output
            raise TypeError(
                f"robust_reg: {_describe(self.encoder)} returned a {type(output).__name__}, not a tensor; pass "
                "key=<the entry holding the embedding the SSL loss compares> to robustify()"
            )
        try:
            picked = output[self.key]
        except (KeyError, IndexError, TypeError) as err:
            raise KeyError(
                f"robust_reg: {_describe(self.encoder)} output has no entry {self.key!r} (key= of robustify)"
            ) from err
        if not isinstance(picked, Tensor):
            raise TypeError(f"robust_reg: entry {self.key!r} of the output is a {type(picked).__name__}, not a tensor")
        return picked

    def _get_view(self, batch: Any, getter: ViewGetter, description: str) -> Tensor:
        argument = "view" if getter is self.view else "positive_view"
        try:
            x = getter(batch)
        except (IndexError, KeyError, TypeError) as err:
            raise ValueError(
                f"robust_reg could not read the view ({description}) from a batch of type "
                f"{type(batch).__name__}: {err}. Pass {argument}=<callable(batch) -> Tensor> to robustify()"
            ) from err
        if not isinstance(x, Tensor) or x.dim() < 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"robust_reg expected the view ({description}) to be an image batch tensor (N, C, H, W), "
                f"got {got}. Pass {argument}=<callable(batch) -> Tensor> to robustify()"
            )
        return x

    def _ramp_epsilon(self, module: nn.Module) -> None:
        """Epoch ``e < r = round(epsilon_ramp * max_epochs)`` trains at ``epsilon * (e + 1) / (r + 1)``."""
        trainer = module.trainer if _has_trainer(module) else None
        max_epochs = getattr(trainer, "max_epochs", None)
        if trainer is None or max_epochs is None or max_epochs < 1:
            raise RuntimeError(
                "robust_reg: epsilon_ramp grows eps over a share of the epochs, so it needs the module attached to "
                "a Trainer with max_epochs set; pass epsilon_ramp=0 to train at a constant eps"
            )
        epoch = int(getattr(trainer, "current_epoch", 0))
        epsilon = ramped_epsilon(self.threat.epsilon, epoch, max_epochs, self.epsilon_ramp)
        if epsilon != self.regularizer.threat.epsilon:
            self.regularizer.threat = dataclasses.replace(self.threat, epsilon=epsilon)

    def _get_warm(
        self, batch: Any, x: Tensor, other: Tensor | None
    ) -> tuple[dict[str, Any], tuple[Tensor, ...] | None]:
        """The warm start's keywords (the memory and each sample's index in the training set) and, with
        ``geometry``, each view's crops (aligned with ``x`` and ``other``): read from the batch and checked
        against the view before the user's step runs."""
        memory, index = self.memory, self.index
        if memory is None or index is None:
            raise RuntimeError("robust_reg: a warm start needs its memory and index getter (checked by robustify)")
        warm = {"memory": memory, "index": self._read(batch, index, "index", self.index_description)}
        crops = None
        if self.geometry is not None:
            crops = self._read(batch, self.geometry, "geometry", "geometry(batch)")
            if isinstance(crops, Tensor) and other is None:
                crops = (crops,)
            elif other is not None and isinstance(crops, (tuple, list)) and len(crops) == 2:
                crops = tuple(crops)
            else:
                expected = "one tensor" if other is None else "two tensors, the view's and the positive view's"
                got = f"{len(crops)} entries" if isinstance(crops, (tuple, list)) else type(crops).__name__
                raise ValueError(f"robust_reg: geometry= of robustify must return {expected} of crops, got {got}")
        try:
            warm["index"] = memory.check(warm["index"], x, crops[0] if crops else None)
            for view_crops in (crops or ())[1:]:  # the other view's: the index is checked once
                memory.check_geometry(view_crops, x)
        except (TypeError, ValueError) as err:
            names = "index=" + (" or geometry=" if self.geometry is not None else "")
            raise type(err)(
                f"robust_reg: the sample indices ({self.index_description}) or crops ({names} of robustify) do not "
                f"fit the view {self.view_description}: {err}"
            ) from err
        return warm, crops

    @staticmethod
    def _read(batch: Any, getter: ViewGetter, name: str, description: str) -> Any:
        try:
            return getter(batch)
        except (IndexError, KeyError, TypeError) as err:
            what = "sample indices" if name == "index" else "crops"
            raise ValueError(
                f"robust_reg could not read the {what} ({description}) for warm_start from a batch of type "
                f"{type(batch).__name__}: {err}. Pass {name}=<callable(batch) -> Tensor> to robustify()"
            ) from err

    def _log(self, module: nn.Module, n: int) -> None:
        if not self.log or not _has_trainer(module):
            return
        stats = self.regularizer.last_stats
        if stats is None:
            return
        log = cast(Any, module).log  # LightningModule.log
        log("robust_reg/value", stats.value, batch_size=n)
        log("robust_reg/mean_squared_deviation", stats.mean_squared_deviation, batch_size=n)
        log("robust_reg/mean_deviation", stats.mean_deviation, batch_size=n)
        log("robust_reg/variance", stats.variance, batch_size=n)


class _Target(nn.Module):
    """``x -> embedding``: the target called as usual (its hooks run), and the entry the loss compares.

    An ``nn.Module`` holding the target, so the regulariser's no-side-effect guard
    covers the target's BatchNorm layers and flags.
    """

    def __init__(
        self, target: nn.Module, key: str | int | None, *rest: Any, pick: Callable[[Any], Tensor] | None = None
    ) -> None:
        super().__init__()
        self.target = target
        self._key, self._rest, self._pick = key, rest, pick

    def forward(self, x: Tensor) -> Tensor:
        output = self.target(x, *self._rest)
        if self._pick is not None:  # checks what it picks, with the adapter's error messages
            return self._pick(output)
        return output if self._key is None else output[self._key]


class _Capture:
    """The temporary ``forward`` of the target during one training step (see ``RobustTrainingStep``)."""

    def __init__(
        self,
        step: RobustTrainingStep,
        target: nn.Module,
        x: Tensor,
        other: Tensor | None,
        warm: dict[str, Any],
        crops: tuple[Tensor, ...] | None = None,
    ) -> None:
        self.step, self.target, self.x, self.other = step, target, x, other
        self.warm = warm  # memory= and index= for a warm-started ascent, else empty
        self.crops = crops  # with geometry: the crops of x (and of other), for whichever view is perturbed
        self.original = target.forward
        self.value: Tensor | None = None
        self.positive: Tensor | None = None  # ascent="positive": the clean output of the view encoded first
        self.waiting_for: Tensor | None = None  # ... and the view whose call is then perturbed
        self.busy = False  # the regulariser's own calls go straight to the original forward

    def warm_for(self, inputs: Tensor) -> dict[str, Any]:
        """The regulariser's ``start=`` for perturbing ``inputs`` (``x`` or ``other``): the memory at the batch's
        indices, with that view's own crops (empty without a warm start)."""
        if not self.warm:
            return {}
        geometry = None if self.crops is None else self.crops[0] if _same(inputs, self.x) else self.crops[1]
        return {"start": self.warm["memory"].at(self.warm["index"], geometry)}

    @contextlib.contextmanager
    def installed(self):
        had_own = _FORWARD in self.target.__dict__
        previous = self.target.__dict__.get(_FORWARD)
        object.__setattr__(self.target, _FORWARD, self)
        try:
            yield self
        finally:
            if had_own:
                object.__setattr__(self.target, _FORWARD, previous)
            else:
                del self.target.__dict__[_FORWARD]

    def __call__(self, inputs: Any, *rest: Any, **kwargs: Any) -> Any:
        if self.busy or self.value is not None or kwargs or not isinstance(inputs, Tensor):
            return self.original(inputs, *rest, **kwargs)
        if self.other is None:
            if not _same(inputs, self.x):
                return self.original(inputs, *rest)
        elif self.positive is None:  # the first of the two views: its clean output is the positive
            for first, second in ((self.x, self.other), (self.other, self.x)):
                if _same(inputs, first):
                    output = self.original(inputs, *rest)
                    self.positive, self.waiting_for = self.step.pick(output).detach(), second
                    return output
            return self.original(inputs, *rest)
        elif self.waiting_for is None or not _same(inputs, self.waiting_for):
            return self.original(inputs, *rest)
        step = self.step
        regularizer = step.regularizer
        own_pass = regularizer.anchor == "start" or not regularizer.random_start
        if step.adversarial_view and step.key is None and own_pass:
            # The output is the embedding and gets replaced: the regulariser's first ascent forward
            # (at the clean input, or at N-FGSM's noisy start with inner="n-fgsm-start") serves as the view's pass,
            # so the step's own is not run.
            self.busy = True
            try:
                result = regularizer(
                    _Target(self.target, None, *rest, pick=step.pick),
                    inputs,
                    positive=self.positive,
                    **self.warm_for(inputs),
                )
            finally:
                self.busy = False
            self.value = result.loss
            return result.adversarial_features
        output = self.original(inputs, *rest)  # the step's own clean forward: reused, not repeated
        encoder = _Target(self.target, step.key, *rest)
        features = step.pick(output)
        self.busy = True
        try:
            if not step.adversarial_view:
                warm = self.warm_for(inputs)
                self.value = regularizer(encoder, inputs, features=features, positive=self.positive, **warm).loss
                return output
            result = regularizer(
                encoder,
                inputs,
                features=features,
                positive=self.positive,
                **self.warm_for(inputs),
            )
        finally:
            self.busy = False
        self.value = result.loss
        # The clean output with the embedding swapped for the adversarial one (same graph: the SSL loss
        # backpropagates through it once); other entries (solo-learn's feats and logits) stay clean.
        return _replace(output, step.key, result.adversarial_features)


def _replace(output: Any, key: str | int | None, value: Tensor) -> Any:
    if key is None:
        return value
    if isinstance(output, Mapping):
        updated = dict(output)
        updated[key] = value
        return updated if isinstance(output, dict) else cast(Any, type(output))(updated)
    items = list(output)
    items[cast(int, key)] = value
    return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)


def resolve_target(module: nn.Module, path: str) -> nn.Module:
    """The module whose forward is captured: ``module`` itself for ``"forward"``, else the submodule at ``path``."""
    return module if path == _FORWARD else resolve_attribute(module, path, "encoder")


def _describe(encoder: str) -> str:
    return "the module's forward" if encoder == _FORWARD else repr(encoder)


def _has_trainer(module: nn.Module) -> bool:
    try:
        return getattr(module, "trainer", None) is not None
    except RuntimeError:  # Lightning raises when the module is not attached to a Trainer
        return False


def _same(a: Tensor, b: Tensor) -> bool:
    """The view itself: recognised by identity, never by value (two equal views stay two views)."""
    return a is b


def _add_to_loss(output: Any, term: Tensor) -> Any:
    if isinstance(output, Tensor):
        return output + term.to(output.dtype)
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        updated = dict(output)
        updated["loss"] = output["loss"] + term.to(output["loss"].dtype)
        return cast(Any, type(output))(updated) if not isinstance(output, dict) else updated
    raise TypeError(
        f"robust_reg can add the regulariser only to a training_step that returns a loss tensor or a dict with "
        f"'loss'; got {type(output).__name__}"
    )


def _callable_or_none(name: str, value: object, what: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable(batch) -> {what}, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The settings of one robustified module, validated once; both adapters build one.

    ``encoder="forward"`` (the embedding the SSL loss compares) gets the regulariser's recommended
    form and the adversarial view; a submodule path the paper's form (``BackboneRobustnessRegularizer``) and no
    adversarial view. ``view=None``: ``batch[views_field][0]`` (and ``positive_view``, read with
    ``ascent="positive"``, ``[1]``). ``warm_start``: ``True`` (a new
    ``PerturbationMemory``) or a memory, with ``index`` (or the framework's
    ``default_index``) reading each batch's sample indices, and optionally ``geometry`` each view's
    crops. ``assumed_normalization``: a description of the normalisation assumed (not given), checked
    against the first batch.
    """

    framework: str
    threat: ThreatModel
    encoder: str = _FORWARD
    key: str | int | None = None
    view: ViewGetter | None = None
    positive_view: ViewGetter | None = None
    views_field: int = 0
    weight: float = 1.0
    adversarial_view: bool | None = None
    log: bool = True
    regularizer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    warm_start: bool | PerturbationMemory = False
    index: ViewGetter | None = None
    default_index: tuple[ViewGetter, str] | None = None
    epsilon_ramp: float = 0.0
    geometry: ViewGetter | None = None
    assumed_normalization: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            raise TypeError(f"encoder must be 'forward' or the dotted path of a submodule, got {self.encoder!r}")
        if self.key is not None and (isinstance(self.key, bool) or not isinstance(self.key, (str, int))):
            raise TypeError(f"key must be None, a str or an int, got {type(self.key).__name__}")
        for name in ("view", "positive_view", "index"):
            _callable_or_none(name, getattr(self, name), "Tensor")
        _callable_or_none("geometry", self.geometry, "Tensor of crops")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
            raise ValueError(f"weight must be a finite number >= 0, got {w!r}")
        r = self.epsilon_ramp
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"epsilon_ramp must be a number in [0, 1) (a share of the epochs), got {r!r}")
        unknown = set(self.regularizer_options) - set(REGULARIZER_KEYS)
        if unknown:
            raise TypeError(f"unknown regulariser option(s): {', '.join(sorted(unknown))}")
        self._check_warm_start()

    def _check_warm_start(self) -> None:
        if self.warm_start is False or self.warm_start is None:
            for name in ("index", "geometry"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}= is read only with warm_start; pass warm_start=True too")
        elif not isinstance(self.warm_start, (bool, PerturbationMemory)):
            raise TypeError(f"warm_start must be a bool or a PerturbationMemory, got {type(self.warm_start).__name__}")
        elif self.index is None and self.default_index is None:
            raise ValueError(
                "warm_start needs index=<callable(batch) -> Tensor>: each sample's index in the training set, which "
                "the dataset must yield (e.g. a dataset returning (views, target, index) and index=lambda b: b[2])"
            )

    @property
    def embedding(self) -> bool:
        """Whether the encoder is the module's forward: the embedding the SSL loss compares."""
        return self.encoder == _FORWARD

    def regularizer(self) -> RobustnessRegularizer:
        """A new regulariser: the recommended form on the embedding, the paper's on a submodule."""
        form = RobustnessRegularizer if self.embedding else BackboneRobustnessRegularizer
        regularizer = form(threat=self.threat, **self.regularizer_options)
        if self.warm_start not in (False, None) and regularizer.inner == "n-fgsm":
            inner = self.regularizer_options.get("inner")
            given = f"inner={inner!r}" if inner else "N-FGSM (the default for this ball)"
            raise ValueError(
                f"warm_start carries a multi-step ascent's end point to the sample's next visit; {given} starts "
                "from fresh noise: drop warm_start, or pass a multi-step ascent, e.g. steps=2, step_size=epsilon / 2 "
                "(the measured warm-start form)"
            )
        adversarial_view = self.embedding if self.adversarial_view is None else self.adversarial_view
        if regularizer.anchor == "start" and (self.key is not None or not adversarial_view):
            raise ValueError(
                "inner='n-fgsm-start' replaces the perturbed view's clean forward with the regulariser's own pass; "
                + (
                    f"here the encoder's output holds more than the embedding (entry {self.key!r}), so that forward "
                    if self.key is not None
                    else "with adversarial_view=False the loss reads the clean output, so that forward "
                )
                + "runs anyway and the option would save nothing: pass inner='n-fgsm'"
            )
        if regularizer.ascent == "positive" and self.view is not None and self.positive_view is None:
            raise ValueError(
                "ascent='positive' perturbs one of two views and searches away from the other's embedding: with "
                "view= given, pass positive_view=<callable(batch) -> Tensor> (the other view) too, or choose "
                "ascent='instance'"
            )
        return regularizer

    def memory(self) -> PerturbationMemory | None:
        """The warm start's memory (a new one for ``warm_start=True``)."""
        if isinstance(self.warm_start, PerturbationMemory):
            return self.warm_start
        return PerturbationMemory() if self.warm_start else None

    def index_getter(self) -> tuple[ViewGetter | None, str]:
        """The sample-index getter and its description (``None`` without a warm start)."""
        if self.warm_start is False or self.warm_start is None:
            return None, ""
        if self.index is not None:
            return self.index, getattr(self.index, "__name__", "index(batch)")
        return self.default_index if self.default_index is not None else (None, "")


def robustify_module(module: nn.Module, config: AdapterConfig) -> nn.Module:
    """Validate the module against ``config``, build the regulariser, and install the wrapped ``training_step``
    (and, with a warm start, the checkpoint hooks that carry its memory)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module (a LightningModule), got {type(module).__name__}")
    if isinstance(module.__dict__.get("training_step"), RobustTrainingStep):
        raise RuntimeError(
            f"{type(module).__name__} is already robustified; robustify() it once (a second call would add the "
            "penalty twice)"
        )
    if not callable(getattr(type(module), "training_step", None)):
        raise TypeError(f"{type(module).__name__} has no training_step to add the regulariser to")
    resolve_target(module, config.encoder)
    memory = config.memory()
    object.__setattr__(module, "training_step", RobustTrainingStep(module, config, config.regularizer(), memory))
    if memory is not None:
        for hook in _CHECKPOINT_HOOKS:
            if callable(getattr(type(module), hook, None)):  # a LightningModule: checkpoints carry the memory
                object.__setattr__(module, hook, _MemoryCheckpointHook(module, hook, memory))
    return module


CHECKPOINT_KEY = "robust_reg_warm_start"
_CHECKPOINT_HOOKS = ("on_save_checkpoint", "on_load_checkpoint")


class _MemoryCheckpointHook:
    """A module's ``on_save_checkpoint``/``on_load_checkpoint``, run unchanged, plus the warm start's memory:
    saved under ``CHECKPOINT_KEY`` (outside the ``state_dict``, so the unmodified class still loads the
    checkpoint) and restored from it when a robustified module resumes."""

    def __init__(self, module: nn.Module, hook: str, memory: PerturbationMemory) -> None:
        self.module, self.hook, self.memory = module, hook, memory
        self.function = getattr(type(module), hook)

    def __call__(self, checkpoint: dict[str, Any]) -> Any:
        result = self.function(self.module, checkpoint)
        if self.hook == "on_save_checkpoint":
            checkpoint[CHECKPOINT_KEY] = self.memory.state_dict()
        elif CHECKPOINT_KEY in checkpoint:
            self.memory.load_state_dict(checkpoint[CHECKPOINT_KEY])
        return result


def robust_step(module: nn.Module) -> RobustTrainingStep | None:
    """The installed wrapper, or ``None`` if ``module`` is not robustified."""
    step = module.__dict__.get("training_step")
    return step if isinstance(step, RobustTrainingStep) else None


def collapse_callback(images: Tensor, *, unified_first: bool = False, **monitor_options: Any) -> Any:
    """A Lightning callback that runs a ``CollapseMonitor`` after every training epoch of a robustified module.

    The monitor is built at the first epoch's end from the regulariser ``robustify`` installed and attacks what
    that regulariser perturbs (the embedding the loss compares, or the encoder and key given to ``robustify``);
    ``images`` are in the space the views are (normalised as they are). Each check is logged as
    ``collapse/training_attack`` and ``collapse/strong_attack`` and kept in the callback's ``history``;
    a collapse warns once (``CollapseMonitor``'s warning). ``unified_first``: subclass ``lightning.pytorch``'s
    ``Callback`` where both packages are installed (solo-learn's trainer), else ``pytorch_lightning``'s.
    """
    from robust_reg import CollapseMonitor
    from robust_reg.collapse import _check_options

    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {type(images).__name__}")
    if images.dim() == 0 or images.shape[0] < 2:
        raise ValueError("images must hold at least 2 samples: the deviation is relative to their spread")
    unknown = set(monitor_options) - {"strong_steps", "tolerance", "floor"}
    if unknown:
        raise TypeError(
            f"collapse_monitor got unknown option(s) {sorted(unknown)}: CollapseMonitor takes strong_steps, "
            "tolerance and floor"
        )
    _check_options(**monitor_options)  # before training, not at the first epoch's end
    Callback = lightning_callback(unified_first)

    class WatchCollapse(Callback):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.monitor: CollapseMonitor | None = None

        @property
        def history(self) -> list:
            return [] if self.monitor is None else self.monitor.history

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            step = robust_step(pl_module)
            if step is None:
                raise ValueError(
                    f"collapse_monitor watches a robustified module: call robustify({type(pl_module).__name__}) "
                    "before trainer.fit"
                )
            if self.monitor is None:
                self.monitor = CollapseMonitor(step.regularizer, images, **monitor_options)
            encoder = _Target(resolve_target(pl_module, step.encoder), None, pick=step.pick)
            report = self.monitor(encoder, trainer.current_epoch)
            pl_module.log("collapse/training_attack", report.training_attack)
            pl_module.log("collapse/strong_attack", report.strong_attack)

    return WatchCollapse()


def lightning_callback(unified_first: bool) -> type:
    """Lightning's ``Callback`` class, from the package the user's trainer comes from."""
    import importlib

    names = ["lightning.pytorch", "pytorch_lightning"]
    for name in names[:: 1 if unified_first else -1]:
        try:
            return importlib.import_module(name).Callback
        except ImportError:
            continue
    raise ImportError("this callback needs pytorch_lightning or lightning installed")
