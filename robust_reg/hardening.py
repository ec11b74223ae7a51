"""Harden an encoder that is already pretrained: a short, label-free stage against a frozen copy of itself.

Most people who need a robust backbone already have a pretrained one. ``harden`` trains a copy of it
(the student) so that its features of a worst-case perturbed input stay where the original's (the
teacher's) features of the clean input are, with the regulariser's ascent and ball: per batch,

    reg  = RobustnessRegularizer(threat, steps=3, detach_anchor=True)
    out  = reg(student, x, features=student(x), positive=teacher(x))
    loss = (2 - 2 cos(out.adversarial_features, teacher(x))).mean() + weight * out.loss

that is, robust-reg's recommended step with the frozen teacher's embedding in place of the other
view's. The ascent searches away from the teacher's features; the alignment pulls the perturbed
student's back onto them (FARE's objective, Schlarmann et al., ICML 2024, on the cosine), and the
penalty keeps the student's perturbed features near its clean ones (robust-reg's). DeACL (Zhang et al.,
ECCV 2022) distils from the same frozen teacher with an extra clean term. The caller's encoder is the
teacher and is never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._state import preserved_state
from ._utils import module_device, progress
from .attacks import ThreatModel, resolve_threat
from .finetune import FinetuneSchedule
from .regularizer import RobustnessRegularizer

__all__ = ["HARDEN_CPU", "harden"]

# SGD (momentum 0.9) at a constant rate, the regulariser's 3 ascent steps. The rate is large because the
# stage's losses are cosines of embeddings, whose gradients shrink with the features' norm: lr 2.0 was the best
# of 0.005-8 on the small CNN of the CIFAR-10 subset (validation split, one seed; the post-hoc benchmark's
# screen, benchmarks/results/screen-cifar10-subset/posthoc-harden-seed0). Another encoder may want another.
HARDEN_CPU = FinetuneSchedule(epochs=10, lr=2.0, milestones=(), steps=3)


@dataclass
class _Teacher:
    """The frozen original: its features of a batch, computed once per batch of a fixed list of batches
    without augmentation (cached), else at each step (one forward without gradient, eval mode)."""

    encoder: nn.Module
    cacheable: bool
    cache: dict[int, Tensor]

    def features(self, i: int, x: Tensor) -> Tensor:
        if self.cacheable and i in self.cache:
            return self.cache[i]
        with preserved_state(self.encoder, eval_mode=True), torch.no_grad():
            z = self.encoder(x).flatten(1)
        if self.cacheable:
            self.cache[i] = z
        return z


def harden(
    encoder: nn.Module,
    loader: Iterable,
    *,
    epsilon: float | None = None,
    threat: ThreatModel | None = None,
    norm: str | None = None,
    weight: float = 1.0,
    schedule: FinetuneSchedule = HARDEN_CPU,
    augment: Callable[[Tensor], Tensor] | None = None,
    ssl_loss: Callable[[nn.Module, Tensor], Tensor] | None = None,
    device: str | torch.device | None = None,
    progress_bar: bool = False,
) -> nn.Module:
    """Make a pretrained encoder robust without labels: train a copy against the frozen original.

    Args:
        encoder: The pretrained encoder (an ``nn.Module`` whose output is flattened per sample): the
            teacher. Its weights, BatchNorm statistics, modes and flags are left as they were.
        loader: Yields batches ``x`` or ``(x, ...)`` (labels, if any, are ignored), in the space the
            encoder takes (normalised as ``threat`` says). A list of batches with no ``augment`` has the
            teacher's features computed once per batch; anything else, once per step.
        epsilon: Radius of the ball, a fraction of the pixel range (the shorthand for
            ``threat=ThreatModel(epsilon, norm=norm)``).
        threat: The whole ball instead (radius, norm, the inputs' ``mean``/``std`` and ``bounds``).
        norm: With ``epsilon``: ``"linf"`` (default) or ``"l2"``.
        weight: Weight of the regulariser's penalty beside the alignment to the teacher.
        schedule: Epochs, SGD settings and the regulariser's ascent steps (``schedule.steps``; default
            ``HARDEN_CPU``).
        augment: Applied to each batch before the teacher and the student see it (e.g. crops and flips).
        ssl_loss: The SSL loss alongside, if you have it: ``ssl_loss(student, x)`` is added to each step's loss.
        device: Where to train (default: the encoder's device).
        progress_bar: Show a bar over the epochs (tqdm, if installed).

    Returns:
        The hardened copy, in eval mode (save it, evaluate it: ``robust-reg evaluate`` reads what
        ``robust-reg harden`` writes).

    Raises:
        ValueError: A bad ``weight``, ``epsilon`` or ``norm``; inputs that do not fit the ball
            (``ThreatModel.check_inputs``); an empty loader.
        FloatingPointError: If the loss diverges (lower ``schedule.lr``).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> encoder = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> images = [torch.rand(16, 1, 12, 12) for _ in range(2)]
        >>> from robust_reg.finetune import FinetuneSchedule
        >>> fast = FinetuneSchedule(epochs=1, lr=0.01, steps=2)
        >>> robust = harden(encoder, images, epsilon=8 / 255, schedule=fast)
        >>> robust is encoder, robust.training
        (False, False)
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"weight must be a number >= 0, got {weight!r}")
    threat = resolve_threat(threat, epsilon, norm, {}, where="harden")
    device = torch.device(device) if device is not None else module_device(encoder)
    try:
        first = next(iter(loader))
    except StopIteration:
        raise ValueError("loader yields no batch: pass the (unlabelled) training images") from None
    threat.check_inputs(_images(first), "loader inputs")  # the ball against the data, before any work
    teacher = _Teacher(encoder, isinstance(loader, Sequence) and augment is None, {})
    student = copy.deepcopy(encoder).to(device).requires_grad_(True).train()
    # The anchor detached: the penalty pulls the perturbed features toward the clean ones without rewarding a wider
    # spread, which (with no SSL loss holding the features) pushed them away from the teacher's in a first probe.
    reg = RobustnessRegularizer(
        threat=threat, inner="pgd", steps=schedule.steps, step_size=schedule.step_size, detach_anchor=True
    )
    reg._refuse_equal_positive = False  # the student starts as the teacher's copy: equal features are expected
    opt, scheduler = schedule.optimizer(student.parameters())
    with torch.enable_grad():
        for epoch in progress(range(schedule.epochs), enabled=progress_bar, desc="harden"):
            for i, batch in enumerate(loader):
                x = _images(batch).to(device)
                if augment is not None:
                    x = augment(x)
                target = teacher.features(i, x)
                with torch.no_grad():  # the anchor is detached: its pass needs no graph (BatchNorm still updates)
                    clean = student(x)
                out = reg(student, x, features=clean, positive=target)
                align = (2 - 2 * F.cosine_similarity(out.adversarial_features.flatten(1), target, dim=1)).mean()
                loss = align + weight * out.loss
                if ssl_loss is not None:
                    loss = loss + ssl_loss(student, x)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"harden's loss became {loss.item()} in epoch {epoch}: lower schedule.lr (now {schedule.lr})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            scheduler.step()
    student.zero_grad(set_to_none=True)
    return student.eval()


def _images(batch: object) -> Tensor:
    """The images of a batch: ``x``, or the first item of ``(x, ...)`` / ``{"x": ...}`` (labels are ignored)."""
    x = batch.get("x") if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"loader must yield floating-point image tensors x or (x, ...), got {type(x).__name__}")
    return x
