"""The task-agnostic robustness regulariser.

Reference: A. T. Nguyen, S. N. Lim, P. Torr, "Task-Agnostic Robust
Representation Learning", 2022. If ``z -> loss(head(z), y)`` is L-Lipschitz,
then for every downstream task the adversarial loss is at most the clean loss
plus ``L * E_x max_{x' in B(x)} ||f(x') - f(x)||``. The second factor depends on
the encoder and unlabelled inputs only; this module estimates it on a batch and
returns it as a differentiable loss term, divided by the batch spread of the
features so that shrinking the features cannot cheat it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._state import active_stochastic_layers, preserved_state
from ._utils import warn_deprecated
from .attacks import (
    ThreatModel,
    _ascend,
    _check_start,
    _check_step_size,
    _check_steps,
    _step_length,
    _working_pixels,
    projected_gradient_ascent,
    resolve_threat,
)
from .warm_start import PerturbationMemory, WarmStart

__all__ = ["RobustnessRegularizer", "RegularizerOutput", "RegularizerStats"]

_BATCH_NORM_MODES = ("batch", "running")


class RegularizerOutput(NamedTuple):
    """What ``RobustnessRegularizer`` returns with ``return_adversarial=True``.

    Attributes:
        loss: The regulariser value, a scalar carrying gradients to the encoder.
        adversarial_inputs: ``x + delta``, the deviation-maximising inputs, in
            the same (model) space and shape as ``x``, detached.
        adversarial_features: ``encoder(x + delta)``, as the encoder returned it,
            carrying gradients; feed it to the SSL loss in place of the perturbed view's clean
            embedding (``ssl_loss(z0, out.adversarial_features)``), as the recommended form does.
    """

    loss: Tensor
    adversarial_inputs: Tensor
    adversarial_features: Tensor

    def _misused(self, *_: object) -> None:
        raise TypeError(
            "reg(...) returns a RegularizerOutput (loss, adversarial_inputs, adversarial_features), not a tensor: "
            "add out.loss to the loss, e.g. loss = ssl_loss(z0, out.adversarial_features) + weight * out.loss"
        )


# Arithmetic and backward on the output are the tensor misuse: each says to use out.loss.
for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__"):
    setattr(RegularizerOutput, _name, RegularizerOutput._misused)
RegularizerOutput.backward = RegularizerOutput.item = RegularizerOutput._misused  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RegularizerStats:
    """Detached statistics of the last call, for logging (no extra compute).

    The names are those of ``BoundReport``: ``mean_deviation`` is
    ``R_eps``, ``variance`` is ``sigma ** 2``; the value with ``relative=True`` is
    ``mean_squared_deviation / variance``.

    Attributes:
        value: The returned regulariser value.
        mean_squared_deviation: ``mean_i ||f(x_i + delta_i) - f(x_i)||^2`` (a lower
            estimate of the worst case in the ball the ascent searched: ``3 * epsilon``
            for N-FGSM, the default).
        mean_deviation: ``mean_i ||f(x_i + delta_i) - f(x_i)||``, the batch estimate of
            ``R_eps(f)`` (a lower estimate) for ``inner="pgd"``; of ``R_3eps`` for N-FGSM.
        variance: ``sigma ** 2``, the mean squared distance of the clean features to
            their batch mean.
    """

    value: Tensor
    mean_squared_deviation: Tensor
    mean_deviation: Tensor
    variance: Tensor

    @property
    def relative_deviation(self) -> Tensor:
        """``mean_deviation / sigma``, as ``BoundReport.relative_deviation <robust_reg.BoundReport>``."""
        return self.mean_deviation / self.variance.sqrt()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather(t: Tensor) -> Tensor:
    """Concatenate ``t`` over all processes; the backward sums every process's gradient for the local part."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()), dim=0)


_ASCENTS = ("deviation", "instance", "positive")
# 0.2's options that lost their measurements (docs: negative results), out of the public API since 0.3.0: each still
# works, with a DeprecationWarning, until 0.4.0. What to do instead, for the warning.
_RESEARCH = {
    "random_start": "drop it: the random start is the measured default (starting at x was weaker under AutoAttack)",
    "relative": "drop it: the relative value is the default (the raw deviation can be cheated by shrinking)",
    "normalize_features": "the class sets it (RobustnessRegularizer: normalised; BackboneRobustnessRegularizer: raw)",
    "batch_norm": "drop it: batch statistics are the measured default ('running' was no better)",
    "ascent": "the class sets it (RobustnessRegularizer: the positive ascent; BackboneRobustnessRegularizer: the "
    "deviation ascent)",
}


def _research_options(options: dict, where: str = "RobustnessRegularizer") -> dict:
    """Pop 0.2's research options from ``options``, warning once per call that names them."""
    found = {name: options.pop(name) for name in list(options) if name in _RESEARCH}
    if found:
        advice = "; ".join(f"{name}: {_RESEARCH[name]}" for name in found)
        warn_deprecated(f"{where}({', '.join(f'{n}=' for n in found)}...)", advice, stacklevel=4)
    return found


# form -> (normalize_features, ascent) defaults. "embedding": the measured recommended configuration, on what the
# SSL loss compares; "backbone": the paper's quantity R_eps, what estimate_bound measures.
_FORMS = {"embedding": (True, "positive"), "backbone": (False, "deviation")}
# The inner maximisations. "n-fgsm" (de Jorge et al., NeurIPS 2022): noise of 2 eps, one sign step of eps, not
# projected back to eps, so the ascent reaches 3 eps; "pgd": ``steps`` projected steps from a uniform draw in eps.
_INNERS = ("n-fgsm", "pgd", "n-fgsm-start")
_N_FGSM_REACH = 3
_INSTANCE_TEMPERATURE = 0.5


