"""Batched SimCLR-style augmentations on tensors (fast on CPU and GPU).

Per-sample PIL transforms dominate the cost of small-image SSL on CPU; these do
the same job on a whole batch with one ``grid_sample``. Outputs stay in
``[0, 1]``, so the threat model's bounds hold for every view.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchAugment(nn.Module):
    """Random resized crop, horizontal flip, colour jitter and grayscale, per sample.

    Args:
        scale: Range of the crop's area fraction.
        ratio: Range of the crop's aspect ratio.
        flip: Probability of a horizontal flip.
        jitter: Strength of brightness/contrast/saturation jitter (0 disables).
        jitter_p: Probability of applying the jitter.
        gray_p: Probability of converting to grayscale (RGB only).
        strength: Scales the jitter, its probability, grayscale's probability and how small
            a crop may be (smallest area ``1 - (1 - scale[0]) * strength``), as DynACL's annealed augmentation;
            flips stay. See ``robust_reg.augmentation.augmentation_strength`` and ``with_strength``.
    """

    def __init__(
        self,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
        jitter: float = 0.4,
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        strength: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        self.base: dict[str, Any] = dict(
            scale=scale,
            ratio=ratio,
            flip=flip,
            jitter=jitter,
            jitter_p=jitter_p,
            gray_p=gray_p,
        )
        self.strength = strength
        self.scale = scale if strength == 1 else (1 - (1 - scale[0]) * strength, scale[1])
        self.ratio, self.flip = ratio, flip
        self.jitter, self.jitter_p, self.gray_p = jitter * strength, jitter_p * strength, gray_p * strength

    def with_strength(self, strength: float) -> BatchAugment:
        """The same augmentation at another strength (1: as built)."""
        return type(self)(**self.base, strength=strength)

    def forward(self, x: Tensor, *, return_theta: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Augment a batch; with ``return_theta`` also return each view's crop as ``(N, 2, 3)``
        ``affine_grid`` matrices (view coordinates to image coordinates)."""
        n, device = x.shape[0], x.device
        u = lambda: torch.rand(n, device=device)  # noqa: E731
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u()
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u()
        w = (area * log_r.exp()).sqrt().clamp(max=1.0)
        h = (area / log_r.exp()).sqrt().clamp(max=1.0)
        cx, cy = (1 - w) * (2 * u() - 1), (1 - h) * (2 * u() - 1)
        sign = torch.where(u() < self.flip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self._jitters():
            out = self._jitter(out, u() < self.jitter_p)
        if self.gray_p > 0 and x.shape[1] == 3:
            gray_view = gray(out).expand_as(out)
            out = torch.where((u() < self.gray_p).view(-1, 1, 1, 1), gray_view, out)
        out = out.clamp(0.0, 1.0)
        return (out, theta) if return_theta else out

    def _jitters(self) -> bool:
        return self.jitter > 0

    def _jitter(self, x: Tensor, apply: Tensor) -> Tensor:
        """Brightness, contrast and saturation (RGB), in that order, on the samples where ``apply``."""
        j, rgb = self.jitter, x.shape[1] == 3
        x = (x * jitter_factor(j, 1.0, apply)).clamp(0, 1)
        mean = gray(x).mean(dim=(2, 3), keepdim=True)
        x = ((x - mean) * jitter_factor(j, 1.0, apply) + mean).clamp(0, 1)
        if rgb:
            g = gray(x)
            x = ((x - g) * jitter_factor(j, 1.0, apply) + g).clamp(0, 1)
        return x


def jitter_factor(size: float, base: float, apply: Tensor) -> Tensor:
    """Per sample (``(N, 1, 1, 1)``): ``base`` plus a uniform draw in ``[-size, size]`` where ``apply``, else
    ``base``."""
    f = base + size * (2 * torch.rand(apply.shape[0], 1, 1, 1, device=apply.device) - 1)
    return torch.where(apply.view(-1, 1, 1, 1), f, torch.full_like(f, base))


def gray(x: Tensor) -> Tensor:
    """Luma (ITU-R 601) of RGB images, ``(N, 1, H, W)``; single-channel images as they are."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def default_augment(kind: str) -> BatchAugment:
    """The augmentation of a data kind (or a dataset's name): digits are not flipped, natural images (CIFAR-10,
    a subset, other RGB sets) get the SimCLR recipe."""
    from .data import DATASET_KINDS

    if DATASET_KINDS.get(kind, kind) in ("cifar10", "natural"):
        return BatchAugment(scale=(0.2, 1.0), flip=0.5, jitter=0.4, jitter_p=0.8, gray_p=0.2)
    return BatchAugment(scale=(0.4, 1.0), ratio=(0.8, 1.25), flip=0.0, jitter=0.4, jitter_p=0.8, gray_p=0.0)
