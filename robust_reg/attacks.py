"""Projected gradient ascent inside an eps-ball: the attack engine.

One engine serves two purposes. The regulariser's inner maximisation pushes an
encoder's features as far as possible from their clean value; the evaluation
attack (PGD-k, Madry et al. 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks") pushes a classifier's cross-entropy up. Both are
``projected_gradient_ascent`` on a per-sample objective.

The radius is always a fraction of the pixel range: ``8/255`` is eight grey levels
of 8-bit images, whether the pixels are declared ``bounds=(0, 1)`` (the default)
or ``bounds=(0, 255)``. Data that was normalised with a per-channel
``mean``/``std`` before the model is handled by a ``ThreatModel``: the ascent
runs in pixel space and only the model sees normalised inputs, so an L2 ball
stays a ball (it would be an ellipsoid in normalised space). ``ThreatModel`` is
also where the ball is checked, once for every entry point: a radius in the
wrong unit, an L-inf radius given as L2, raw pixels declared normalised (or the
reverse) fail with the fix.

Every number the ascent produces is a *lower estimate* of the true maximum:
gradient ascent finds a good perturbation, not provably the best one.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._utils import warn_deprecated

__all__ = ["ThreatModel", "projected_gradient_ascent", "pgd_attack"]

_NORMS = ("linf", "l2")


def _as_channel_tuple(value: float | Sequence[float] | Tensor | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.detach().flatten().tolist()
    elif isinstance(value, (int, float)):
        value = [value]
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float or a sequence of floats, got {value!r}") from None
    if not values:
        raise ValueError(f"{name} must not be empty")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    return values


def _check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """Return ``epsilon`` as a float, raising if it is negative or not finite."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(epsilon).__name__}")
    if not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {epsilon}")
    return float(epsilon)


def check_radius(epsilon: float, norm: str, name: str = "epsilon") -> None:
    """Refuse an L-inf radius above half the input range: a unit mistake (``8`` meant ``8/255``).

    The radius is a fraction of the input range, so no legitimate training or evaluation radius is that
    large: such a ball lets every pixel reach almost any value (the sanity checks' "very large eps" is
    internal and not checked here).
    """
    if norm == "linf" and epsilon > 0.5:
        raise ValueError(
            f"{name}={epsilon:g} with norm='linf' lets every pixel move by more than half its range: {name} is a "
            f"fraction of the input range (eight grey levels of 8-bit images are 8/255, also with "
            f"bounds=(0, 255)). Did you mean {name}={epsilon:g}/255 = {epsilon / 255:.4g}?"
        )


# An L2 radius moving each of d values by less than this many grey levels (root mean square) is refused when it is
# also exactly k/255 for a small k (an L-inf radius given as L2), and warned about below the second figure.
_L2_LINF_LOOKALIKE_GREY = 0.5
_L2_TINY_GREY = 0.1


def _linf_lookalike(epsilon: float) -> int | None:
    """``k`` if ``epsilon`` is ``k/255`` for an integer ``1 <= k <= 16`` (the L-inf radii of the literature)."""
    k = round(epsilon * 255)
    return k if 1 <= k <= 16 and math.isclose(epsilon * 255, k, rel_tol=1e-4) else None


def _check_norm(norm: str) -> str:
    """Return the canonical norm name (``"linf"`` or ``"l2"``)."""
    if not isinstance(norm, str) or norm.lower() not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    return norm.lower()


def _check_steps(steps: int, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{name} must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"{name} must be >= 0, got {steps}")
    return steps


def _check_step_size(step_size: float | None) -> float | None:
    if step_size is None:
        return None
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
        raise TypeError(f"step_size must be a real number or None, got {type(step_size).__name__}")
    if not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size must be finite and > 0, got {step_size}")
    return float(step_size)


