"""Each training sample's last adversarial perturbation, for a warm-started ascent.

Reference: H. Zheng, Z. Zhang, J. Gu, H. Lee, A. Prakash, "Efficient Adversarial
Training with Transferable Adversarial Examples" (ATTA), CVPR 2020. Adversarial
perturbations found for a sample stay adversarial for it one epoch later, so an
ascent that starts where the last one ended needs fewer steps for the same
strength. ``PerturbationMemory`` keeps one perturbation per training
sample; ``RobustnessRegularizer`` reads and updates it when called with
``start=memory.at(index)``. With random crops, pass each view's crop too
(``memory.at(index, geometry)``, built by ``crop_geometry``): the memory then keeps
the perturbation in image coordinates and moves it with the crop, as ATTA does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PerturbationMemory", "crop_geometry", "ramped_epsilon"]


def crop_geometry(boxes: Tensor, image_size: tuple[int, int] | Tensor, flipped: Tensor | None = None) -> Tensor:
    """Each view's crop as the ``(N, 2, 3)`` matrices ``PerturbationMemory`` takes as ``geometry=``.

    A matrix maps the view's normalised coordinates to its image's, as
    ``torch.nn.functional.affine_grid`` reads it (``align_corners=False``):
    ``grid_sample(image, affine_grid(theta, view_shape))`` is the crop resized to
    the view (bilinear). Give the crops as torchvision's
    ``RandomResizedCrop.get_params`` returns them, ``(top, left, height, width)``
    in pixels of the image they were cut from; a crop may be cut from images of
    different sizes.

    Args:
        boxes: ``(N, 4)`` crops, ``(top, left, height, width)`` in pixels.
        image_size: ``(height, width)`` of the images, or an ``(N, 2)`` tensor
            with one size per crop.
        flipped: ``(N,)`` bool: which views were flipped horizontally after the
            crop (default: none).

    Returns:
        ``(N, 2, 3)`` float32 matrices on ``boxes``' device.

    Raises:
        TypeError: If ``boxes`` or ``flipped`` is not a tensor.
        ValueError: If a shape does not fit, or a crop is empty or an image size
            not positive.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> image = torch.arange(64.0).view(1, 1, 8, 8)
        >>> theta = crop_geometry(torch.tensor([[2, 3, 4, 4]]), (8, 8))  # rows 2-5, columns 3-6
        >>> view = F.grid_sample(image, F.affine_grid(theta, [1, 1, 4, 4], align_corners=False), align_corners=False)
        >>> torch.allclose(view, image[:, :, 2:6, 3:7])
        True
    """
    if not isinstance(boxes, Tensor):
        raise TypeError(f"boxes must be an (N, 4) tensor of (top, left, height, width), got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4): (top, left, height, width), got {tuple(boxes.shape)}")
    n, device = boxes.shape[0], boxes.device
    boxes = boxes.to(torch.float32)
    if isinstance(image_size, Tensor):
        size = image_size.to(device=device, dtype=torch.float32)
        if size.shape != (n, 2):
            raise ValueError(f"image_size must be (height, width) or an ({n}, 2) tensor, got {tuple(size.shape)}")
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        size = torch.tensor([float(image_size[0]), float(image_size[1])], device=device).expand(n, 2)
    else:
        raise ValueError(f"image_size must be (height, width) or an (N, 2) tensor, got {image_size!r}")
    if n and bool(((size <= 0) | (boxes[:, 2:] <= 0)).any()):  # one host sync
        raise ValueError("image_size must be positive and every box must have a positive height and width")
    sign = torch.ones(n, device=device)
    if flipped is not None:
        if not isinstance(flipped, Tensor):
            raise TypeError(f"flipped must be an (N,) bool tensor, got {type(flipped).__name__}")
        if flipped.shape != (n,):
            raise ValueError(f"flipped must have shape ({n},), got {tuple(flipped.shape)}")
        sign = torch.where(flipped.to(device=device, dtype=torch.bool), -1.0, 1.0)
    top, left, height, width = boxes.unbind(dim=1)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = width / size[:, 1] * sign
    theta[:, 0, 2] = (2 * left + width) / size[:, 1] - 1
    theta[:, 1, 1] = height / size[:, 0]
    theta[:, 1, 2] = (2 * top + height) / size[:, 0] - 1
    return theta


def ramped_epsilon(epsilon: float, epoch: int, epochs: int, ramp: float) -> float:
    """The training eps of ``epoch`` (0-based) when eps grows linearly over a share ``ramp`` of ``epochs``.

    Epoch ``e`` of the first ``r = round(ramp * epochs)`` trains at ``epsilon * (e + 1) / (r + 1)``,
    later epochs at ``epsilon`` (``ramp=0``: always ``epsilon``). Part of the measured warm-start form
    (``ramp=0.3``): a warm start carries perturbations between epochs, and a small early ball keeps
    the first epochs' from being far off.

    Examples:
        >>> [round(ramped_epsilon(0.1, e, epochs=10, ramp=0.3), 3) for e in range(5)]
        [0.025, 0.05, 0.075, 0.1, 0.1]
    """
    r = round(ramp * epochs)
    return epsilon * (epoch + 1) / (r + 1) if epoch < r else epsilon


def _to_view(stored: Tensor, geometry: Tensor) -> Tensor:
    """Image-frame perturbations seen through each view's crop (zero outside the image)."""
    grid = F.affine_grid(geometry.to(stored.dtype), list(stored.shape), align_corners=False)
    return F.grid_sample(stored, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _to_image(delta: Tensor, geometry: Tensor, previous: Tensor) -> Tensor:
    """View-frame perturbations mapped back into the image frame; pixels the crop did not cover keep
    ``previous`` (blended at the crop's edge)."""
    geometry = geometry.to(delta.dtype)
    linear, shift = geometry[:, :, :2], geometry[:, :, 2:]
    inverse_linear = torch.linalg.inv(linear)
    inverse = torch.cat([inverse_linear, -inverse_linear @ shift], dim=2)
    grid = F.affine_grid(inverse, list(delta.shape), align_corners=False)
    image = F.grid_sample(delta, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    covered = F.grid_sample(torch.ones_like(delta), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return image + (1 - covered) * previous


@dataclass(frozen=True)
class WarmStart:
    """A batch's view of a ``PerturbationMemory``, passed as ``start=`` (made by ``PerturbationMemory.at``).

    The regulariser reads each sample's stored perturbation as its ascent's start and, once the
    call has succeeded, writes back where the ascent ended.

    Examples:
        >>> import torch
        >>> memory = PerturbationMemory(num_samples=10)
        >>> start = memory.at(torch.arange(4))
        >>> start.memory is memory, start.index.tolist(), start.geometry
        (True, [0, 1, 2, 3], None)
    """

    memory: PerturbationMemory
    index: Tensor
    geometry: Tensor | None = None


class PerturbationMemory:
    """One perturbation per training sample, in pixel units, where its last ascent ended.

    Pass ``start=memory.at(index)`` to ``RobustnessRegularizer`` with each batch's sample
    indices: the ascent starts at ``x + memory[index]`` (projected onto the ball)
    instead of a random draw, and the perturbation it ends at is stored back.
    Samples not stored yet start as the regulariser does (a uniform draw in the ball).

    Where it is kept: without ``geometry``, as the view saw it, so the next
    epoch's crop of the same image gets it as it is. With ``geometry=`` (each
    view's crop, ``crop_geometry``) in image coordinates: it is read through
    the new view's crop and written back where the view covered the image (the
    rest of the image keeps what it held). The moved form is the stronger one
    measured (docs: Results). A memory keeps one
    frame: pass ``geometry`` with every call or with none.

    The memory is allocated at the first write, with the shape of one sample of
    that batch (with ``geometry``, the whole image is kept at the view's size),
    on ``device`` (default: the batch's device) in ``dtype``. It costs
    ``num_samples * C * H * W`` elements: 0.6 GB for CIFAR-10's 50,000 images in
    float32 (half of it in ``torch.float16``, which keeps the perturbation to
    three digits); for a dataset of ImageNet's size it does not fit. Under DDP each
    process keeps the samples it saw; a sample that another process drew last
    epoch starts from this process's older entry (still projected onto the ball).
    It is not part of any ``state_dict`` of the model: in a plain loop save
    ``state_dict`` yourself to resume warm; the adapters' ``warm_start``
    puts it in Lightning checkpoints (beside the ``state_dict``) and restores
    it on resume.

    Args:
        num_samples: The number of training samples: indices must be below it.
            ``None`` (default): the memory grows to the largest index seen.
        device: Where the memory lives (default: the batches' device; a memory
            loaded from a checkpoint onto another device moves there at the next
            batch). ``"cpu"`` saves accelerator memory at the cost of a copy per batch.
        dtype: Floating-point dtype of the stored perturbations (default float32).

    Raises:
        ValueError: For ``num_samples`` that is not a positive integer.
        TypeError: For a ``dtype`` that is not floating point.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from robust_reg import RobustnessRegularizer
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
        >>> reg = RobustnessRegularizer(epsilon=0.1, steps=2)
        >>> memory = PerturbationMemory(num_samples=100)
        >>> x0, x1 = torch.rand(10, 1, 8, 8), torch.rand(10, 1, 8, 8)  # two views of a batch
        >>> index = torch.arange(10)  # the dataset yields each sample's index
        >>> out = reg(model, x1, positive=model(x0), start=memory.at(index))
        >>> x = x1
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
        self._frame: str | None = None  # "view" or "image" (with geometry), fixed at the first write
        self._last_read: tuple | None = None  # (index, geometry, checked index, rows as kept) of the last read

    def at(self, index: Tensor, geometry: Tensor | None = None) -> WarmStart:
        """The warm start of a batch, for ``RobustnessRegularizer``'s ``start=``: ``index`` holds each
        sample's index in the training set; ``geometry`` each view's crop (``crop_geometry``), to keep
        the perturbation in image coordinates. Checked against the batch at the call."""
        return WarmStart(self, index, geometry)

    def __repr__(self) -> str:
        shape = None if self._data is None else tuple(self._data.shape[1:])
        return (
            f"PerturbationMemory(num_samples={self.num_samples}, sample_shape={shape}, "
            f"dtype={self.dtype}, device={self.device}, frame={self._frame})"
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

    def check(self, index: object, x: Tensor, geometry: object = None) -> Tensor:
        """``index`` (and ``geometry``) validated against the batch ``x`` (raises naming them); ``index``
        returned as a 1-D int64 tensor.

        Raises:
            TypeError: If ``index`` is not an integer tensor, or ``geometry`` not a
                floating-point tensor.
            ValueError: If ``index`` is not 1-D with one entry per sample of ``x``,
                has a negative entry or one at or past ``num_samples``; if ``x``'s
                samples have another shape than the stored ones; if ``geometry`` is
                not ``(N, 2, 3)``, not finite, has a singular (empty) crop, or is
                given where ``x`` is not a batch of images ``(N, C, H, W)``; or if
                ``geometry`` is given to a memory written without it, or missing
                where it was written with it.
        """
        index = self._check_index(index, x.shape[0])
        shape = self.sample_shape
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"memory holds perturbations of shape {shape}, x has samples of shape {tuple(x.shape[1:])}; "
                "use one PerturbationMemory per view size"
            )
        if geometry is not None:
            self.check_geometry(geometry, x)
        frame = "view" if geometry is None else "image"
        if self._frame is not None and frame != self._frame:
            raise ValueError(
                f"this memory holds perturbations in {self._frame} coordinates (written "
                f"{'with' if self._frame == 'image' else 'without'} geometry=); pass geometry= with every call "
                "or with none"
            )
        return index

    @staticmethod
    def check_geometry(geometry: object, x: Tensor) -> None:
        """Raise naming ``geometry`` unless it holds one finite, non-empty crop of the image batch ``x`` per sample
        (see ``check``, which also checks the indices)."""
        if not isinstance(geometry, Tensor) or not geometry.is_floating_point():
            got = geometry.dtype if isinstance(geometry, Tensor) else type(geometry).__name__
            raise TypeError(f"geometry must be a floating-point (N, 2, 3) tensor (crop_geometry), got {got}")
        if geometry.shape != (x.shape[0], 2, 3):
            raise ValueError(f"geometry must have shape ({x.shape[0]}, 2, 3), got {tuple(geometry.shape)}")
        if x.dim() != 4:
            raise ValueError(f"geometry needs a batch of images (N, C, H, W), x has shape {tuple(x.shape)}")
        finite = torch.isfinite(geometry).all(dim=(1, 2))
        invertible = torch.linalg.det(torch.where(finite.view(-1, 1, 1), geometry, 1.0)[:, :, :2]) != 0
        if not bool((finite & invertible).all()):  # the write-back inverts each crop
            raise ValueError("geometry must be finite, each crop's 2x2 part invertible (a non-empty crop)")

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

    def read(
        self,
        index: Tensor,
        like: Tensor,
        geometry: Tensor | None = None,
        *,
        fill: Tensor | Callable[[], Tensor] | None = None,
    ) -> Tensor:
        """The stored perturbations of ``index``, on ``like``'s device and dtype; with ``geometry``, seen
        through each view's crop. Samples with nothing stored get zeros, or ``fill``'s rows (a tensor like
        ``like``, or a callable making one, called only if some sample has nothing stored).

        Validates ``index`` and ``geometry`` (see ``check``). A ``write`` with the same ``index``
        and ``geometry`` objects right after reuses this read's checks and rows (the warm start's
        read-ascend-write round costs one gather and one check).
        """
        checked = self.check(index, like, geometry)
        read, stored, kept = self._read(checked, like, geometry)
        rows = cast(Tensor, read)  # a read with ``like`` always has rows
        self._last_read = (index, geometry, checked, kept)
        if fill is None or bool(stored.all()):
            return rows
        filled = fill() if callable(fill) else fill
        return torch.where(stored.view(-1, *([1] * (like.dim() - 1))), rows, filled.to(rows.dtype))

    def is_stored(self, index: Tensor) -> Tensor:
        """Per entry of ``index`` (a 1-D integer tensor), whether a perturbation is stored for it."""
        return self._read(self._check_index(index, None), None)[1]

    def _read(
        self, index: Tensor, like: Tensor | None, geometry: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """The rows of ``index`` (zeros where none is stored; ``None`` without ``like``; through the crops
        with ``geometry``), the stored mask, and the rows as kept (what a write back with the same
        ``geometry`` blends with, so it need not gather them again)."""
        kept, stored = self._rows(index, like)
        rows = kept
        if geometry is not None and kept is not None:
            rows = _to_view(kept, geometry.to(kept.device))
        return rows, stored, kept

    def _rows(self, index: Tensor, like: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """The stored rows of ``index`` as kept (zeros where none is stored) and the stored mask."""
        if self._data is None or self._stored is None:
            stored = torch.zeros(index.shape[0], dtype=torch.bool, device=index.device)
            return (None if like is None else torch.zeros_like(like)), stored
        if like is not None:
            self._follow(like.device)
        data, kept = self._data, self._stored
        index = index.to(data.device)
        inside = index < data.shape[0]
        clamped = index.clamp(max=data.shape[0] - 1)
        stored = kept[clamped] & inside  # beyond the end: not stored
        if like is None:
            return None, stored
        rows = data[clamped] * stored.view(-1, *([1] * (like.dim() - 1))).to(self.dtype)
        return rows.to(device=like.device, dtype=like.dtype), stored.to(like.device)

    def write(self, index: Tensor, perturbation: Tensor, geometry: Tensor | None = None) -> None:
        """Store ``perturbation`` (pixel units, one per entry of ``index``), detached; with ``geometry``,
        mapped back from each view into its image where the crop covered it."""
        if not isinstance(perturbation, Tensor) or not perturbation.is_floating_point():
            got = perturbation.dtype if isinstance(perturbation, Tensor) else type(perturbation).__name__
            raise TypeError(f"perturbation must be a floating-point tensor, got {got}")
        last, self._last_read = self._last_read, None
        if last is not None and last[0] is index and last[1] is geometry and last[3] is not None:
            if last[3].shape == perturbation.shape:  # what the read of this batch checked and gathered
                self._write(last[2], perturbation, geometry, previous=last[3])
                return
        self._write(self.check(index, perturbation, geometry), perturbation, geometry)

    def _write(
        self, index: Tensor, perturbation: Tensor, geometry: Tensor | None = None, previous: Tensor | None = None
    ) -> None:
        """``previous``: with ``geometry``, the rows of ``index`` as kept, if already read (else gathered)."""
        perturbation = perturbation.detach()
        if geometry is not None:
            if previous is None:
                previous = cast(Tensor, self._rows(index, perturbation)[0])
            perturbation = _to_image(perturbation, geometry.to(perturbation.device), previous)
        needed = self.num_samples or (int(index.max()) + 1 if index.numel() else 0)
        if self._data is None or self._stored is None:
            device = self.device or perturbation.device
            self._data = torch.zeros(needed, *perturbation.shape[1:], device=device, dtype=self.dtype)
            self._stored = torch.zeros(needed, dtype=torch.bool, device=device)
        elif needed > self._data.shape[0]:  # grows by doubling, so an epoch reallocates O(log n) times
            size, old = max(needed, 2 * self._data.shape[0]), self._data.shape[0]
            data, stored = self._data.new_zeros(size, *self._data.shape[1:]), self._stored.new_zeros(size)
            data[:old], stored[:old] = self._data, self._stored
            self._data, self._stored = data, stored
        self._follow(perturbation.device)
        data, kept = self._data, self._stored
        index = index.to(data.device)
        data[index] = perturbation.to(data.device, self.dtype)
        kept[index] = True
        self._frame = "view" if geometry is None else "image"

    def _follow(self, device: torch.device) -> None:
        """Without a fixed ``device`` the memory lives on the batches' device (moved once, e.g. after loading)."""
        if self.device is None and self._data is not None and self._stored is not None and self._data.device != device:
            self._data, self._stored = self._data.to(device), self._stored.to(device)

    def reset(self) -> None:
        """Forget every stored perturbation (and the allocation)."""
        self._data = self._stored = self._frame = self._last_read = None

    def state_dict(self) -> dict[str, Any]:
        """The stored perturbations, for a checkpoint (``None`` before the first write)."""
        return {"num_samples": self.num_samples, "data": self._data, "stored": self._stored, "frame": self._frame}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output (moved to ``device`` and ``dtype`` if set).

        Raises:
            ValueError: If ``state`` is not such a dict, or was saved with another ``num_samples``.
        """
        if not isinstance(state, dict) or set(state) != {"num_samples", "data", "stored", "frame"}:
            raise ValueError("state must be the dict PerturbationMemory.state_dict() returns")
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"state was saved with num_samples={state['num_samples']}, this memory has {self.num_samples}"
            )
        data, stored = state["data"], state["stored"]
        if (
            (data is None) != (stored is None)
            or (data is not None and stored.shape != data.shape[:1])
            or state["frame"] not in ((None,) if data is None else ("view", "image"))
        ):
            raise ValueError("state must be the dict PerturbationMemory.state_dict() returns")
        if data is not None:
            device = self.device or data.device
            data, stored = data.to(device=device, dtype=self.dtype), stored.to(device=device, dtype=torch.bool)
        self._data, self._stored, self._frame, self._last_read = data, stored, state["frame"], None
