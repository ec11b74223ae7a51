"""Encoders for the reference experiments; inputs are ``[0, 1]`` pixels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def conv_encoder(in_channels: int = 1, width: int = 32) -> nn.Sequential:
    """A small conv net for 28x28 (or 8x8) digits; output ``(N, 4 * width, 1, 1)``.

    A 5x5 stride-2 stem, then two 3x3 stride-2 blocks with BatchNorm, then global
    average pooling: about 2.2 M multiply-adds per 28x28 image, so SSL runs in
    minutes on a CPU.
    """

    def block(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
        conv = nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2, bias=False)
        return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(in_channels, width, 5),
        *block(width, 2 * width, 3),
        *block(2 * width, 4 * width, 3),
        nn.AdaptiveAvgPool2d(1),
    )


def resnet18_cifar(in_channels: int = 3, stem_padding: int = 1) -> nn.Sequential:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), output ``(N, 512, 1, 1)``.

    ``stem_padding``: the stem convolution's padding (solo-learn's CIFAR ResNets use 2)."""
    import torchvision

    resnet = torchvision.models.resnet18()
    resnet.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=stem_padding, bias=False)
    resnet.maxpool = nn.Identity()
    # The lightly way: everything but the classifier, so the output is (N, 512, 1, 1).
    return nn.Sequential(*list(resnet.children())[:-1])


def resnet18_imagenet(in_channels: int = 3) -> nn.Sequential:
    """torchvision's ResNet-18 (7x7 stride-2 stem and max-pool) without its classifier: ``(N, 512, 1, 1)``."""
    import torchvision

    resnet = torchvision.models.resnet18()
    if in_channels != 3:
        resnet.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return nn.Sequential(*list(resnet.children())[:-1])


def wide_conv_encoder(in_channels: int = 3) -> nn.Sequential:
    """``conv_encoder`` at twice the width (64): about 4x its multiply-adds, output ``(N, 256, 1, 1)``."""
    return conv_encoder(in_channels, width=64)


ARCHITECTURES: dict[str, Callable[..., nn.Sequential]] = {
    "cnn": conv_encoder,
    "cnn-wide": wide_conv_encoder,
    "resnet18": resnet18_cifar,
    "resnet18-imagenet": resnet18_imagenet,
}


def build_encoder(arch: str, in_channels: int, **options: Any) -> nn.Sequential:
    """An encoder by name (``cnn``, ``cnn-wide``, ``resnet18``, ``resnet18-imagenet``); ``options``: the
    builder's own (``resnet18``: ``stem_padding``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch](in_channels=in_channels, **options)


def feature_dim(encoder: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Flattened output size of ``encoder`` on one image of ``image_shape``."""
    import torch

    from .. import preserved_state

    p = next(encoder.parameters())
    with preserved_state(encoder, eval_mode=True), torch.no_grad():
        return encoder(torch.zeros(1, *image_shape, device=p.device, dtype=p.dtype)).flatten(1).shape[1]