def _find_normalize(transform: object, depth: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) of the first ``Normalize`` inside a (lightly or torchvision) transform, if any."""
    if transform is None or depth > 6:
        return None
    if type(transform).__name__ == "Normalize" and hasattr(transform, "mean") and hasattr(transform, "std"):
        mean, std = _as_channel_tuple(transform.mean, "mean"), _as_channel_tuple(transform.std, "std")
        return None if mean is None or std is None else (mean, std)
    children: list = []
    for name in ("transforms", "transform", "view_transforms"):
        child = getattr(transform, name, None)
        if child is not None:
            children.extend(child if isinstance(child, (list, tuple)) else [child])
    for child in children:
        found = _find_normalize(child, depth + 1)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class ThreatModel:
    """The set of allowed inputs ``B(x) = {x' : ||x' - x||_p <= eps * (hi - lo), lo <= x' <= hi}``.

    The unit rule: ``epsilon`` is a fraction of the pixel range ``bounds``, so ``8 / 255`` is eight grey
    levels of 8-bit images both for pixels in ``[0, 1]`` (the default) and for pixels declared
    ``bounds=(0, 255)``; ``radius`` is the same ball in the units of ``bounds``. Every public function that
    attacks or bounds builds its ball here, and the checks live here: at construction an L-inf radius above
    half the range (``8`` meant ``8/255``); on a batch (``check_inputs``) an L2 radius that does not fit the
    input size (larger than the box, or an L-inf radius such as ``8/255`` given as L2), raw pixels declared
    normalised, normalised inputs declared raw, pixels slightly outside the range (an augmentation that
    overshoots: clamp it), and, as a warning naming the ball it measured, inputs that fill much less of the
    range than the declared normalisation implies.

    Args:
        epsilon: Radius of the ball, a fraction of the pixel range (``8 / 255``).
        norm: ``"linf"`` or ``"l2"``.
        bounds: ``(lo, hi)``, the valid pixel range.
        mean: Per-channel mean already subtracted from the inputs (``None``: 0).
        std: Per-channel std the inputs were divided by (``None``: 1).

    Raises:
        ValueError: If ``epsilon`` is negative or not finite, an L-inf
            ``epsilon`` exceeds 0.5 (a unit mistake: ``8`` meant ``8/255``),
            ``norm`` is unknown, ``bounds`` is not an increasing pair of finite
            numbers, or ``std`` has a non-positive entry.

    Examples:
        >>> import torch
        >>> threat = ThreatModel(8 / 255, norm="linf", mean=(0.5,), std=(0.25,))
        >>> x = (torch.rand(4, 1, 8, 8) - 0.5) / 0.25  # normalised images
        >>> threat.to_pixels(x).min() >= 0
        tensor(True)
    """

    epsilon: float
    norm: str = "linf"
    bounds: tuple[float, float] = (0.0, 1.0)
    mean: Sequence[float] | None = None  # a tuple of floats once constructed
    std: Sequence[float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon))
        object.__setattr__(self, "norm", _check_norm(self.norm))
        check_radius(self.epsilon, self.norm)
        try:
            lo, hi = (float(b) for b in self.bounds)
        except (TypeError, ValueError):
            raise ValueError(f"bounds must be a pair (lo, hi) of numbers, got {self.bounds!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be finite with lo < hi, got {self.bounds!r}")
        object.__setattr__(self, "bounds", (lo, hi))
        mean = _as_channel_tuple(self.mean, "mean")
        std = _as_channel_tuple(self.std, "std")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std must be > 0 in every channel, got {std}")
        if mean is not None and std is not None and len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise ValueError(f"mean and std must have the same number of channels, got {len(mean)} and {len(std)}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_transform(
        cls, transform: object, epsilon: float, *, norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0)
    ) -> ThreatModel:
        """The ball for inputs that ``transform`` produced, normalised as its ``Normalize`` does.

        Searches the transform (torchvision ``Compose``, lightly's multi-view
        transforms, anything with ``transforms``/``transform``/``view_transforms``)
        for the first object named ``Normalize`` with ``mean``/``std``; without
        one, the inputs are raw pixels.

        Examples:
            >>> from torchvision import transforms as T
            >>> t = T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.25,))])
            >>> ThreatModel.from_transform(t, 0.1).std
            (0.25,)
            >>> ThreatModel.from_transform(T.ToTensor(), 0.1).normalized
            False
        """
        found = _find_normalize(transform)
        mean, std = found if found is not None else (None, None)
        return cls(epsilon, norm=norm, bounds=bounds, mean=mean, std=std)

    @classmethod
    def from_solo_config(
        cls,
        cfg: object,
        *,
        epsilon: float | None = None,
        norm: str | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> ThreatModel:
        """Deprecated since 0.3.0 (goes in 0.4.0): ``robust_reg.integrations.solo_learn.threat_from_config``."""
        warn_deprecated(
            "ThreatModel.from_solo_config(cfg)",
            "use robust_reg.integrations.solo_learn.threat_from_config(cfg)",
            stacklevel=3,
        )
        from robust_reg.integrations.solo_learn import threat_from_config

        return threat_from_config(cfg, epsilon=epsilon, norm=norm, bounds=bounds)

    @property
    def normalized(self) -> bool:
        """Whether inputs are in normalised (model) space rather than pixel space."""
        return self.mean is not None or self.std is not None

    def _channel_view(self, values: Sequence[float] | None, x: Tensor, name: str) -> Tensor | None:
        if values is None:
            return None
        if len(values) == 1:
            return torch.tensor(values[0], dtype=x.dtype, device=x.device)
        if x.dim() < 2 or x.shape[1] != len(values):
            raise ValueError(
                f"{name} has {len(values)} channels but the inputs have shape {tuple(x.shape)} "
                f"(channels are dimension 1)"
            )
        shape = (1, len(values)) + (1,) * (x.dim() - 2)
        return torch.tensor(values, dtype=x.dtype, device=x.device).view(shape)

    def check_channels(self, x: Tensor) -> None:
        """Raise ``ValueError`` naming ``mean``/``std`` if they do not fit ``x``'s channels."""
        self._channel_view(self.mean, x, "mean")
        self._channel_view(self.std, x, "std")

    def to_pixels(self, x: Tensor) -> Tensor:
        """Undo the normalisation: model-space inputs to pixel space."""
        std = self._channel_view(self.std, x, "std")
        mean = self._channel_view(self.mean, x, "mean")
        if std is not None:
            x = x * std
        if mean is not None:
            x = x + mean
        return x

    def to_model(self, pixels: Tensor) -> Tensor:
        """Apply the normalisation: pixel-space inputs to model space."""
        mean = self._channel_view(self.mean, pixels, "mean")
        std = self._channel_view(self.std, pixels, "std")
        if mean is not None:
            pixels = pixels - mean
        if std is not None:
            pixels = pixels / std
        return pixels

    @property
    def radius(self) -> float:
        """The ball's radius in the units of ``bounds``: ``epsilon * (hi - lo)``."""
        return self.epsilon * (self.bounds[1] - self.bounds[0])

    def _with_epsilon(self, epsilon: float) -> ThreatModel:
        """The same ball with another radius, unchecked: the sanity checks' whole-range eps."""
        other = copy.copy(self)
        object.__setattr__(other, "epsilon", float(epsilon))
        return other

    def range_tolerance(self, dtype: torch.dtype) -> float:
        """How far outside ``bounds`` a pixel may be and still count as round-off."""
        lo, hi = self.bounds
        scale = max(1.0, abs(lo), abs(hi))
        return max(1e-4, 16 * torch.finfo(dtype).eps) * scale

    def in_range(self, x: Tensor) -> Tensor:
        """A boolean scalar tensor: are all of ``x``'s pixels inside ``bounds`` (up to round-off)?"""
        lo, hi = self.bounds
        tol = self.range_tolerance(x.dtype)
        p = self.to_pixels(x.detach())
        return (p.min() >= lo - tol) & (p.max() <= hi + tol)

    def check_size(self, x: Tensor, name: str = "epsilon", *, warn: bool = True) -> None:
        """Refuse an L2 radius that does not fit inputs shaped like ``x`` (nothing to check for L-inf).

        Raises ``ValueError`` for a radius beyond half the L2 diameter of the input box (the ball holds
        almost every image) and for an L-inf radius given as L2 (``k/255`` for ``k <= 16`` moving each
        value by under half a grey level, root mean square); warns (naming the ball) below a tenth of
        a grey level.
        """
        if self.norm != "l2" or x.dim() < 2 or x[0].numel() == 0:
            return
        d, eps = x[0].numel(), self.epsilon
        limit = math.sqrt(d) / 2
        if eps > limit:
            raise ValueError(
                f"{name}={eps:g} with norm='l2' exceeds half the L2 diameter ({limit:.4g}) of inputs with {d} "
                f"values: the ball holds almost every image. {name} is a fraction of the pixel range (usual L2 "
                "radii: 0.5 for 32x32 RGB, 1.5-2 for 28x28 digits, 3 for 224x224 RGB); did you mean a smaller "
                "radius or norm='linf'?"
            )
        grey = eps / math.sqrt(d) * 255  # each value's root-mean-square move, in grey levels of 8-bit images
        k = _linf_lookalike(eps)
        if k is not None and grey < _L2_LINF_LOOKALIKE_GREY:
            raise ValueError(
                f"{name}={eps:.4g} (= {k}/255) with norm='l2' on inputs of {d} values moves each value by "
                f"{grey:.2f} grey levels (root mean square): an L-inf radius given as L2. For an L-inf threat pass "
                "norm='linf'; usual L2 radii are 0.5 (32x32 RGB), 1.5-2 (28x28 digits), 3 (224x224 RGB)."
            )
        if warn and grey < _L2_TINY_GREY:
            warnings.warn(
                f"{name}={eps:.4g} with norm='l2' on inputs of {d} values moves each value by {grey:.3f} grey "
                "levels (root mean square): a very small ball, which attacks may not move at all. Usual L2 radii: "
                "0.5 (32x32 RGB), 1.5-2 (28x28 digits), 3 (224x224 RGB).",
                stacklevel=3,
            )

    def _extremes(self, x: Tensor) -> Tensor:
        """Per-channel ``(min, max)`` of ``x`` in model space, shape ``(2, C)`` (``C = 1`` without per-channel
        statistics): small, so that every data-dependent check costs the caller one host synchronisation."""
        per_channel = max(len(self.mean or ()), len(self.std or ())) > 1
        x = x.detach()
        dims = [d for d in range(x.dim()) if d != 1] if per_channel else list(range(x.dim()))
        return torch.stack([x.amin(dim=dims).float().reshape(-1), x.amax(dim=dims).float().reshape(-1)])

    def _channel_values(self, values: Sequence[float] | None, default: float, channels: int) -> list[float]:
        if values is None:
            return [default] * channels
        return list(values) * channels if len(values) == 1 else list(values)

    def _check_extremes(self, extremes: Sequence[Sequence[float]], dtype: torch.dtype, name: str, warn: bool) -> None:
        """The range checks on ``_extremes``' values, read back as Python floats."""
        lows, highs = list(extremes[0]), list(extremes[1])
        if any(math.isnan(v) for v in lows + highs):
            raise ValueError(f"{name} contains NaN")
        lo, hi = self.bounds
        tol = self.range_tolerance(dtype)
        mean = self._channel_values(self.mean, 0.0, len(lows))
        std = self._channel_values(self.std, 1.0, len(lows))
        x_lo, x_hi = min(lows), max(highs)
        self._check_raw_declared_normalised(x_lo, x_hi, mean, std, name)
        p_lo = min(v * s + m for v, m, s in zip(lows, mean, std))
        p_hi = max(v * s + m for v, m, s in zip(highs, mean, std))
        if p_lo < lo - tol or p_hi > hi + tol:
            raise self._range_error(p_lo, p_hi, name)
        if warn and self.normalized:
            self._warn_if_the_range_is_unfilled(lows, highs, std, name)

    def _check_raw_declared_normalised(self, x_lo: float, x_hi: float, mean, std, name: str) -> None:
        """Inputs that fill the raw pixel range although mean/std say they were normalised (a normalised batch
        of images has values below ``lo``: every pixel darker than the channel mean)."""
        lo, hi = self.bounds
        span, tol = hi - lo, self.range_tolerance(torch.float32)
        shifts = any((lo - m) / s < lo - span / 10 for m, s in zip(mean, std))
        if not (self.normalized and shifts and x_lo >= lo - tol and x_hi <= hi + tol and x_hi - x_lo >= span / 2):
            return
        ball = self.epsilon / min(std)
        raise ValueError(
            f"{name} has values in [{x_lo:.3g}, {x_hi:.3g}], the raw pixel range {self.bounds}, but mean/std were "
            f"given: the ball would be measured as if they were normalised, {ball:.4g} ({255 * ball:.1f}/255) of "
            f"your pixels instead of {self.epsilon:.4g} ({255 * self.epsilon:.1f}/255). If the model normalises "
            "inside, pass no mean/std (the adapters: normalize=None); if the inputs are normalised, they are not "
            "normalised with this mean/std"
        )

    def _range_error(self, p_lo: float, p_hi: float, name: str) -> ValueError:
        lo, hi = self.bounds
        where = " after undoing mean/std" if self.normalized else ""
        found = f"{name} has values in [{p_lo:.4g}, {p_hi:.4g}]{where}, outside bounds {self.bounds}"
        if max(lo - p_lo, p_hi - hi) <= 0.05 * (hi - lo):
            return ValueError(
                f"{found}, by a little: an augmentation overshoots the range (bicubic resizing, colour jitter, "
                f"blur); clamp the views to the range before the model, e.g. x = x.clamp({lo:g}, {hi:g})"
            )
        if not self.normalized:
            return ValueError(
                f"{found}; if the inputs were normalised, pass the mean/std they were normalised with "
                "(mean=..., std=...), or set bounds to your pixels' range"
            )
        return ValueError(f"{found}; the inputs were not normalised with this mean/std: pass the ones they were")

    def _warn_if_the_range_is_unfilled(self, lows, highs, std, name: str) -> None:
        """A batch filling much less of the range than the declared normalisation gives the pixels was likely
        normalised with a larger std (lightly's mean = std = 0.5 under an ImageNet assumption): warn, naming
        the ball it then measures in the inputs' own pixels."""
        span = self.bounds[1] - self.bounds[0]
        filled = max((h - low) * s / span for low, h, s in zip(lows, highs, std))
        if filled >= 0.6 or filled <= 0:
            return
        ball = self.epsilon / filled
        warnings.warn(
            f"{name} fills at most {100 * filled:.0f} % of the pixel range that mean={self.mean}, std={self.std} "
            f"imply: if the inputs were normalised with other statistics (e.g. mean = std = 0.5), the ball is about "
            f"{ball:.4g} ({255 * ball:.1f}/255) of their pixels, not {self.epsilon:.4g} "
            f"({255 * self.epsilon:.1f}/255). Pass the mean/std (or transform=) the inputs were normalised with.",
            stacklevel=4,
        )

    def range_error(self, x: Tensor, name: str = "x") -> ValueError:
        """The error for inputs outside ``bounds``, naming the argument."""
        p = self.to_pixels(x.detach().float())
        return self._range_error(p.min().item(), p.max().item(), name)

    def check_inputs(self, x: Tensor, name: str = "x", *, epsilon_name: str = "epsilon", warn: bool = True) -> None:
        """Raise if ``x`` is not a floating batch whose size, channels and range fit this threat model.

        One host synchronisation. ``warn=False`` skips the warnings (a caller that already warned once).
        """
        self._check_batch(x, name, epsilon_name, warn)
        self._check_extremes(self._extremes(x).tolist(), x.dtype, name, warn)

    def _check_batch(self, x: Tensor, name: str, epsilon_name: str, warn: bool) -> None:
        """The checks of ``check_inputs`` that need no data: type, shape, channels, the L2 radius's size."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
        self.check_channels(x)
        self.check_size(x, epsilon_name, warn=warn)

    def _cast_like(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """``x_adv`` (computed in float32) in ``x``'s dtype and still inside the ball: a value that rounding
        moved further from ``x`` than it was goes one representable step back toward ``x`` (bfloat16 and
        float16 round by up to 1/256 and 1/2048 relative, more than an 8/255 ball's edge tolerates)."""
        if x_adv.dtype == x.dtype:
            return x_adv
        low = x_adv.to(x.dtype)
        outward = (low.float() - x.float()).abs() > (x_adv.float() - x.float()).abs()
        return torch.where(outward, torch.nextafter(low, x), low)

    def random_start(self, pixels: Tensor) -> Tensor:
        """A perturbation drawn uniformly from the ball, clipped to the bounds."""
        eps = self.radius
        # Drawn in the logical (contiguous) order, not ``*_like``'s memory order: a channels-last batch gets
        # the same perturbation as its contiguous copy under the same seed.
        dtype, device = pixels.dtype, pixels.device
        if self.norm == "linf":
            delta = torch.empty(pixels.shape, dtype=dtype, device=device).uniform_(-eps, eps)
        else:
            flat = torch.randn(pixels.shape, dtype=dtype, device=device).flatten(1)
            flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
            # Radius u^(1/d) makes the draw uniform in the volume of the ball.
            radius = torch.rand(flat.shape[0], 1, dtype=flat.dtype, device=flat.device) ** (1.0 / flat.shape[1])
            delta = (flat * radius * eps).view_as(pixels)
        return self.project(pixels, delta)

    def project(self, pixels: Tensor, delta: Tensor) -> Tensor:
        """Project ``delta`` onto the ball, then clip ``pixels + delta`` to the bounds.

        Clipping after the ball projection keeps the result inside the ball for
        both norms (clipping only moves coordinates towards ``pixels``).
        """
        eps = self.radius
        if self.norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            norms = delta.flatten(1).norm(dim=1).view((-1,) + (1,) * (delta.dim() - 1))
            shrink = eps / norms.clamp_min(torch.finfo(norms.dtype).tiny)
            delta = delta * torch.where(norms > eps, shrink, torch.ones_like(shrink))
        lo, hi = self.bounds
        return (pixels + delta).clamp(lo, hi) - pixels

    def ascent_step(self, delta: Tensor, grad: Tensor, step_size: float) -> Tensor:
        """One steepest-ascent step for the norm: sign step (L-inf), unit-gradient step (L2)."""
        if self.norm == "linf":
            return delta + step_size * grad.sign()
        norms = grad.flatten(1).norm(dim=1).view((-1,) + (1,) * (grad.dim() - 1))
        return delta + step_size * grad / norms.clamp_min(torch.finfo(grad.dtype).tiny)


_LEGACY_THREAT = ("mean", "std", "bounds")


def resolve_threat(
    threat: ThreatModel | None,
    epsilon: float | None,
    norm: str | None,
    legacy: dict,
    *,
    where: str,
    epsilon_name: str = "epsilon",
    stacklevel: int = 3,
) -> ThreatModel:
    """The ``ThreatModel`` of a public function's ``threat=`` / ``epsilon=`` / ``norm=`` (the shorthand), with
    0.2's ``mean=``, ``std=``, ``bounds=`` still accepted for one minor release (a ``DeprecationWarning``).

    ``legacy`` holds the function's other keyword arguments: anything but those three is a ``TypeError``.
    """
    unknown = sorted(set(legacy) - set(_LEGACY_THREAT))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(unknown)}")
    old = {k: legacy[k] for k in _LEGACY_THREAT if k in legacy}
    if old:
        warn_deprecated(
            f"{where}({', '.join(f'{k}=' for k in old)}...)",
            f"pass threat=ThreatModel({epsilon_name}, {', '.join(f'{k}=...' for k in old)})",
            stacklevel=stacklevel + 1,
        )
    if threat is None:
        if epsilon is None:
            raise TypeError(f"{where}() needs {epsilon_name}= (the radius) or threat= (a ThreatModel)")
        return ThreatModel(epsilon, norm=norm or "linf", **old)
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    clash = [name for name, value in ((epsilon_name, epsilon), ("norm", norm), *old.items()) if value is not None]
    if clash:
        raise TypeError(f"{where}(): {', '.join(clash)} come from threat=; do not pass them too")
    return threat


