"""Common corruptions in the style of CIFAR-10-C, generated on the fly from test images.

Hendrycks & Dietterich (ICLR 2019) corrupt CIFAR-10's test set with 15
corruptions (plus 4 extra) at severities 1-5. This module implements, on torch
(and Pillow for the two codec-like ones), those whose definition needs no
external asset or ImageMagick, with CIFAR-10-C's per-severity parameters:

- noise: ``gaussian_noise``, ``shot_noise``, ``impulse_noise``, ``speckle_noise`` (extra)
- blur: ``defocus_blur``, ``zoom_blur``, ``gaussian_blur`` (extra)
- weather: ``fog``, ``brightness``
- digital: ``contrast``, ``pixelate``, ``jpeg_compression``, ``saturate`` (extra, colour only)

Not implemented: glass, motion, snow, frost, elastic and spatter. Corruption
accuracy is reported as the mean over the standard ones implemented (the first
ten of ``STANDARD``), so it is comparable in kind with CIFAR-10-C's mean,
not equal to it. Every draw comes from a private generator seeded by ``seed``:
results are reproducible and the caller's RNG is untouched. Outputs are
quantised to 8 bits as CIFAR-10-C's files are, and stay in ``[0, 1]``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._state import preserved_state
from ._utils import module_device
from .attacks import ThreatModel

__all__ = ["CORRUPTIONS", "STANDARD", "corrupt", "CorruptionAccuracy", "corruption_accuracy"]

# Family of each corruption, in CIFAR-10-C's order; the extras last.
CORRUPTIONS = {
    "gaussian_noise": "noise",
    "shot_noise": "noise",
    "impulse_noise": "noise",
    "defocus_blur": "blur",
    "zoom_blur": "blur",
    "fog": "weather",
    "brightness": "weather",
    "contrast": "digital",
    "pixelate": "digital",
    "jpeg_compression": "digital",
    "speckle_noise": "noise",
    "gaussian_blur": "blur",
    "saturate": "digital",
}
# Those of CIFAR-10-C's 15 that are implemented: the default set and the reported mean.
STANDARD = tuple(list(CORRUPTIONS)[:10])
_COLOUR_ONLY = ("saturate",)

# CIFAR-10-C's parameters per severity 1-5 (make_cifar_c.py of Hendrycks & Dietterich).
_PARAMS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # zoom factors arange(1, this, 0.01)
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}


def _noise(x: Tensor, c: float, g: torch.Generator, kind: str) -> Tensor:
    if kind == "gaussian_noise":
        return x + c * torch.randn(x.shape, generator=g)
    if kind == "speckle_noise":
        return x + x * c * torch.randn(x.shape, generator=g)
    if kind == "shot_noise":
        return torch.poisson(x * c, generator=g) / c
    flipped = torch.rand(x.shape, generator=g) <= c  # impulse: salt and pepper on a fraction c of the values
    salted = torch.rand(x.shape, generator=g) <= 0.5
    return torch.where(flipped, salted.to(x.dtype), x)


def _gaussian_1d(sigma: float, radius: int) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _filter(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Per-channel 2-D correlation with an odd square kernel, same size out (``reflect`` or ``replicate`` edges)."""
    r = kernel.shape[-1] // 2
    c = x.shape[1]
    padded = F.pad(x, (r, r, r, r), mode=mode)
    weight = kernel.to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(padded, weight, groups=c)


def _defocus_kernel(radius: float, alias_blur: float) -> Tensor:
    """A disk of ``radius`` on a 17x17 grid, normalised, softened by a 3x3 Gaussian; cropped to its support."""
    t = torch.arange(-8, 9, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    g = _gaussian_1d(alias_blur, 1)
    soft = F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1)), (g[:, None] * g[None, :])[None, None])[0, 0]
    keep = int((soft.abs() > 0).nonzero().sub(8).abs().max())
    return soft[8 - keep : 9 + keep, 8 - keep : 9 + keep]