def _instance_confusion(z: Tensor, anchors: Tensor) -> Tensor:
    """Per sample, the cross-entropy of finding its own clean features among the batch's (cosine / 0.5)."""
    logits = F.normalize(z, dim=1) @ F.normalize(anchors, dim=1).T / _INSTANCE_TEMPERATURE
    return torch.logsumexp(logits, dim=1) - logits.diagonal()


def _spread(h: Tensor) -> Tensor:
    """``sigma ** 2``: the mean squared distance of the features to their mean."""
    return (h - h.mean(dim=0, keepdim=True)).pow(2).sum(dim=1).mean()


def _relative(deviation: Tensor, spread: Tensor) -> Tensor:
    """The regulariser's value: the mean squared deviation over the spread (a spread of 0 counts as tiny)."""
    return deviation / spread.clamp_min(torch.finfo(spread.dtype).tiny)


def _check_widths(features: Tensor, positive: Tensor, source: str) -> None:
    """``positive`` must be the same embedding as the features (same head): one clear error naming both widths."""
    width, other = features.shape[1], positive[0].numel()
    if width != other:
        raise ValueError(
            f"positive= has {other} values per sample but {source} has {width}: pass the other view's output of the "
            "same model you pass as encoder (e.g. both projections), not the backbone's features for one of them"
        )