def projected_gradient_ascent(
    objective: Callable[[Tensor], Tensor],
    x: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    keep_best: bool = False,
    start: Tensor | None = None,
) -> Tensor:
    """Maximise a per-sample ``objective`` over the threat set around ``x``.

    ``steps`` iterations of projected ascent from a uniform random start (or
    from ``x``): sign steps for L-inf, normalised-gradient steps for L2, step
    size ``2.5 * epsilon / steps`` unless given, projected onto the ball and
    the valid range after every step. Only the gradient with respect to the
    input is computed, so no parameter's ``.grad`` is touched.

    Args:
        objective: Maps a batch of inputs (model space, like ``x``) to one value
            per sample, shape ``(N,)``; larger is better for the attacker.
        x: Clean inputs, shape ``(N, ...)``, in model space.
        threat: The allowed perturbations.
        steps: Number of ascent steps; 0 returns the (random) start.
        step_size: Step length in the units of ``epsilon``, a fraction of the
            pixel range (default ``2.5 * epsilon / steps``).
        random_start: Start from a uniform draw in the ball instead of ``x``.
        keep_best: Return, per sample, the iterate with the highest objective
            instead of the last one (costs one more forward).
        start: Start from ``x + start`` instead (a perturbation in pixel units,
            shape of ``x``, projected onto the ball and the valid range), e.g.
            where the sample's ascent ended before (a warm start); overrides
            ``random_start``. Treated as a constant.

    Returns:
        The perturbed inputs in model space, detached, same shape and dtype as ``x``.
        Half-precision inputs are perturbed in float32 and cast back inside the
        ball (a value that rounding pushes out steps back toward ``x``).

    Raises:
        ValueError: If ``steps`` is negative, ``step_size`` is not positive,
            ``start`` is not a finite perturbation of ``x``'s shape, or
            ``objective`` does not return one value per sample.

    Examples:
        >>> import torch
        >>> A = torch.randn(3, 5)
        >>> x = torch.full((4, 5), 0.5)
        >>> threat = ThreatModel(0.1, norm="linf")
        >>> x_adv = projected_gradient_ascent(lambda v: ((v - x) @ A.T).norm(dim=1), x, threat, steps=5)
        >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    steps = _check_steps(steps)
    step_size = _check_step_size(step_size)
    x = x.detach()
    _check_start(start, x)
    pixels = _working_pixels(threat, x)
    if start is not None:
        delta = threat.project(pixels, start.detach().to(device=pixels.device, dtype=pixels.dtype))
    else:
        delta = threat.random_start(pixels) if random_start else torch.zeros_like(pixels)
    if steps == 0 or threat.epsilon == 0:
        return threat._cast_like(threat.to_model(pixels + delta), x).detach()
    alpha = _step_length(threat, steps, step_size)
    return _ascend(objective, pixels, delta, threat, steps, alpha, like=x, keep_best=keep_best)


def _working_pixels(threat: ThreatModel, x: Tensor) -> Tensor:
    """``x`` in pixel space, clamped to the bounds, in float32 if ``x`` is half precision (the ball's edge
    needs more precision than bfloat16's 8 bits)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return threat.to_pixels(x).clamp(*threat.bounds)


def _check_start(start: object, x: Tensor) -> None:
    if start is None:
        return
    if not isinstance(start, Tensor) or not start.is_floating_point():
        raise TypeError(f"start must be a floating-point Tensor, got {type(start).__name__}")
    if start.shape != x.shape:
        raise ValueError(f"start must have the shape of x {tuple(x.shape)}, got {tuple(start.shape)}")
    if not bool(torch.isfinite(start).all()):
        raise ValueError("start contains non-finite values (nan or inf)")


def _step_length(threat: ThreatModel, steps: int, step_size: float | None) -> float:
    """The ascent step in the units of ``bounds``: ``step_size``, else ``2.5 * epsilon / steps``, times the range."""
    span = threat.bounds[1] - threat.bounds[0]
    return span * (step_size if step_size is not None else 2.5 * threat.epsilon / steps)


def _ascend(
    objective: Callable[[Tensor], Tensor],
    pixels: Tensor,
    delta: Tensor,
    threat: ThreatModel,
    steps: int,
    alpha: float,
    *,
    like: Tensor,
    keep_best: bool = False,
) -> Tensor:
    """``steps`` projected ascent steps of length ``alpha`` from ``pixels + delta`` (pixel space); returns the
    end point in model space, in ``like``'s dtype and inside the ball, detached. The objective sees inputs in
    ``like``'s dtype. The loop of ``projected_gradient_ascent``."""
    best_delta = best_value = None
    n = pixels.shape[0]

    def inputs(delta: Tensor) -> Tensor:
        return threat.to_model(pixels + delta).to(like.dtype)

    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            values = _per_sample(objective(inputs(delta)), n)
            (grad,) = torch.autograd.grad(values.sum(), delta)
        if keep_best:
            best_delta, best_value = _keep_best(best_delta, best_value, delta.detach(), values.detach())
        delta = threat.project(pixels, threat.ascent_step(delta.detach(), grad.to(delta.dtype), alpha))
    if keep_best:
        with torch.no_grad():
            values = _per_sample(objective(inputs(delta)), n)
        delta, _ = _keep_best(best_delta, best_value, delta, values)
    return threat._cast_like(threat.to_model(pixels + delta), like).detach()


def _per_sample(values: Tensor, n: int) -> Tensor:
    if not isinstance(values, Tensor) or values.shape != (n,):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"objective must return one value per sample, shape ({n},), got {shape}")
    return values


