"""Small helpers shared by the downstream tools."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn


def unpack_batch(batch: Any, name: str = "loader") -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` from a batch laid out as ``(x, y, ...)``."""
    if isinstance(batch, dict) and {"x", "y"} <= batch.keys():
        x, y = batch["x"], batch["y"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise ValueError(f"{name} must yield (inputs, labels, ...) batches, got {type(batch).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{name} must yield tensors (inputs, labels), got ({type(x).__name__}, {type(y).__name__})")
    if not x.is_floating_point():
        raise TypeError(f"{name} inputs must be floating point, got {x.dtype}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} labels must be integer class indices, got {y.dtype}")
    return x, y.long()


def module_device(module: nn.Module, default: str | torch.device = "cpu") -> torch.device:
    """The device of a module's first parameter or buffer."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device(default)


def progress(iterable: Iterable, *, enabled: bool, desc: str, total: int | None = None) -> Iterator:
    """Wrap in a tqdm bar when asked and tqdm is installed."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: progress bars are a nicety
            return iter(iterable)
        return iter(tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True))
    return iter(iterable)


def flat(features: Tensor) -> Tensor:
    return features.reshape(features.shape[0], -1)


def warn_deprecated(spelling: str, instead: str, *, stacklevel: int = 3) -> None:
    """The one form of every deprecation: ``spelling`` works until 0.4.0; ``instead`` says what to write."""
    warnings.warn(
        f"{spelling} is deprecated since 0.3.0 and goes in 0.4.0; {instead}", DeprecationWarning, stacklevel=stacklevel
    )
