"""The machinery both adapters share: wrap a module's ``training_step`` in place.

The wrapper is an object stored on the instance (not a parameter, buffer or
submodule), so the ``state_dict`` keeps exactly the keys of the original class
and a checkpoint loads into the unmodified class.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robust_reg import RobustnessRegularizer

ViewGetter = Callable[[Any], Tensor]

_REGULARIZER_KEYS = ("epsilon", "norm", "steps", "step_size", "random_start", "relative", "bounds")


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


def find_normalize(transform: Any, depth: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) of the first ``Normalize`` inside a (lightly or torchvision) transform, if any."""
    if transform is None or depth > 6:
        return None
    if type(transform).__name__ == "Normalize" and hasattr(transform, "mean") and hasattr(transform, "std"):
        return _floats(transform.mean), _floats(transform.std)
    children: list[Any] = []
    for name in ("transforms", "transform", "view_transforms"):
        child = getattr(transform, name, None)
        if child is None:
            continue
        children.extend(child if isinstance(child, (list, tuple)) else [child])
    for child in children:
        found = find_normalize(child, depth + 1)
        if found is not None:
            return found
    return None


def _floats(values: Any) -> tuple[float, ...]:
    if isinstance(values, Tensor):
        values = values.flatten().tolist()
    if isinstance(values, (int, float)):
        values = [values]
    return tuple(float(v) for v in values)


def replace_tensor(batch: Any, old: Tensor, new: Tensor) -> tuple[Any, bool]:
    """A copy of ``batch`` with the tensor ``old`` (by identity) replaced by ``new``."""
    if batch is old:
        return new, True
    if isinstance(batch, (list, tuple)):
        items, found = [], False
        for item in batch:
            if not found:
                item, found = replace_tensor(item, old, new)
            items.append(item)
        if not found:
            return batch, False
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items), True
        return type(batch)(items), True
    if isinstance(batch, dict):
        out, found = {}, False
        for key, item in batch.items():
            if not found:
                item, found = replace_tensor(item, old, new)
            out[key] = item
        return (type(batch)(out) if found else batch), found
    return batch, False


