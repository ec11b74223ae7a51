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
        hue: Largest hue shift, a fraction of the colour wheel (torchvision's ``ColorJitter(hue=...)``; RGB
            only; 0 disables).
        random_order: Apply brightness, contrast, saturation and hue in a random order per sample, as
            torchvision's ``ColorJitter`` does (otherwise in that order).
        strength: Scales the jitter, the hue shift, their probability, grayscale's probability and how small
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
        hue: float = 0.0,
        random_order: bool = False,
        strength: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue!r}")
        self.base: dict[str, Any] = dict(
            scale=scale,
            ratio=ratio,
            flip=flip,
            jitter=jitter,
            jitter_p=jitter_p,
            gray_p=gray_p,
            hue=hue,
            random_order=random_order,
        )
        self.strength = strength
        self.scale = scale if strength == 1 else (1 - (1 - scale[0]) * strength, scale[1])
        self.ratio, self.flip = ratio, flip
        self.jitter, self.jitter_p, self.gray_p = jitter * strength, jitter_p * strength, gray_p * strength
        self.hue, self.random_order = hue * strength, random_order

    def with_strength(self, strength: float) -> BatchAugment:
        """The same augmentation at another strength (1: as built)."""
        return BatchAugment(**self.base, strength=strength)

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
        if self.jitter > 0 or self.hue > 0:
            out = self._jitter(out, u() < self.jitter_p)
        if self.gray_p > 0 and x.shape[1] == 3:
            gray = _gray(out).expand_as(out)
            out = torch.where((u() < self.gray_p).view(-1, 1, 1, 1), gray, out)
        out = out.clamp(0.0, 1.0)
        return (out, theta) if return_theta else out

    def _jitter(self, x: Tensor, apply: Tensor) -> Tensor:
        n, device, j = x.shape[0], x.device, self.jitter
        rgb = x.shape[1] == 3

        def factor(size: float, base: float) -> Tensor:
            f = base + size * (2 * torch.rand(n, 1, 1, 1, device=device) - 1)
            return torch.where(apply.view(-1, 1, 1, 1), f, torch.full_like(f, base))

        if not self.random_order and self.hue == 0:  # the recipe of 0.2's benchmarks, draw for draw
            x = (x * factor(j, 1.0)).clamp(0, 1)
            mean = _gray(x).mean(dim=(2, 3), keepdim=True)
            x = ((x - mean) * factor(j, 1.0) + mean).clamp(0, 1)
            if rgb:
                gray = _gray(x)
                x = ((x - gray) * factor(j, 1.0) + gray).clamp(0, 1)
            return x
        b, c, s = factor(j, 1.0), factor(j, 1.0), factor(j, 1.0)
        shift = factor(self.hue, 0.0)

        def contrast(y: Tensor) -> Tensor:
            mean = _gray(y).mean(dim=(2, 3), keepdim=True)
            return ((y - mean) * c + mean).clamp(0, 1)

        def saturation(y: Tensor) -> Tensor:
            gray = _gray(y)
            return ((y - gray) * s + gray).clamp(0, 1)

        ops = [lambda y: (y * b).clamp(0, 1), contrast]
        ops += [saturation, lambda y: _shift_hue(y, shift)] if rgb else []
        if not self.random_order:
            for op in ops:
                x = op(x)
            return x
        order = torch.rand(n, len(ops), device=device).argsort(dim=1)  # a permutation per sample
        rows = torch.arange(n, device=device)
        for position in range(len(ops)):
            x = torch.stack([op(x) for op in ops])[order[:, position], rows]
        return x


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
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


def _gray(x: Tensor) -> Tensor:
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
