"""Each training sample's last adversarial perturbation, for a warm-started ascent.

Reference: H. Zheng, Z. Zhang, J. Gu, H. Lee, A. Prakash, "Efficient Adversarial
Training with Transferable Adversarial Examples" (ATTA), CVPR 2020. Adversarial
perturbations found for a sample stay adversarial for it one epoch later, so an
ascent that starts where the last one ended needs fewer steps for the same
strength. :class:`PerturbationMemory` keeps one perturbation per training
sample; :class:`~robust_reg.RobustnessRegularizer` reads and updates it when
called with ``memory=`` and ``index=``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["PerturbationMemory"]


class PerturbationMemory:
    """One perturbation per training sample, in pixel units, where its last ascent ended.

    Pass it to :class:`~robust_reg.RobustnessRegularizer` with each batch's
    sample indices (``reg(..., memory=memory, index=index)``): the ascent starts
    at ``x + memory[index]`` (projected onto the ball) instead of a random draw,
    and the perturbation it ends at is stored back. Samples not stored yet start
    as the regulariser is configured (a uniform draw in the ball with
    ``random_start=True``, else ``x``). The perturbation is kept as the view saw it:
    with random crops, the next epoch's crop of the same image gets it as it is
    (measured on MNIST, the README's Results).

    The memory is allocated at the first write, with the shape of one sample of
    that batch, on ``device`` (default: the batch's device) in ``dtype``. It costs
    ``num_samples * C * H * W`` elements: 0.6 GB for CIFAR-10's 50,000 images in
    float32 (half of it in ``torch.float16``, which keeps the perturbation to
    three digits); for a dataset of ImageNet's size it does not fit. Under DDP each
    process keeps the samples it saw; a sample that another process drew last
    epoch starts from this process's older entry (still projected onto the ball).
    It is not part of any ``state_dict`` of the model; save :meth:`state_dict`
    yourself to resume warm.

    Args:
        num_samples: The number of training samples: indices must be below it.
            ``None`` (default): the memory grows to the largest index seen.
        device: Where the memory lives (default: the device of the first batch).
            ``"cpu"`` saves accelerator memory at the cost of a copy per batch.
        dtype: Floating-point dtype of the stored perturbations (default float32).

    Raises:
        ValueError: For ``num_samples`` that is not a positive integer.
        TypeError: For a ``dtype`` that is not floating point.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from robust_reg import RobustnessRegularizer
        >>> encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
        >>> reg = RobustnessRegularizer(epsilon=0.1, steps=2, normalize_features=True)
        >>> memory = PerturbationMemory(num_samples=100)
        >>> x, index = torch.rand(10, 1, 8, 8), torch.arange(10)  # the dataset yields each sample's index
        >>> loss = reg(encoder, x, memory=memory, index=index)
        >>> bool(memory.read(index, x).abs().max() <= 0.1 + 1e-6)  # where each ascent ended
        True
        >>> len(memory)
        100
    """

    def __init__(
        self,
        num_samples: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
        ):
            raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.num_samples = num_samples
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self._data: Tensor | None = None
        self._stored: Tensor | None = None  # which slots hold a perturbation

    def __repr__(self) -> str:
        shape = None if self._data is None else tuple(self._data.shape[1:])
        return (
            f"PerturbationMemory(num_samples={self.num_samples}, sample_shape={shape}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def __len__(self) -> int:
        """The number of sample slots allocated (0 before the first write)."""
        return 0 if self._data is None else self._data.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """The shape of one stored perturbation (``None`` before the first write)."""
        return None if self._data is None else tuple(self._data.shape[1:])

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the stored perturbations."""
        return 0 if self._data is None else self._data.numel() * self._data.element_size()

    def check(self, index: object, x: Tensor) -> Tensor:
        """``index`` validated against the batch ``x`` (raises naming it); returned as a 1-D int64 tensor.

        Raises:
            TypeError: If ``index`` is not an integer tensor.
            ValueError: If it is not 1-D with one entry per sample of ``x``, has a
                negative entry or one at or past ``num_samples``, or if ``x``'s
                samples have another shape than the stored ones.
        """
        index = self._check_index(index, x.shape[0])
        shape = self.sample_shape
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"memory holds perturbations of shape {shape}, x has samples of shape {tuple(x.shape[1:])}; "
                "use one PerturbationMemory per view size"
            )
        return index

    def _check_index(self, index: object, n: int | None) -> Tensor:
        if not isinstance(index, Tensor) or index.dtype == torch.bool or index.is_floating_point():
            got = index.dtype if isinstance(index, Tensor) else type(index).__name__
            raise TypeError(f"index must be an integer tensor of sample indices, got {got}")
        if index.dim() != 1 or (n is not None and index.shape[0] != n):
            raise ValueError(f"index must have one entry per sample, shape ({n},), got {tuple(index.shape)}")
        if index.numel():
            low, high = torch.stack(torch.aminmax(index)).tolist()  # one host sync per batch
            if low < 0:
                raise ValueError(f"index must be non-negative, got {low}")
            if self.num_samples is not None and high >= self.num_samples:
                raise ValueError(f"index must be below num_samples={self.num_samples}, got {high}")
        return index.long()

    def read(self, index: Tensor, like: Tensor) -> Tensor:
        """The stored perturbations of ``index`` (zeros where none is stored), on ``like``'s device and dtype."""
        return self._read(self.check(index, like), like)[0]

    def is_stored(self, index: Tensor) -> Tensor:
        """Per entry of ``index`` (a 1-D integer tensor), whether a perturbation is stored for it."""
        return self._read(self._check_index(index, None), None)[1]

    def _read(self, index: Tensor, like: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """The rows of ``index`` (zeros where none is stored; ``None`` without ``like``) and the stored mask."""
        if self._data is None:
            stored = torch.zeros(index.shape[0], dtype=torch.bool, device=index.device)
            return (None if like is None else torch.zeros_like(like)), stored
        index = index.to(self._data.device)
        inside = index < self._data.shape[0]
        clamped = index.clamp(max=self._data.shape[0] - 1)
        stored = self._stored[clamped] & inside  # beyond the end: not stored
        if like is None:
            return None, stored
        rows = self._data[clamped] * stored.view(-1, *([1] * (like.dim() - 1))).to(self.dtype)
        return rows.to(device=like.device, dtype=like.dtype), stored.to(like.device)

    def write(self, index: Tensor, perturbation: Tensor) -> None:
        """Store ``perturbation`` (pixel units, one per entry of ``index``), detached."""
        if not isinstance(perturbation, Tensor) or not perturbation.is_floating_point():
            got = perturbation.dtype if isinstance(perturbation, Tensor) else type(perturbation).__name__
            raise TypeError(f"perturbation must be a floating-point tensor, got {got}")
        self._write(self.check(index, perturbation), perturbation)

    def _write(self, index: Tensor, perturbation: Tensor) -> None:
        needed = self.num_samples or (int(index.max()) + 1 if index.numel() else 0)
        if self._data is None:
            device = self.device or perturbation.device
            self._data = torch.zeros(needed, *perturbation.shape[1:], device=device, dtype=self.dtype)
            self._stored = torch.zeros(needed, dtype=torch.bool, device=device)
        elif needed > self._data.shape[0]:  # grows by doubling, so an epoch reallocates O(log n) times
            size, old = max(needed, 2 * self._data.shape[0]), self._data.shape[0]
            data, stored = self._data.new_zeros(size, *self._data.shape[1:]), self._stored.new_zeros(size)
            data[:old], stored[:old] = self._data, self._stored
            self._data, self._stored = data, stored
        index = index.to(self._data.device)
        self._data[index] = perturbation.detach().to(self._data.device, self.dtype)
        self._stored[index] = True

    def reset(self) -> None:
        """Forget every stored perturbation (and the allocation)."""
        self._data = self._stored = None

    def state_dict(self) -> dict[str, Any]:
        """The stored perturbations, for a checkpoint (``None`` before the first write)."""
        return {"num_samples": self.num_samples, "data": self._data, "stored": self._stored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (moved to ``device`` and ``dtype`` if set).

        Raises:
            ValueError: If ``state`` is not such a dict, or was saved with another ``num_samples``.
        """
        if not isinstance(state, dict) or set(state) != {"num_samples", "data", "stored"}:
            raise ValueError("state must be the dict PerturbationMemory.state_dict() returns")
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"state was saved with num_samples={state['num_samples']}, this memory has {self.num_samples}"
            )
        data, stored = state["data"], state["stored"]
        if (data is None) != (stored is None) or (data is not None and stored.shape != data.shape[:1]):
            raise ValueError("state must be the dict PerturbationMemory.state_dict() returns")
        if data is not None:
            device = self.device or data.device
            data, stored = data.to(device=device, dtype=self.dtype), stored.to(device=device, dtype=torch.bool)
        self._data, self._stored = data, stored