class RobustTrainingStep:
    """Replaces a module's ``training_step``: runs the original, adds the regulariser.

    Stored as an instance attribute named ``training_step``; picklable (it holds
    the original *function*, looked up on the class, not a bound method).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        encoder: str,
        view: ViewGetter,
        view_description: str,
        regularizer: RobustnessRegularizer,
        weight: float,
        adversarial_view: bool,
        log: bool,
        framework: str,
    ) -> None:
        self.module = module
        self.function = type(module).training_step
        self.encoder = encoder
        self.view = view
        self.view_description = view_description
        self.regularizer = regularizer
        self.weight = float(weight)
        self.adversarial_view = bool(adversarial_view)
        self.log = bool(log)
        self.framework = framework
        self._warned = False
        functools.update_wrapper(self, self.function)
        self.__signature__ = inspect.signature(self.function.__get__(module))

    def __repr__(self) -> str:
        owner = type(self.module).__name__
        return f"<robust training_step ({self.framework}) of {owner}: {self.regularizer!r}, weight={self.weight}>"

    def __call__(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if getattr(module, "automatic_optimization", True) is False:
            raise RuntimeError(
                f"{type(module).__name__} uses manual optimization, so the loss its training_step returns is not "
                "what gets optimised; call the RobustnessRegularizer inside your training_step instead"
            )
        encoder = getattr(module, self.encoder)
        x = self._get_view(batch)
        if self.adversarial_view:
            return self._adversarial_step(module, encoder, batch, x, args, kwargs)
        calls: list[tuple[Tensor, Tensor]] = []
        handle = encoder.register_forward_hook(_recorder(calls, x))
        try:
            output = self.function(module, batch, *args, **kwargs)
        finally:
            handle.remove()
        if output is None:  # the user skipped this batch
            return None
        features = _match(calls, x)
        if features is None and not self._warned:
            self._warned = True
            warnings.warn(
                f"robust_reg: the training_step never passed the view ({self.view_description}) through "
                f"{self.encoder!r} unchanged, so its features cannot be reused and the regulariser runs its own "
                "clean forward (one extra forward per step)",
                stacklevel=2,
            )
        value = self.regularizer(encoder, x, features=features)
        self._log(module, x.shape[0])
        return _add_to_loss(output, self.weight * value)

    def _adversarial_step(
        self, module: nn.Module, encoder: nn.Module, batch: Any, x: Tensor, args: tuple, kwargs: dict
    ) -> Any:
        out = self.regularizer(encoder, x, return_adversarial=True)
        new_batch, found = replace_tensor(batch, x, out.adversarial_inputs)
        if not found:
            raise ValueError(
                f"adversarial_view=True needs the view ({self.view_description}) to be an element of the batch, "
                "so it can be swapped for the perturbed view; the view getter returned a derived tensor"
            )
        # The SSL loss's forward of the perturbed view returns the features the
        # regulariser already computed (same graph, no second backward).
        handle = encoder.register_forward_hook(_substitute(out.adversarial_inputs, out.adversarial_features))
        try:
            output = self.function(module, new_batch, *args, **kwargs)
        finally:
            handle.remove()
        if output is None:
            return None
        self._log(module, x.shape[0])
        return _add_to_loss(output, self.weight * out.loss)

    def _get_view(self, batch: Any) -> Tensor:
        try:
            x = self.view(batch)
        except (IndexError, KeyError, TypeError) as err:
            raise ValueError(
                f"robust_reg could not read the view to perturb ({self.view_description}) from a batch of type "
                f"{type(batch).__name__}: {err}. Pass view=<callable(batch) -> Tensor> to robustify()"
            ) from err
        if not isinstance(x, Tensor) or x.dim() < 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"robust_reg expected the view ({self.view_description}) to be an image batch tensor (N, C, H, W), "
                f"got {got}. Pass view=<callable(batch) -> Tensor> to robustify()"
            )
        return x

    def _log(self, module: nn.Module, n: int) -> None:
        if not self.log or not _has_trainer(module):
            return
        stats = self.regularizer.last_stats
        module.log("robust_reg/value", stats.value, batch_size=n)
        module.log("robust_reg/deviation", stats.deviation, batch_size=n)
        module.log("robust_reg/distance", stats.distance, batch_size=n)
        module.log("robust_reg/spread", stats.spread, batch_size=n)


def _has_trainer(module: nn.Module) -> bool:
    try:
        return getattr(module, "trainer", None) is not None
    except RuntimeError:  # Lightning raises when the module is not attached to a Trainer
        return False


def _recorder(calls: list, x: Tensor):
    def hook(_module: nn.Module, inputs: tuple, output: Any) -> None:
        if inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor) and inputs[0].shape == x.shape:
            calls.append((inputs[0], output))

    return hook


def _match(calls: Sequence[tuple[Tensor, Tensor]], x: Tensor) -> Tensor | None:
    """The encoder output of the call whose input was the view (same tensor, or equal values)."""
    for inp, out in calls:
        if inp is x:
            return out
    for inp, out in calls:  # e.g. solo-learn converts the view to channels_last first
        if _same_values(inp, x):
            return out
    return None


def _substitute(x_adv: Tensor, features: Tensor):
    def hook(_module: nn.Module, inputs: tuple, output: Any) -> Any:
        if inputs and isinstance(inputs[0], Tensor) and (inputs[0] is x_adv or _same_values(inputs[0], x_adv)):
            return features
        return None

    return hook


def _same_values(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _add_to_loss(output: Any, term: Tensor) -> Any:
    if isinstance(output, Tensor):
        return output + term.to(output.dtype)
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        updated = dict(output)
        updated["loss"] = output["loss"] + term.to(output["loss"].dtype)
        return type(output)(updated) if not isinstance(output, dict) else updated
    raise TypeError(
        f"robust_reg can add the regulariser only to a training_step that returns a loss tensor or a dict with "
        f"'loss'; got {type(output).__name__}"
    )


def robustify_module(
    module: nn.Module,
    *,
    framework: str,
    encoder: str,
    view: ViewGetter,
    view_description: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    weight: float,
    adversarial_view: bool,
    log: bool,
    regularizer_options: Mapping[str, Any],
) -> nn.Module:
    """Validate, build the regulariser, and install the wrapped ``training_step``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module (a LightningModule), got {type(module).__name__}")
    if isinstance(module.__dict__.get("training_step"), RobustTrainingStep):
        raise RuntimeError(
            f"{type(module).__name__} is already robustified; robustify() it once (a second call would add the "
            "penalty twice)"
        )
    if not callable(getattr(type(module), "training_step", None)):
        raise TypeError(f"{type(module).__name__} has no training_step to add the regulariser to")
    resolve_attribute(module, encoder, "encoder")
    if not callable(view):
        raise TypeError(f"view must be a callable(batch) -> Tensor, got {type(view).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or weight == float("inf"):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    unknown = set(regularizer_options) - set(_REGULARIZER_KEYS)
    if unknown:
        raise TypeError(f"unknown regulariser option(s): {', '.join(sorted(unknown))}")
    regularizer = RobustnessRegularizer(**{"epsilon": 8 / 255, **regularizer_options}, mean=mean, std=std)
    step = RobustTrainingStep(
        module,
        encoder=encoder,
        view=view,
        view_description=view_description,
        regularizer=regularizer,
        weight=weight,
        adversarial_view=adversarial_view,
        log=log,
        framework=framework,
    )
    object.__setattr__(module, "training_step", step)
    return module


def robust_step(module: nn.Module) -> RobustTrainingStep | None:
    """The installed wrapper, or ``None`` if ``module`` is not robustified."""
    step = module.__dict__.get("training_step")
    return step if isinstance(step, RobustTrainingStep) else None
