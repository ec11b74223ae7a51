"""Watch a robust training run for catastrophic overfitting.

A cheap inner maximisation (one ascent step, FGSM-RS and its kin) can collapse: the network learns to
defeat that one attack while a multi-step attack still moves its features far (Wong et al., ICLR 2020,
"Fast is better than free"; de Jorge et al., NeurIPS 2022). The training loss then looks robust and is
not. ``CollapseMonitor`` re-attacks a small fixed batch, once per epoch, twice: with the regulariser's own
ascent (N-FGSM's noise and step, or PGD's steps) and with a stronger one (more, smaller steps in the threat's
ball), and warns when the stronger attack finds far more deviation than the training one. Both maximise the
deviation of the features (measured as the regulariser measures them) from their clean value, relative to the batch's
spread; both are estimates of the worst case from below.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._state import preserved_state
from ._utils import module_device
from .attacks import projected_gradient_ascent
from .regularizer import RobustnessRegularizer

__all__ = ["CollapseMonitor", "CollapseReport"]


@dataclass(frozen=True)
class CollapseReport:
    """One check: the relative deviation each attack found on the monitor batch (estimates from below).

    Attributes:
        epoch: The epoch the check was made for (as passed), or ``None``.
        training_attack: Found by the regulariser's own ascent (its inner maximisation).
        strong_attack: Found by ``strong_steps`` smaller steps in the threat's ball.
        ratio: ``strong_attack / training_attack``.
        collapsed: The stronger attack found more than ``tolerance`` times the training one.

    Examples:
        >>> print(CollapseReport(4, 0.08, 0.59, 7.4, True))  # doctest: +ELLIPSIS
        epoch 4: deviation* found by the training attack 0.08, by the stronger one 0.59 (x7.40)  <- the ...
    """

    epoch: int | None
    training_attack: float
    strong_attack: float
    ratio: float
    collapsed: bool

    def __str__(self) -> str:
        when = f"epoch {self.epoch}: " if self.epoch is not None else ""
        flag = "  <- the training attack no longer finds the worst case" if self.collapsed else ""
        return (
            f"{when}deviation* found by the training attack {self.training_attack:.4g}, by the stronger one "
            f"{self.strong_attack:.4g} (x{self.ratio:.2f}){flag}"
        )


class CollapseMonitor:
    """Re-attack a fixed batch each epoch with the training attack and a stronger one; warn when they part.

    Args:
        regularizer: The regulariser being trained with: its inner maximisation, its ball and how it measures
            features (normalised in the embedding form). With the default N-FGSM step (reaching 3 eps),
            30-epoch default runs of the examples' training loop with the monitor had ratios of 0.10-0.57
            (MNIST, eps 0.1) and 1.16-1.25 (the CIFAR-10 subset, 8/255) at every epoch.
        images: A small fixed batch (e.g. 256 training images, without augmentation), in the space the
            encoder takes; at least 2 samples.
        strong_steps: Steps of the stronger attack (step ``2.5 * epsilon / strong_steps``).
        tolerance: Warn when the stronger attack finds more than this many times the training attack's
            deviation (> 1).
        floor: Below this relative deviation the stronger attack's finding counts as nothing (no warning
            about noise on an already flat encoder).

    Raises:
        TypeError: ``regularizer`` is not a ``RobustnessRegularizer``; ``images`` is not a floating-point
            tensor.
        ValueError: Fewer than 2 images, images outside the regulariser's ball's range
            (``ThreatModel.check_inputs``), ``strong_steps < 1``, ``tolerance <= 1`` or a negative ``floor``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from robust_reg import RobustnessRegularizer
        >>> _ = torch.manual_seed(0)
        >>> encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
        >>> monitor = CollapseMonitor(RobustnessRegularizer(0.1), torch.rand(32, 1, 8, 8))
        >>> report = monitor(encoder, epoch=0)  # after each epoch of training
        >>> report.collapsed
        False
    """

    def __init__(
        self,
        regularizer: RobustnessRegularizer,
        images: Tensor,
        *,
        strong_steps: int = 10,
        tolerance: float = 2.0,
        floor: float = 1e-3,
    ) -> None:
        if not isinstance(regularizer, RobustnessRegularizer):
            raise TypeError(f"regularizer must be a RobustnessRegularizer, got {type(regularizer).__name__}")
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {type(images).__name__}")
        if images.dim() == 0 or images.shape[0] < 2:
            raise ValueError("images must hold at least 2 samples: the deviation is relative to their spread")
        _check_options(strong_steps=strong_steps, tolerance=tolerance, floor=floor)
        regularizer.threat.check_inputs(images, "images")
        self.regularizer = regularizer
        self.images = images.detach()
        self.strong_steps, self.tolerance, self.floor = strong_steps, float(tolerance), float(floor)
        self.history: list[CollapseReport] = []
        self._warned = False

    def __call__(self, encoder: nn.Module, epoch: int | None = None) -> CollapseReport:
        """Attack the monitor batch through ``encoder`` (in eval mode; its state, flags and the global random
        state are left as they were) and record, return and, on a collapse, warn (once)."""
        reg = self.regularizer
        device = module_device(encoder)
        x = self.images.to(device)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), preserved_state(encoder, eval_mode=True):
            with torch.no_grad():
                clean = self._measure(encoder(x))
            spread = (clean - clean.mean(dim=0, keepdim=True)).pow(2).sum(dim=1).mean()

            def deviation(inputs: Tensor) -> Tensor:
                return (self._measure(encoder(inputs)) - clean).pow(2).sum(dim=1)

            torch.manual_seed(0)  # the same draws at every check: the epochs differ by the encoder only
            weak = reg._training_attack(deviation, x, None)
            # In the threat's ball, the one robustness is claimed for (N-FGSM's own step reaches 3 eps); a collapse
            # shows as the eps-ball attack finding far more than the training step.
            strong = projected_gradient_ascent(deviation, x, reg.threat, steps=self.strong_steps)
            with torch.no_grad():
                tiny = torch.finfo(spread.dtype).tiny
                found = [(deviation(adv).mean() / spread.clamp_min(tiny)).item() for adv in (weak, strong)]
        training, stronger = found
        ratio = stronger / training if training > 0 else math.inf
        report = CollapseReport(epoch, training, stronger, ratio, stronger > self.floor and ratio > self.tolerance)
        self.history.append(report)
        if report.collapsed and not self._warned:
            self._warned = True
            warnings.warn(
                f"CollapseMonitor: {report}. The training attack may have collapsed (catastrophic overfitting): "
                f"{self._remedy()}",
                RuntimeWarning,
                stacklevel=2,
            )
        return report

    def _remedy(self) -> str:
        """The fix to suggest, for the regulariser's own inner maximisation."""
        reg = self.regularizer
        if reg.inner == "n-fgsm":
            return "train with the multi-step ascent, RobustnessRegularizer(..., inner='pgd') (3 steps)"
        more = "more ascent steps (steps=)" + ("" if reg.random_start else ", a random start (random_start=True)")
        return f"train with {more} or a smaller step size (step_size=)"

    def _measure(self, features: Tensor) -> Tensor:
        flat = features.flatten(1).float()
        return F.normalize(flat, dim=1) if self.regularizer.normalize_features else flat


def _check_options(*, strong_steps: int = 10, tolerance: float = 2.0, floor: float = 1e-3) -> None:
    """``CollapseMonitor``'s settings, checked (also before training by the adapters' callback)."""
    if isinstance(strong_steps, bool) or not isinstance(strong_steps, int) or strong_steps < 1:
        raise ValueError(f"strong_steps must be an int >= 1, got {strong_steps!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance > 1):
        raise ValueError(f"tolerance must be a number > 1, got {tolerance!r}")
    if not (isinstance(floor, (int, float)) and floor >= 0):
        raise ValueError(f"floor must be a number >= 0, got {floor!r}")
