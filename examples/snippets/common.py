"""What every snippet shares: real digits as [0, 1] pixels, and a two-view augmentation.

The snippets run offline on 2 CPU cores in seconds (scikit-learn's 1,797 8x8 digits); on your
data, use your own loader and your SSL pipeline's augmentation. eps is always in pixel units.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from sklearn.datasets import load_digits
from torch import nn
from torchvision.transforms import v2 as T

EPSILON = 0.1  # digits are easy: CIFAR-10 uses 8 / 255

augment = T.Compose([T.RandomResizedCrop(8, scale=(0.6, 1.0), antialias=True), T.RandomHorizontalFlip()])


def batches(steps: int, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """``steps`` shuffled batches of real digit images ``(N, 1, 8, 8)`` in ``[0, 1]``."""
    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16
    for _ in range(steps):
        order = torch.randperm(images.shape[0])[:batch_size]
        yield images[order]


def backbone(width: int = 32) -> nn.Module:
    """A small conv backbone with flat features (your ResNet in real use)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