def _keep_best(
    best_delta: Tensor | None, best_value: Tensor | None, delta: Tensor, values: Tensor
) -> tuple[Tensor, Tensor]:
    if best_delta is None or best_value is None:
        return delta.clone(), values.clone()
    better = values >= best_value  # ties go to the later iterate, further along the ascent
    mask = better.view((-1,) + (1,) * (delta.dim() - 1))
    return torch.where(mask, delta, best_delta), torch.where(better, values, best_value)


def _cross_entropy_logit(logits: Tensor, y: Tensor) -> Tensor:
    """``logsumexp_{k != y} z_k - z_y``: cross-entropy is ``softplus`` of it, and its gradient is
    the cross-entropy's divided by ``1 - p_y`` (a positive per-sample factor).

    Sign steps and per-sample normalised steps are therefore exactly those of PGD on the
    cross-entropy, and the best iterate is the same, but nothing saturates: on a confident
    sample the cross-entropy's gradient underflows to zero (``1 - p_y`` rounds to 0), which
    would stall the attack and fake robustness.
    """
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return torch.logsumexp(others, dim=1) - own


def pgd_attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
) -> Tensor:
    """PGD-k on the cross-entropy of a classifier (the evaluation attack).

    Keeps, per sample, the iterate with the highest loss. The ascent follows the
    cross-entropy's gradient direction computed in a form that does not underflow
    on confident samples (see ``_cross_entropy_logit``), so large-logit heads
    cannot mask gradients. The caller chooses the model's mode (``model.eval()``
    for evaluation); nothing is changed here.

    Args:
        model: Maps inputs in model space to logits ``(N, K)``.
        x: Clean inputs in model space.
        y: Integer labels ``(N,)``.
        threat: The allowed perturbations.
        steps: Number of PGD steps.
        step_size: Step length, in the units of ``epsilon`` (default ``2.5 * epsilon / steps``).
        random_start: Start from a uniform draw in the ball.

    Returns:
        Adversarial inputs in model space, detached.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
        >>> x_adv = pgd_attack(model, x, y, ThreatModel(0.1), steps=5)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")

    def objective(inputs: Tensor) -> Tensor:
        return _cross_entropy_logit(model(inputs).double(), y)

    return projected_gradient_ascent(
        objective, x, threat, steps=steps, step_size=step_size, random_start=random_start, keep_best=True
    )