def _flatten(features: object, name: str) -> Tensor:
    if not isinstance(features, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if features.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension, got a scalar")
    return features.reshape(features.shape[0], -1)


class _Anchor(NamedTuple):
    """What one call's ascent and penalty share: the clean features as measured, the penalty's anchor (``clean``,
    detached with ``detach_anchor``), the spread, the gather over processes and the ascent's per-sample score."""

    clean: Tensor
    h: Tensor
    spread: Tensor
    gather: Callable[[Tensor], Tensor]
    score: Callable[[Tensor], Tensor]


class _FormKeyword:
    """0.2's ``RobustnessRegularizer(form="backbone")`` builds the class that form became (a subclass, so
    isinstance checks and ``__init__`` run as before; the warning is ``__init__``'s). A base of its own, so that
    ``inspect.signature`` (help, IDEs, the docs) reads ``__init__``, not this catch-all."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is RobustnessRegularizer and kwargs.get("form") == "backbone":
            cls = BackboneRobustnessRegularizer
        return super().__new__(cls)


class RobustnessRegularizer(_FormKeyword, nn.Module):
    """Penalise the worst-case change of an encoder's features inside an eps-ball.

    For a batch ``x_1..x_n`` with clean features ``h_i = f(x_i)``, their mean ``h̄`` and
    ``sg`` the stop-gradient:

        r = mean_i ||f(x_i + δ_i) - h_i||² / mean_i ||h_i - h̄||²,
        δ_i ≈ argmax_{δ in B} ||f(x_i + δ) - sg(h_i)||²

    The argmax is ``steps`` iterations of projected gradient ascent (``inner="pgd"``),
    so ``r`` is an *estimate* (a lower estimate of the worst case in ``B``), or, by
    default, one noisy N-FGSM step whose search reaches ``3 * epsilon``: then ``B`` is
    that wider ball, and ``r`` is not a lower estimate of the eps-ball's worst case
    (measure that with ``estimate_bound``). Gradients flow through
    numerator and denominator; the relative value is invariant to the scale of
    ``f``, so minimising it cannot be cheated by shrinking the features.

    Execution policy (what the encoder does during the regulariser's passes):

    - **Stochastic layers are deterministic.** Every dropout layer, torchvision's
      ``StochasticDepth``, timm's ``DropPath``/``DropBlock2d`` and instances of
      ``stochastic_modules`` run in eval mode during the clean anchor, the ascent
      and the adversarial pass, so the deviation is the perturbation's effect and
      nothing else (with dropout on, two passes differ at eps 0) -- and it is the
      eval-mode network that downstream heads use. If ``features`` came from a
      pass with such layers active, they are recomputed once with the layers off
      (one extra forward; a warning says so once per regulariser).
    - **BatchNorm uses batch statistics** in train mode, as in the SSL loss, but
      its running statistics are never updated by these passes.
    - No parameter ``.grad`` is written by the ascent; every submodule's mode and
      every ``requires_grad`` flag is restored bit for bit, also when the
      encoder raises.

    The module has no parameters.

    Args:
        epsilon: Radius of the threat ball, a fraction of the pixel range: ``8 / 255`` is eight
            grey levels for pixels in ``[0, 1]`` and for pixels declared ``bounds=(0, 255)``.
            The shorthand for ``threat=ThreatModel(epsilon, norm=norm)``.
        threat: The whole ball instead: a ``ThreatModel`` with the radius, the norm, the inputs'
            normalisation (``mean``/``std``) and pixel range (``bounds``).
        norm: With ``epsilon``: ``"linf"`` (sign steps, the default) or ``"l2"`` (normalised-gradient steps).
        inner: The inner maximisation. ``"n-fgsm"`` (de Jorge et al., "Make Some Noise", NeurIPS 2022):
            uniform noise of ``2 * epsilon``, then one ascent step of ``epsilon``, not projected back onto the
            ``epsilon``-ball (it reaches ``3 * epsilon``): one ascent forward and backward where ``"pgd"``
            takes three, so more epochs in the same time. ``"pgd"`` (0.2's default): ``steps`` projected
            ascent steps from a uniform draw in the ball. ``None`` (default): ``"n-fgsm"`` for an L-inf ball
            of radius up to 1/6, where it was measured; ``"pgd"`` when ``steps`` or ``step_size`` is given
            (they set PGD's ascent), for an L2 ball (not measured with N-FGSM) and for a larger L-inf radius
            (N-FGSM's 3-eps search would span most of the pixel range). With DynACL's annealed augmentation
            (``robust_reg.augmentation``), N-FGSM trained at equal time was above PGD on the CIFAR-10 subset
            and on MNIST (docs: Results, "Robustness per second"). ``"n-fgsm-start"``: N-FGSM whose
            noisy pass is also the penalty's anchor (the anchor is the noisy view's features, not
            ``x``'s), so the perturbed view needs no clean pass: call without ``features=`` and leave
            that view's own forward out (the adversarial embedding replaces it in the SSL loss). One
            forward fewer per step: 1.91x a plain SimCLR step on a small CNN and 1.70x on ResNet-18,
            with ``detach_anchor=True`` 1.53x and 1.35x ("n-fgsm" in the same run: 1.99x, 1.86x; docs:
            Overhead). At equal training time level with ``"n-fgsm"``, detached too (docs: Results;
            SimCLR-like losses only when detached: BYOL so trained is 8.7 points below on MNIST); for BYOL
            (anchor with gradient) level with ``"n-fgsm"`` at equal epochs. The lightly adapter skips the
            view's clean forward for it.
        steps: ``"pgd"``: ascent steps (default 3; 0: random start only).
        step_size: ``"pgd"``: ascent step, in the units of ``epsilon`` (default ``2.5 * epsilon / steps``).
        stochastic_modules: Further module types whose output is random (e.g. a
            custom noise layer), made deterministic like dropout.
        gather_distributed: Under ``torch.distributed`` (DDP), average the
            deviation and compute the spread over the global batch of all
            processes (a differentiable all-gather, as lightly's losses do), so
            the value equals the single-process value on the concatenated batch
            and DDP's gradient averaging gives the single-process gradient.
            Without it each process divides by its local spread; no collective
            call is made. Every process must pass the same batch size.
        detach_anchor: The clean features (the anchor) are a constant target, as
            the ascent already treats them: the gradient flows through the perturbed
            features only, pulling them toward the anchor, and the spread is a
            constant. The value is unchanged. When nothing else uses the clean pass
            (the adversarial embedding replaces the clean one in the SSL loss), its
            backward is skipped. Cheaper for SimCLR at the same measured robustness;
            it collapses BYOL, whose clean prediction of the perturbed view then
            gets no gradient at all (docs: Results). Off by default.
        **deprecated: 0.2's spellings, each with a ``DeprecationWarning`` until 0.4.0:
            ``mean=``, ``std=``, ``bounds=`` (pass ``threat=``), ``form=`` (``form="backbone"``
            builds a ``BackboneRobustnessRegularizer``), and the options that
            lost their measurements (docs: negative results): ``random_start``,
            ``relative``, ``normalize_features``, ``batch_norm``, ``ascent``.

    Shape:
        - x: ``(N, ...)``, normalised as ``threat`` says.
        - features: ``(N, ...)``, the encoder's output on ``x``; flattened per sample.
        - Output: a ``RegularizerOutput`` whose ``loss`` is a scalar.

    Raises:
        ValueError: At construction: a negative or non-finite ``epsilon``, an
            L-inf ``epsilon`` above 0.5 (a unit mistake: ``8`` meant ``8/255``),
            an unknown ``norm``, negative ``steps``, a non-positive
            ``step_size``; ``inner='n-fgsm'`` with ``steps`` or ``step_size`` (the ``"pgd"`` ascent's settings)
            or with an L-inf ``epsilon`` above 1/6. At call time, before any forward: the ball against the
            batch (``ThreatModel.check_inputs``: inputs outside ``bounds``, raw
            pixels declared normalised, an L-inf radius given as L2, an L2 radius
            larger than the input box, channels that do not fit ``mean``/``std``),
            ``positive=None`` (the message gives both ways forward), ``positive`` equal
            to ``features`` or of another width, a batch of one,
            ``features`` of another batch size or not finite, an encoder with no
            trainable parameter, a ``start`` not of ``x``'s shape or not finite, a
            warm start whose indices or crops do not fit ``x``, a warm start with ``inner="n-fgsm"``;
            ``features=`` or ``start=`` with ``inner="n-fgsm-start"``.
        TypeError: Neither ``epsilon`` nor ``threat`` (or both), a call without
            ``positive=`` (Python's message names it), integer inputs or
            features, a non-callable encoder, a ``start`` that is neither a
            floating-point tensor nor a ``PerturbationMemory.at(...)`` warm start.

    Examples:
        The recommended form (the default): regularise what the SSL loss compares,
        and feed the loss the adversarial embedding:

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> model = nn.Sequential(backbone, nn.Linear(8, 4))  # backbone + projection head
        >>> reg = RobustnessRegularizer(epsilon=0.1)
        >>> x0, x1 = torch.rand(16, 1, 28, 28), torch.rand(16, 1, 28, 28)  # two views of a batch
        >>> z0, z1 = model(x0), model(x1)
        >>> out = reg(model, x1, features=z1, positive=z0)
        >>> ssl_loss = (z0 - out.adversarial_features).pow(2).mean()  # stand-in for NT-Xent, BYOL, ...
        >>> (ssl_loss + 1.0 * out.loss).backward()
        >>> float(reg.last_stats.value) >= 0
        True

        The paper's form on backbone features, with no ``positive``, is
        :class:`BackboneRobustnessRegularizer`.
    """

    def __init__(
        self,
        epsilon: float | None = None,
        *,
        threat: ThreatModel | None = None,
        norm: str | None = None,
        inner: str | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        detach_anchor: bool = False,
        gather_distributed: bool = False,
        stochastic_modules: Sequence[type] = (),
        **deprecated: object,
    ) -> None:
        super().__init__()
        form = self._form(deprecated)
        research = _research_options(deprecated, type(self).__name__)
        random_start, relative = research.get("random_start", True), research.get("relative", True)
        normalize_features, ascent = research.get("normalize_features"), research.get("ascent")
        batch_norm = research.get("batch_norm", "batch")
        self.threat = resolve_threat(threat, epsilon, norm, deprecated, where=type(self).__name__)
        self.form = form
        form_normalize, form_ascent = _FORMS[form]
        normalize_features = form_normalize if normalize_features is None else normalize_features
        ascent = form_ascent if ascent is None else ascent
        # "n-fgsm-start" is N-FGSM whose noisy pass is also the penalty's anchor
        self.anchor = "start" if inner == "n-fgsm-start" else "clean"
        self.inner = self._resolve_inner(
            "n-fgsm" if inner == "n-fgsm-start" else inner, steps, step_size, bool(random_start)
        )
        self.steps = _check_steps(1 if self.inner == "n-fgsm" else 3 if steps is None else steps)
        self.step_size = _check_step_size(step_size)  # N-FGSM's is epsilon (of the threat at the call)
        self.random_start = bool(random_start)
        self.relative = bool(relative)
        self.normalize_features = bool(normalize_features)
        types = tuple(stochastic_modules)
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError(f"stochastic_modules must be nn.Module subclasses, got {types!r}")
        self.stochastic_modules = types
        if batch_norm not in _BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {_BATCH_NORM_MODES}, got {batch_norm!r}")
        self.batch_norm = batch_norm
        self.gather_distributed = bool(gather_distributed)
        self.detach_anchor = bool(detach_anchor)
        if ascent not in _ASCENTS:
            raise ValueError(f"ascent must be one of {_ASCENTS}, got {ascent!r}")
        if ascent == "deviation" and not self.random_start and self.steps > 0:
            # The deviation from the clean features has zero gradient at the clean input.
            raise ValueError("random_start=False with ascent='deviation' never leaves x: start at random")
        self.ascent = ascent
        self._warned_stochastic = False
        self._warned_ball = False  # the threat's warnings (a ball that looks the wrong size): once per regulariser
        self.last_stats: RegularizerStats | None = None

    _FORM = "embedding"
    # A positive equal in value to the features is a swapped view in an SSL loop; harden's student starts as a copy
    # of its teacher, so there equal values are expected at first (harden turns the check off on its own instance).
    _refuse_equal_positive = True

    def _resolve_inner(self, inner: str | None, steps: int | None, step_size: float | None, random_start: bool) -> str:
        """``inner``, checked against the settings it takes (``steps`` and ``step_size`` are PGD's); ``None``:
        the measured default where it was measured, PGD where PGD's settings are given or N-FGSM was not measured."""
        if inner is None:
            pgd = steps is not None or step_size is not None or not random_start or self._FORM != "embedding"
            measured = self.threat.norm == "linf" and _N_FGSM_REACH * self.threat.epsilon <= 0.5
            return "pgd" if pgd or not measured else "n-fgsm"
        if inner not in _INNERS:
            raise ValueError(f"inner must be one of {_INNERS}, got {inner!r}")
        if inner == "n-fgsm":
            if steps not in (None, 1) or step_size is not None:
                raise ValueError(
                    "inner='n-fgsm' takes one step of epsilon from noise of 2 * epsilon; steps= and step_size= set "
                    f"the multi-step ascent: pass inner='pgd' with them (got steps={steps!r}, step_size={step_size!r})"
                )
            if not random_start:
                raise ValueError("inner='n-fgsm' starts from noise: random_start=False needs inner='pgd'")
            if self.threat.norm == "linf" and _N_FGSM_REACH * self.threat.epsilon > 0.5:
                raise ValueError(
                    f"inner='n-fgsm' searches {_N_FGSM_REACH} * epsilon, above half the pixel range for an L-inf "
                    f"epsilon of {self.threat.epsilon:g}: pass inner='pgd' for so large a ball"
                )
        return inner

    @property
    def _ascent_threat(self) -> ThreatModel:
        """The ball the ascent searches: the threat's, or N-FGSM's wider one (its start's noise plus one step).
        Read at each call: an adapter's eps ramp replaces ``threat`` between epochs."""
        if self.inner == "pgd":
            return self.threat
        return replace(self.threat, epsilon=_N_FGSM_REACH * self.threat.epsilon)

    def _training_attack(self, objective: Callable[[Tensor], Tensor], x: Tensor, start: Tensor | None) -> Tensor:
        """The inner maximisation from ``start`` (``None``: its own start), in the ball it searches."""
        step_size = self.threat.epsilon if self.inner == "n-fgsm" else self.step_size
        if start is None and self.inner == "n-fgsm":
            # N-FGSM's start: uniform noise in a ball of 2 eps (a uniform draw of 2 eps, clipped to the range).
            pixels = _working_pixels(self.threat, x.detach())
            noise = replace(self.threat, epsilon=(_N_FGSM_REACH - 1) * self.threat.epsilon)
            start = noise.random_start(pixels).to(x.dtype)
        return projected_gradient_ascent(
            objective,
            x,
            self._ascent_threat,
            steps=self.steps,
            step_size=step_size,
            random_start=self.random_start,
            start=start,
        )

    def _form(self, options: dict) -> str:
        """This class's form; 0.2's ``form=`` popped from ``options`` (warned)."""
        if "form" not in options:
            return self._FORM
        form = options.pop("form")
        if form not in _FORMS:
            raise ValueError(f"form must be one of {tuple(_FORMS)}, got {form!r}")
        if form != self._FORM:  # RobustnessRegularizer.__new__ built the backbone class for form="backbone"
            raise ValueError(f"form={form!r} does not fit {type(self).__name__}, whose form is {self._FORM!r}")
        new = "BackboneRobustnessRegularizer(...)" if form == "backbone" else "RobustnessRegularizer(...) alone"
        warn_deprecated(f"RobustnessRegularizer(form={form!r})", f"use {new}", stacklevel=4)
        return form

    @classmethod
    def from_threat_model(cls, threat: ThreatModel, **options: Any) -> RobustnessRegularizer:
        """Deprecated since 0.3.0 (goes in 0.4.0): ``RobustnessRegularizer(threat=threat, **options)``."""
        warn_deprecated(
            "RobustnessRegularizer.from_threat_model(threat, ...)", "use RobustnessRegularizer(threat=threat, ...)"
        )
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
        return cls(threat=threat, **options)

    @property
    def epsilon(self) -> float:
        return self.threat.epsilon

    @property
    def norm(self) -> str:
        return self.threat.norm

    def extra_repr(self) -> str:
        t = self.threat
        parts = [f"epsilon={t.epsilon:.6g}", f"norm={t.norm!r}"]
        inner = "n-fgsm-start" if self.anchor == "start" else self.inner
        parts.append(f"steps={self.steps}" if self.inner == "pgd" else f"inner={inner!r}")
        if self.inner == "pgd" and self.step_size is not None:
            parts.append(f"step_size={self.step_size:.6g}")
        if not self.random_start:
            parts.append("random_start=False")
        if not self.relative:
            parts.append("relative=False")
        if t.normalized:
            parts.append(f"mean={t.mean}, std={t.std}")
        if t.bounds != (0.0, 1.0):
            parts.append(f"bounds={t.bounds}")
        form_normalize, form_ascent = _FORMS[self.form]
        if self.normalize_features != form_normalize:
            parts.append(f"normalize_features={self.normalize_features}")
        if self.batch_norm != "batch":
            parts.append(f"batch_norm={self.batch_norm!r}")
        if self.detach_anchor:
            parts.append("detach_anchor=True")
        if self.ascent != form_ascent:
            parts.append(f"ascent={self.ascent!r}")
        return ", ".join(parts)

    def forward(
        self,
        encoder: Callable[[Tensor], Tensor],
        x: Tensor,
        features: Tensor | None = None,
        *,
        positive: Tensor | None,
        start: Tensor | WarmStart | None = None,
        **deprecated: object,
    ) -> RegularizerOutput:
        """Estimate the regulariser on a batch.

        Args:
            encoder: The model ``f`` (an ``nn.Module`` or any callable returning
                ``(N, ...)`` features): in the default form what the SSL loss compares.
                Pass the bare module, not a ``DistributedDataParallel`` wrapper.
            x: The (augmented) batch, in the space the encoder takes.
            features: ``encoder(x)`` if already computed (reused, not recomputed).
            positive: Required: the other view's embedding of each sample, the
                positive the SSL loss aligns ``x`` with; the ascent moves ``x``'s
                features away from it. Treated as a constant. Not ``features`` itself.
                (No positive: the paper's form, ``BackboneRobustnessRegularizer``.)
            start: Where the ascent starts instead of a uniform draw in the ball:
                a perturbation in pixel units, shape of ``x``, projected onto the
                ball and the valid range; or a warm start kept for you,
                ``memory.at(index)`` of a ``PerturbationMemory`` (ATTA: Zheng et al.,
                CVPR 2020): each sample starts where its last ascent ended
                (samples not stored yet at random), and where this ascent ends is
                written back once the call has succeeded. ``memory.at(index,
                geometry)`` with each view's crop (``crop_geometry``) keeps the
                perturbation in image coordinates and moves it with the crop.
            **deprecated: 0.2's ``return_adversarial=False`` (use ``out.loss``) and
                ``memory=``, ``index=``, ``geometry=`` (use
                ``start=memory.at(index, geometry)``), each with a
                ``DeprecationWarning`` until 0.4.0.

        Returns:
            A ``RegularizerOutput``: ``out.loss`` goes into the loss,
            ``out.adversarial_features`` into the SSL loss in place of the
            perturbed view's clean embedding.
        """
        return self._run(encoder, x, features, positive, start, deprecated)

    def _run(
        self,
        encoder: Callable[[Tensor], Tensor],
        x: Tensor,
        features: Tensor | None,
        positive: Tensor | None,
        start: Tensor | WarmStart | None,
        deprecated: dict[str, Any],
    ) -> RegularizerOutput:
        """The call of either form, one frame below each ``forward`` (the deprecation warnings' stack depth)."""
        start, value_only = self._legacy_call(start, deprecated)
        self._check_call(encoder, x, features, positive)
        if self.anchor == "start" and (features is not None or start is not None):
            given = "features=" if features is not None else "start="
            raise ValueError(
                f"inner='n-fgsm-start' takes the anchor in the pass at the ascent's own noisy start, which replaces "
                f"the view's clean pass: drop {given} (or build the regulariser with inner='n-fgsm')"
            )
        warm: WarmStart | None = None
        begin: Tensor | None = None
        if isinstance(start, WarmStart):
            if self.inner == "n-fgsm":
                raise ValueError(
                    "a warm start carries a multi-step ascent's end point to the sample's next visit; inner='n-fgsm' "
                    "(the default for this ball) starts from fresh noise: build the regulariser with a multi-step "
                    "ascent to warm-start it, e.g. steps=2, step_size=epsilon / 2 (the measured warm-start form)"
                )
            warm = start
            origin, begin = self._read_warm_start(warm, x)
        else:
            _check_start(start, x)
            begin = start
        module = encoder if isinstance(encoder, nn.Module) else nn.Module()
        with preserved_state(module):
            switched = self._make_deterministic(module)
            if switched and features is not None:
                self._warn_recompute(switched)
                features = None  # computed with those layers on: recomputed without them
            first = self._first_iterate(x) if features is None and begin is None else None
            # The first iterate's pass keeps its graph even under no_grad: its input gradient is the first step.
            with torch.enable_grad() if first is not None else contextlib.nullcontext():
                if features is None:
                    features = self._clean_pass(encoder, x, first, positive)
                anchor = self._anchor(features, positive)
            x_adv = self._inner_max(encoder, x, anchor, begin, first)
            adv_features = encoder(x_adv)
            value, deviation, per_sample = self._penalty(adv_features, anchor)
        if warm is not None:  # where each ascent ended, for the next visit of the sample
            warm.memory.write(warm.index, self.threat.to_pixels(x_adv.detach()) - origin, warm.geometry)
        self.last_stats = RegularizerStats(
            value=value.detach(),
            mean_squared_deviation=deviation.detach(),
            mean_deviation=per_sample.detach().sqrt().mean(),
            variance=anchor.spread.detach(),
        )
        out = RegularizerOutput(value, x_adv, adv_features)
        if value_only:  # 0.2's return_adversarial=False, until 0.4.0
            return out.loss  # type: ignore[return-value]
        return out

    def _legacy_call(
        self, start: Tensor | WarmStart | None, deprecated: dict[str, Any]
    ) -> tuple[Tensor | WarmStart | None, bool]:
        """0.2's call spellings: ``return_adversarial=`` and ``memory=``/``index=``/``geometry=`` (warned)."""
        value_only = False
        if "return_adversarial" in deprecated:
            value_only = not deprecated.pop("return_adversarial")
            warn_deprecated(
                "reg(..., return_adversarial=...)",
                "the call always returns a RegularizerOutput: use out.loss for the value",
                stacklevel=7,  # past _run, forward and nn.Module.__call__'s frames, to the user's line
            )
        legacy = {k: deprecated.pop(k) for k in ("memory", "index", "geometry") if k in deprecated}
        if deprecated:
            raise TypeError(f"forward() got unexpected keyword argument(s) {', '.join(sorted(deprecated))}")
        if not legacy:
            return start, value_only
        warn_deprecated(
            f"reg(..., {', '.join(f'{k}=' for k in legacy)}...)", "pass start=memory.at(index, geometry)", stacklevel=7
        )
        self._check_memory(legacy.get("memory"), legacy.get("index"), start)
        return legacy["memory"].at(legacy["index"], legacy.get("geometry")), value_only

    def _read_warm_start(self, warm: WarmStart, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(origin, start)``: the clean pixels the perturbation is from, and each sample's stored perturbation
        (a uniform draw for samples not stored yet, as without a warm start)."""
        if not isinstance(warm.memory, PerturbationMemory):
            raise TypeError(f"start's memory must be a PerturbationMemory, got {type(warm.memory).__name__}")
        origin = self.threat.to_pixels(x.detach()).clamp(*self.threat.bounds)
        fill = (lambda: self.threat.random_start(origin)) if self.random_start else None
        return origin, warm.memory.read(warm.index, origin, warm.geometry, fill=fill)

    def _make_deterministic(self, module: nn.Module) -> list[nn.Module]:
        """Put random layers (and BatchNorm with ``batch_norm="running"``) in eval mode for this call's passes
        (restored by ``preserved_state``); the layers switched."""
        switched = active_stochastic_layers(module, self.stochastic_modules)
        if self.batch_norm == "running":
            switched += [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training]
        for layer in switched:
            layer.training = False
        return switched

    def _first_iterate(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(pixels, delta)`` when the view's pass can double as the ascent's first one: the clean pass when the
        ascent starts at ``x``, or the pass at N-FGSM's noisy start with ``inner="n-fgsm-start"``."""
        if self.anchor == "start":  # N-FGSM's noise of 2 eps
            pixels = _working_pixels(self.threat, x.detach())
            noise = replace(self.threat, epsilon=(_N_FGSM_REACH - 1) * self.threat.epsilon)
            return pixels, noise.random_start(pixels).requires_grad_(True)
        if self.random_start or self.steps == 0 or self.epsilon == 0 or not torch.is_grad_enabled() or x.requires_grad:
            return None
        pixels = _working_pixels(self.threat, x.detach())
        return pixels, torch.zeros_like(pixels, requires_grad=True)

    def _clean_pass(
        self,
        encoder: Callable[[Tensor], Tensor],
        x: Tensor,
        first: tuple[Tensor, Tensor] | None,
        positive: Tensor | None,
    ) -> Tensor:
        """``encoder(x)``, checked (finite; not ``positive`` itself); through the ascent's first iterate when it starts
        at ``x`` (one pass for both)."""
        features = encoder(x) if first is None else encoder(self.threat.to_model(first[0] + first[1]).to(x.dtype))
        h = _flatten(features, "encoder(x)")
        checks = [torch.isfinite(h).all()]
        if positive is not None and positive.shape == features.shape and self._refuse_equal_positive:
            checks.append((positive == features).all())
        finite, *same = torch.stack(checks).tolist()  # one host synchronisation
        if not finite:
            raise ValueError("encoder(x) returned non-finite features")
        if same and same[0]:
            raise _same_view_error("encoder(x)")
        return features

    def _anchor(self, features: Tensor, positive: Tensor | None) -> _Anchor:
        """The clean features as measured, the penalty's anchor, the spread and the ascent's score."""
        clean = self._measure(_flatten(features, "features"))
        h = clean.detach() if self.detach_anchor else clean
        gather = _all_gather if self.gather_distributed and _distributed() else (lambda t: t)
        spread = _spread(gather(h))
        target = h.detach()
        if positive is not None:
            _check_widths(target, positive, "encoder(x)")
        ascent_target = target if positive is None else self._measure(_flatten(positive, "positive")).detach()
        # Scaling the inner objective by the spread keeps its gradients O(1) whatever the feature scale (helps fp16
        # autocast); argmax unchanged.
        spread_d = spread.detach()
        scale = torch.where(spread_d > 0, 1.0 / spread_d.clamp_min(torch.finfo(spread_d.dtype).tiny), 1.0)

        def score(z: Tensor) -> Tensor:
            if self.ascent == "instance":
                return _instance_confusion(z, target)
            return (z - ascent_target).pow(2).sum(dim=1) * scale

        return _Anchor(clean, h, spread, gather, score)

    def _inner_max(
        self, encoder: Callable, x: Tensor, anchor: _Anchor, start: Tensor | None, first: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """The deviation-maximising inputs (model space, detached): projected ascent on the anchor's score."""

        def objective(inputs: Tensor) -> Tensor:
            return anchor.score(self._measure(_flatten(encoder(inputs), "encoder output")))

        if first is None:
            return self._training_attack(objective, x, start)
        pixels, delta = first  # the view's pass was the first iterate: its gradient is the first step's
        if self.steps == 0:
            return self.threat._cast_like(self.threat.to_model(pixels + delta.detach()), x).detach()
        with torch.enable_grad():  # the score of the anchor's pass (with its graph, see _run)
            (grad,) = torch.autograd.grad(anchor.score(anchor.clean).sum(), delta, retain_graph=True)
        step_size = self.threat.epsilon if self.inner == "n-fgsm" else self.step_size
        alpha = _step_length(self.threat, self.steps, step_size)
        threat = self._ascent_threat
        delta = threat.project(pixels, threat.ascent_step(delta.detach(), grad, alpha))
        return _ascend(objective, pixels, delta, threat, self.steps - 1, alpha, like=x)

    def _penalty(self, adv_features: Tensor, anchor: _Anchor) -> tuple[Tensor, Tensor, Tensor]:
        """``(value, mean squared deviation, per-sample squared deviation)`` of the perturbed features."""
        z = self._measure(_flatten(adv_features, "encoder output"))
        if z.shape != anchor.h.shape:
            raise ValueError(
                f"encoder output on perturbed inputs has shape {tuple(z.shape)}, expected {tuple(anchor.h.shape)}"
            )
        per_sample = (z - anchor.h).pow(2).sum(dim=1)
        deviation = anchor.gather(per_sample).mean()
        return (_relative(deviation, anchor.spread) if self.relative else deviation), deviation, per_sample

    @staticmethod
    def _check_memory(memory: object, index: object, start: object) -> None:
        """The warm start's arguments belong together (their values are checked by ``memory.read``)."""
        if memory is None:
            name = "index" if index is not None else "geometry"
            raise ValueError(f"{name} is only used with memory=; pass memory=PerturbationMemory(...) too")
        if not isinstance(memory, PerturbationMemory):
            raise TypeError(f"memory must be a PerturbationMemory, got {type(memory).__name__}")
        if index is None:
            raise ValueError("memory needs index=: each sample's index in the training set (the dataset yields it)")
        if start is not None:
            raise ValueError("pass either start= or memory= (which supplies the start), not both")

    def _warn_recompute(self, switched: list[nn.Module]) -> None:
        if self._warned_stochastic:
            return
        self._warned_stochastic = True
        kinds = ", ".join(sorted({type(m).__name__ for m in switched}))
        warnings.warn(
            f"RobustnessRegularizer: the encoder has layers in training mode that the regulariser runs in eval "
            f"mode ({kinds}), so the features= passed in were computed differently; the clean features are "
            "recomputed with those layers in eval mode (one extra forward per call) so that the deviation "
            "measures the perturbation only",
            stacklevel=6,  # past _run, forward and nn.Module.__call__, to the user's line
        )

    def _check_positive(self, x: Tensor, positive: Tensor | None, features: Tensor | None) -> None:
        if self.ascent == "positive" and positive is None:
            raise ValueError(
                "positive= is missing: the default (recommended) form regularises the embedding the SSL loss compares "
                "and searches away from the other view's. Either pass the other view's embedding, "
                "reg(model, x1, features=z1, positive=z0), or choose the paper's form on backbone features, which "
                "needs none: BackboneRobustnessRegularizer(epsilon)"
            )
        if self.ascent != "positive" and positive is not None:
            raise ValueError(
                f"positive= is used by ascent='positive' only (this regulariser has ascent={self.ascent!r})"
                if self.form == "embedding"
                else "positive= is not taken by BackboneRobustnessRegularizer (the deviation from the clean backbone "
                "features is maximised); for the embedding form with a positive use RobustnessRegularizer"
            )
        if positive is None:
            return
        if not isinstance(positive, Tensor) or not positive.is_floating_point():
            raise TypeError(f"positive must be a floating-point Tensor, got {type(positive).__name__}")
        if positive.dim() == 0 or positive.shape[0] != x.shape[0]:
            raise ValueError(f"positive must hold one row per sample of x ({x.shape[0]}), got {tuple(positive.shape)}")
        if features is not None:
            _check_widths(_flatten(features, "features"), positive, "features=")

    def _measure(self, flat: Tensor) -> Tensor:
        """Features as the deviation is measured: float32, unit length per sample if asked."""
        flat = flat.float()
        return F.normalize(flat, dim=1) if self.normalize_features else flat

    def _check_call(self, encoder: object, x: object, features: Tensor | None, positive: Tensor | None) -> None:
        """Every check of a call before any forward: arguments, the ball against the batch (``ThreatModel``),
        a model with nothing to train; the data-dependent ones read back in one host synchronisation."""
        if not callable(encoder):
            raise TypeError(f"encoder must be callable (an nn.Module), got {type(encoder).__name__}")
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        self.threat._check_batch(x, "x", "epsilon", warn=not self._warned_ball)
        if self.relative and x.shape[0] < 2:
            raise ValueError(
                "x must hold at least 2 samples with relative=True: the feature spread of one sample is undefined"
            )
        self._check_positive(x, positive, features)
        _check_trainable(encoder, features)
        extremes = self.threat._extremes(x)
        checks = [extremes.flatten()]
        if features is not None:
            h = _flatten(features, "features")
            if h.shape[0] != x.shape[0]:
                raise ValueError(f"features has batch size {h.shape[0]} but x has {x.shape[0]}")
            if positive is features:
                raise _same_view_error("features=")
            checks.append(torch.isfinite(h).all()[None].float())
            if positive is not None and positive.shape == features.shape and self._refuse_equal_positive:
                checks.append((positive == features).all()[None].float())
        values = torch.cat([c.to(extremes.device) for c in checks]).tolist()  # one host synchronisation
        n = extremes.numel()
        self.threat._check_extremes([values[: n // 2], values[n // 2 : n]], x.dtype, "x", not self._warned_ball)
        self._warned_ball = True
        if features is not None and not values[n]:
            raise ValueError("features contains non-finite values (nan or inf)")
        if len(values) > n + 1 and values[n + 1]:
            raise _same_view_error("features=")


class BackboneRobustnessRegularizer(RobustnessRegularizer):
    """The paper's form: the worst-case deviation of backbone features, with no positive.

    The regulariser of :class:`RobustnessRegularizer` on an encoder's raw features (not
    normalised), its ascent maximising the deviation from the clean features themselves:
    the quantity ``R_eps`` that :func:`~robust_reg.estimate_bound` measures. Measured far
    weaker than the default as a training signal (docs: Results); use it to regularise a
    backbone whose SSL loss has no positive pair, or to train the quantity the bound reads.
    It takes the same arguments and keeps the same execution policy.

    Args:
        epsilon: The ball's radius, a fraction of the pixel range (as ``RobustnessRegularizer``).
        threat: The whole ball instead (``ThreatModel``).
        norm: With ``epsilon``: ``"linf"`` or ``"l2"``.
        inner: ``"pgd"`` (the default here: N-FGSM was not measured on this form) or ``"n-fgsm"``.
        steps: Ascent steps of the inner maximisation.
        step_size: Ascent step, in the units of ``epsilon``.
        detach_anchor: The clean features as a constant target.
        gather_distributed: Spread and deviation over the global batch under DDP.
        stochastic_modules: Further module types made deterministic during the passes.

    Shape:
        - The call: ``forward(encoder, x, features=None, *, start=None)``, a ``RegularizerOutput`` as
          ``RobustnessRegularizer``'s, with no ``positive``.

    Raises:
        ValueError: As ``RobustnessRegularizer``; ``positive=`` is refused by name.
        TypeError: As ``RobustnessRegularizer``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> reg = BackboneRobustnessRegularizer(epsilon=0.1)
        >>> x0 = torch.rand(16, 1, 28, 28)
        >>> h = backbone(x0)
        >>> (h.pow(2).mean() + 0.5 * reg(backbone, x0, features=h).loss).backward()
    """

    _FORM = "backbone"

    def forward(  # type: ignore[override]  # the paper's form takes no positive
        self,
        encoder: Callable[[Tensor], Tensor],
        x: Tensor,
        features: Tensor | None = None,
        *,
        start: Tensor | WarmStart | None = None,
        **deprecated: object,
    ) -> RegularizerOutput:
        """Estimate the regulariser on a batch: ``encoder``, ``x``, ``features`` and ``start`` as
        :meth:`RobustnessRegularizer.forward`; no ``positive``."""
        # No positive in the signature: one passed anyway is refused by name in _check_positive (or used by 0.2's
        # deprecated ascent="positive").
        positive = cast("Tensor | None", deprecated.pop("positive", None))
        return self._run(encoder, x, features, positive, start, deprecated)


def _same_view_error(source: str) -> ValueError:
    return ValueError(
        f"positive= equals {source}: pass the other view's embedding as positive (reg(model, x1, features=z1, "
        "positive=z0), z0 = model(x0) of the other augmentation), not the embedding of the view being perturbed"
    )


def _check_trainable(encoder: object, features: object) -> None:
    """A module with no trainable parameter (and no features carrying gradients) gives a loss with nothing to
    train: say so at the call rather than let ``backward`` fail with 'does not require grad'."""
    if not isinstance(encoder, nn.Module) or not torch.is_grad_enabled():
        return
    if isinstance(features, Tensor) and features.requires_grad:
        return
    if any(p.requires_grad for p in encoder.parameters()):
        return
    frozen = "has no parameters" if next(encoder.parameters(), None) is None else "has every parameter frozen"
    raise ValueError(
        f"encoder {frozen} (requires_grad=False): the regulariser's loss would train nothing and backward would "
        "fail; pass the model being trained (unfreeze it with model.requires_grad_(True)), or call the regulariser "
        "under torch.no_grad() to measure it only"
    )