def _blur(x: Tensor, param, kind: str) -> Tensor:
    if kind == "defocus_blur":
        return _filter(x, _defocus_kernel(*param), "reflect")
    if kind == "gaussian_blur":
        g = _gaussian_1d(param, int(4 * param + 0.5))  # scipy's truncate=4, nearest edges
        return _filter(x, g[:, None] * g[None, :], "replicate")
    h, w = x.shape[-2:]
    zooms = np.arange(1, param, 0.01)
    out = torch.zeros_like(x)
    for z in zooms:  # zoom blur: the mean of the image and its centre zoomed by each factor
        ch, cw = math.ceil(h / z), math.ceil(w / z)
        top, left = (h - ch) // 2, (w - cw) // 2
        size = (round(ch * z), round(cw * z))
        big = F.interpolate(x[..., top : top + ch, left : left + cw], size=size, mode="bilinear", align_corners=True)
        th, tw = (size[0] - h) // 2, (size[1] - w) // 2
        out += big[..., th : th + h, tw : tw + w]
    return (x + out) / (len(zooms) + 1)


def _plasma(size: int, decay: float, g: torch.Generator) -> Tensor:
    """A ``size`` x ``size`` diamond-square height map in ``[0, 1]`` (fog's texture); ``size`` a power of two."""
    a = torch.zeros(size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def mean_plus_noise(s: Tensor) -> Tensor:
        return s / 4 + wibble * (torch.rand(s.shape, generator=g, dtype=torch.float64) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = a[0::step, 0::step]
        square = corners + corners.roll(-1, 0)
        a[half::step, half::step] = mean_plus_noise(square + square.roll(-1, 1))
        centres, corners = a[half::step, half::step], a[0::step, 0::step]
        a[0::step, half::step] = mean_plus_noise(centres + centres.roll(1, 0) + corners + corners.roll(-1, 1))
        a[half::step, 0::step] = mean_plus_noise(centres + centres.roll(1, 1) + corners + corners.roll(-1, 0))
        step //= 2
        wibble /= decay
    a = a - a.min()
    return a / a.max()


def _fog(x: Tensor, param, g: torch.Generator) -> Tensor:
    strength, decay = param
    h, w = x.shape[-2:]
    size = max(32, 1 << (max(h, w) - 1).bit_length())
    peak = x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    fog = torch.stack([_plasma(size, decay, g)[:h, :w] for _ in range(x.shape[0])])[:, None].to(x.dtype)
    return (x + strength * fog) * peak / (peak + strength)


def _value(x: Tensor) -> Tensor:
    return x.max(dim=1, keepdim=True).values


def _brightness(x: Tensor, c: float) -> Tensor:
    """HSV value + c, hue and saturation kept: each channel scales with the value (a black pixel turns grey)."""
    v = _value(x)
    new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * new / v.clamp_min(1e-12), new.expand_as(x))


def _saturate(x: Tensor, param) -> Tensor:
    """HSV saturation * a + b, hue and value kept (a grey pixel has hue 0, red, as in skimage)."""
    a, b = param
    v = _value(x)
    s = (v - x.min(dim=1, keepdim=True).values) / v.clamp_min(1e-12)
    new = (s * a + b).clamp(0, 1)
    scaled = v - (v - x) * new / s.clamp_min(1e-12)
    grey = torch.cat([v, v * (1 - new), v * (1 - new)], dim=1)
    return torch.where(s > 0, scaled, grey)


def _pil(x: Tensor, fn: Callable) -> Tensor:
    """Apply a Pillow image function to each image (8-bit, as CIFAR-10-C's pipeline works on PIL images)."""
    from PIL import Image

    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for img in u8:
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        arr = np.asarray(fn(pil), dtype=np.uint8).reshape(img.shape)
        out.append(torch.from_numpy(arr.copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(x.dtype) / 255


def _jpeg(quality: int):
    from PIL import Image

    def fn(img):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return Image.open(buf).convert(img.mode)

    return fn


def _pixelate(c: float):
    from PIL import Image

    def fn(img):
        w, h = img.size
        return img.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)

    return fn


def _apply(x: Tensor, name: str, param, g: torch.Generator) -> Tensor:
    family = CORRUPTIONS[name]
    if family == "noise":
        return _noise(x, param, g, name)
    if family == "blur":
        return _blur(x, param, name)
    if name == "fog":
        return _fog(x, param, g)
    if name == "brightness":
        return _brightness(x, param)
    if name == "saturate":
        return _saturate(x, param)
    if name == "contrast":
        m = x.mean(dim=(2, 3), keepdim=True)
        return (x - m) * param + m
    return _pil(x, _pixelate(param) if name == "pixelate" else _jpeg(param))


def _check_corruption(name: str, severity: int, pixels: Tensor) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {tuple(CORRUPTIONS)}, got {name!r}")
    if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    if not isinstance(pixels, Tensor) or not pixels.is_floating_point() or pixels.dim() != 4:
        raise ValueError("pixels must be a floating-point (N, C, H, W) tensor")
    if pixels.numel() and (pixels.min() < 0 or pixels.max() > 1):
        raise ValueError(
            f"pixels must lie in [0, 1], got [{pixels.min().item():.4g}, {pixels.max().item():.4g}]: undo the "
            "normalisation first (corruption_accuracy takes mean= and std=)"
        )
    if name in _COLOUR_ONLY and pixels.shape[1] != 3:
        raise ValueError(f"{name} changes colour: it needs RGB images, got {pixels.shape[1]} channel(s)")


def corrupt(pixels: Tensor, corruption: str, severity: int, *, seed: int = 0) -> Tensor:
    """One corruption at one severity (1-5) of a batch of ``[0, 1]`` images, CIFAR-10-C's parameters.

    Args:
        pixels: ``(N, C, H, W)`` images in ``[0, 1]`` (1 or 3 channels; any memory format).
        corruption: A name of ``CORRUPTIONS``.
        severity: 1 (mildest) to 5.
        seed: Seed of the corruption's randomness (a private generator: the global RNG is untouched).

    Returns:
        The corrupted images, 8-bit quantised, in ``[0, 1]``, on ``pixels``' device and dtype.

    Raises:
        ValueError: For an unknown corruption, a severity outside 1-5, pixels outside ``[0, 1]``, or a
            colour corruption on grayscale images.

    Examples:
        >>> import torch
        >>> x = torch.rand(2, 3, 32, 32)
        >>> y = corrupt(x, "gaussian_noise", 5, seed=0)
        >>> bool(y.min() >= 0 and y.max() <= 1), torch.equal(y, corrupt(x, "gaussian_noise", 5, seed=0))
        (True, True)
    """
    _check_corruption(corruption, severity, pixels)
    g = torch.Generator().manual_seed(int(seed))
    x = pixels.detach().to("cpu", torch.float64).contiguous()
    out = _apply(x, corruption, _PARAMS[corruption][severity - 1], g).clamp(0, 1)
    out = torch.floor(out * 255 + 1e-6) / 255  # CIFAR-10-C stores np.uint8 of the result
    return out.to(device=pixels.device, dtype=pixels.dtype)


@dataclass(frozen=True)
class CorruptionAccuracy:
    """Accuracy on corrupted test images, per corruption and severity.

    Attributes:
        clean_accuracy: Accuracy on the uncorrupted images.
        accuracies: ``{(corruption, severity): accuracy}``.
        num_samples: Test images per corruption and severity.
        skipped: Corruptions that do not apply to these images (colour ones on grayscale).
    """

    clean_accuracy: float
    accuracies: dict = field(default_factory=dict)
    num_samples: int = 0
    skipped: tuple[str, ...] = ()

    @property
    def mean_accuracy(self) -> float:
        """The mean over every corruption and severity evaluated (CIFAR-10-C's headline form)."""
        return sum(self.accuracies.values()) / max(len(self.accuracies), 1)

    def by_corruption(self) -> dict[str, float]:
        """Each corruption's mean over its severities."""
        names = dict.fromkeys(name for name, _ in self.accuracies)
        return {n: float(np.mean([a for (m, _), a in self.accuracies.items() if m == n])) for n in names}

    def by_severity(self) -> dict[int, float]:
        """Each severity's mean over the corruptions."""
        levels = sorted({s for _, s in self.accuracies})
        return {s: float(np.mean([a for (_, t), a in self.accuracies.items() if t == s])) for s in levels}

    def to_dict(self) -> dict:
        return {
            "clean_accuracy": self.clean_accuracy,
            "mean_accuracy": self.mean_accuracy,
            "num_samples": self.num_samples,
            "by_corruption": self.by_corruption(),
            "by_severity": {str(k): v for k, v in self.by_severity().items()},
            "accuracies": {f"{n}@{s}": a for (n, s), a in self.accuracies.items()},
            "skipped": list(self.skipped),
        }

    def __str__(self) -> str:
        sev = ", ".join(f"{s}: {100 * a:.1f} %" for s, a in self.by_severity().items())
        lines = [
            f"Corruptions ({len(self.by_corruption())} types x severities, {self.num_samples} images): mean "
            f"{100 * self.mean_accuracy:.2f} % (clean {100 * self.clean_accuracy:.2f} %); by severity {sev}"
        ]
        lines += [f"  {n:<18} {100 * a:6.2f} %" for n, a in self.by_corruption().items()]
        lines += [f"  skipped: {s}" for s in self.skipped]
        return "\n".join(lines)


def corruption_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 500,
    seed: int = 0,
) -> CorruptionAccuracy:
    """Accuracy of a classifier on corrupted copies of its test images.

    Args:
        model: Maps model-space inputs to logits; run in eval mode, its state restored.
        x: Test inputs in model space (normalised with ``mean``/``std`` if given; pixels in ``[0, 1]``).
        y: Test labels.
        corruptions: Names from ``CORRUPTIONS`` (default ``STANDARD``); colour-only ones are
            skipped on grayscale images (listed in ``skipped``).
        severities: Severities to run.
        mean: Normalisation mean already applied to ``x``.
        std: Normalisation std already applied to ``x``.
        batch_size: Images per forward pass.
        seed: Seed of the corruptions (each corruption and severity draws from its own generator).

    Returns:
        A ``CorruptionAccuracy``.

    Raises:
        ValueError: For an unknown corruption or severity, or pixels outside ``[0, 1]``.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 2, (16,))
        >>> result = corruption_accuracy(model, x, y, corruptions=["contrast"], severities=[1, 5])
        >>> sorted(result.accuracies)
        [('contrast', 1), ('contrast', 5)]
    """
    names = list(STANDARD if corruptions is None else corruptions)
    threat = ThreatModel(0.0, mean=mean, std=std)
    pixels = threat.to_pixels(x.detach())
    skipped = tuple(n for n in names if n in _COLOUR_ONLY and pixels.shape[1] != 3)
    runs = [(n, s) for n in names if n not in skipped for s in severities]
    for n, s in runs:
        _check_corruption(n, s, pixels[:1])
    device = module_device(model)
    y = y.to(device)

    def accuracy(inputs: Tensor) -> float:
        with torch.no_grad():
            hits = [
                (model(threat.to_model(inputs[i : i + batch_size]).to(device)).argmax(1) == y[i : i + batch_size])
                for i in range(0, len(inputs), batch_size)
            ]
        return torch.cat(hits).float().mean().item()

    with preserved_state(model, eval_mode=True):
        clean = accuracy(pixels)
        results = {
            (n, s): accuracy(corrupt(pixels, n, s, seed=seed * 1000 + 10 * list(CORRUPTIONS).index(n) + s))
            for n, s in runs
        }
    return CorruptionAccuracy(clean, results, len(x), skipped)
