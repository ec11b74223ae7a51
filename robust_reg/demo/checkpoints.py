"""Encoders from the checkpoints users have, for ``robust-reg evaluate`` and ``robust-reg harden``.

Read with ``torch.load(weights_only=True)`` (no code runs from the file):

- robust-reg's own (``robust-reg demo``, ``examples/pretrain.py``, ``robust-reg harden``);
- a Lightning ``.ckpt`` whose module keeps its encoder as ``backbone`` (solo-learn 1.0.6 writes these, with
  ``args.json`` beside them, which tells the input normalisation; lightly's examples and most user modules
  name it so too), with a ResNet-18 or one of the demo's CNNs as the backbone;
- a torchvision ResNet-18 ``state_dict`` (``torchvision.models.resnet18().state_dict()``, ``fc`` dropped);
- a bare ``state_dict`` of one of the demo's architectures (``--arch``).

Every encoder comes back taking ``[0, 1]`` pixels: a checkpoint trained on normalised inputs is wrapped in
:class:`PixelInput`, so the threat's radius stays in pixel units. Anything else is a one-line
:class:`CheckpointError` naming what is supported.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .models import ARCHITECTURES, build_encoder

FORMAT = "robust-reg-encoder/1"
SUPPORTED = (
    "a robust-reg checkpoint (robust-reg demo / harden, examples/pretrain.py), a solo-learn or Lightning .ckpt "
    "whose module has a `backbone` (ResNet-18 or the demo's CNN), a torchvision ResNet-18 state_dict, or a "
    "state_dict of --arch"
)
# solo-learn 1.0.6's input normalisation per dataset (solo/data/pretrain_dataloader.py); others: ImageNet's.
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_SOLO_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)),
}
# torchvision ResNet children -> their index in nn.Sequential(*children[:-1]) (the demo's layout).
_RESNET_CHILDREN = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be turned into an encoder; the message says why and what would fit."""


class PixelInput(nn.Module):
    """``backbone((x - mean) / std)``: an encoder trained on normalised inputs, taking ``[0, 1]`` pixels."""

    mean: Tensor
    std: Tensor

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone((x - self.mean) / self.std)


def save_checkpoint(
    path: str | Path,
    encoder: nn.Module,
    *,
    arch: str,
    dataset: str,
    config: dict | None = None,
    arch_options: dict | None = None,
) -> Path:
    """Save an encoder so that :func:`load_checkpoint` (``weights_only=True``) can rebuild it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    normalize = None
    if isinstance(encoder, PixelInput):
        normalize = [encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()]
        encoder = encoder.backbone
    in_channels = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d)).in_channels
    record = {
        "format": FORMAT,
        "arch": arch,
        "arch_options": dict(arch_options or {}),
        "in_channels": in_channels,
        "normalize": normalize,
        "dataset": dataset,
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "config": _plain(config or {}),
    }
    torch.save(record, path)
    return path


def load_checkpoint(
    path: str | Path, *, arch: str | None = None, in_channels: int | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild an encoder taking ``[0, 1]`` pixels from any checkpoint kind of :data:`SUPPORTED`.

    Args:
        path: The file.
        arch: For a bare ``state_dict`` of one of the demo's architectures (others are recognised).
        in_channels: Likewise, the input channels (default: read from the first convolution).

    Returns:
        ``(encoder in eval mode, metadata)``; the metadata names the ``source`` kind, the ``arch`` and its
        ``arch_options``, ``in_channels``, the input ``normalize`` (or ``None``) and, where recorded, the
        ``dataset``.

    Raises:
        CheckpointError: A missing file, a file that is no checkpoint, a checkpoint of another kind, or weights
            that do not fit the architecture (naming the first mismatching keys).
    """
    path = Path(path)
    record = _read(path)
    if isinstance(record, dict) and "state_dict" in record and "arch" in record:  # robust-reg's own
        meta = {k: v for k, v in record.items() if k != "state_dict"}
        meta.setdefault("source", "robust-reg")
        meta.setdefault("arch_options", {})
        meta.setdefault("normalize", None)
        if arch is not None:
            meta["arch"] = arch
        if in_channels is not None:
            meta["in_channels"] = in_channels
        return _build(path, record["state_dict"], meta), meta
    if (
        isinstance(record, dict)
        and isinstance(record.get("state_dict"), dict)
        and "pytorch-lightning_version" in record
    ):
        state, meta = _lightning(path, record["state_dict"])
    elif _is_state_dict(record):
        state, meta = dict(record), {"source": "state_dict", "normalize": None}
    else:
        raise CheckpointError(f"checkpoint {path} is none of what robust-reg reads: {SUPPORTED}")
    meta.update(_layout(path, state, arch, in_channels, meta["source"]))
    state = meta.pop("_state")
    return _build(path, state, meta), meta


def _read(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    with path.open("rb") as file:
        magic = file.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"\x80")):  # torch.save: a zip, or a pickle
        what = "a Python source file" if path.suffix == ".py" else f"it starts with {magic!r}"
        raise CheckpointError(
            f"checkpoint {path} is not a robust-reg checkpoint or state_dict ({what}, not a file torch.save writes)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is not what we can read
        text = str(err).strip()
        reason = textwrap.shorten(text.splitlines()[0], 160, placeholder=" ...") if text else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is not a robust-reg checkpoint or state_dict ({reason})") from err


def _is_state_dict(record: Any) -> bool:
    return isinstance(record, dict) and bool(record) and all(isinstance(v, Tensor) for v in record.values())


def _lightning(path: Path, state: dict) -> tuple[dict, dict]:
    """The ``backbone.`` weights of a Lightning module's checkpoint, and what ``args.json`` beside it says."""
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        prefixes = sorted({k.split(".")[0] for k in state})
        raise CheckpointError(
            f"checkpoint {path} is a Lightning checkpoint without a `backbone` module (it has "
            f"{', '.join(prefixes[:6])}); robust-reg reads {SUPPORTED}"
        )
    meta: dict[str, Any] = {"source": "lightning", "normalize": None}
    args = path.parent / "args.json"
    if args.is_file():  # solo-learn's Checkpointer writes the run's config beside its checkpoints
        config = json.loads(args.read_text())
        dataset = str((config.get("data") or {}).get("dataset"))
        augmentation = (config.get("augmentations") or [{}])[0]
        mean, std = _SOLO_NORMALIZATION.get(
            dataset, (augmentation.get("mean", _IMAGENET[0]), augmentation.get("std", _IMAGENET[1]))
        )
        meta.update(source="solo-learn", dataset=dataset, method=config.get("method"), normalize=[mean, std])
    return backbone, meta


def _layout(path: Path, state: dict, arch: str | None, in_channels: int | None, source: str) -> dict:
    """The architecture a state_dict fits, and the state in the demo's key layout (``_state``)."""
    if "conv1.weight" in state and "layer4.1.bn2.weight" in state:  # torchvision's ResNet-18 names
        state = {_resnet_key(k): v for k, v in state.items() if not k.startswith("fc.")}
    if arch is None and "7.1.bn2.weight" in state and "0.weight" in state:  # nn.Sequential(*resnet18[:-1])
        arch = "resnet18" if state["0.weight"].shape[-1] == 3 else "resnet18-imagenet"
    if arch is None:
        raise CheckpointError(
            f"checkpoint {path} holds a bare state_dict of no layout robust-reg recognises: pass --arch "
            f"({', '.join(ARCHITECTURES)}) and --in-channels N if it is one of those; robust-reg reads {SUPPORTED}"
        )
    first = next((v for k, v in state.items() if k.endswith("weight") and v.dim() == 4), None)
    channels = in_channels or (int(first.shape[1]) if first is not None else None)
    if channels is None:
        raise CheckpointError(f"checkpoint {path} does not show its input channels: pass --in-channels N")
    # solo-learn's CIFAR ResNets pad their 3x3 stem by 2 (ours by 1): the same weights, another network.
    options = {"stem_padding": 2} if arch == "resnet18" and source == "solo-learn" else {}
    return {"arch": arch, "arch_options": options, "in_channels": channels, "_state": state}


def _resnet_key(key: str) -> str:
    head, _, rest = key.partition(".")
    return f"{_RESNET_CHILDREN[head]}.{rest}" if head in _RESNET_CHILDREN else key


def _build(path: Path, state: dict, meta: dict) -> nn.Module:
    arch, options = meta["arch"], dict(meta.get("arch_options") or {})
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint {path}: unknown architecture {arch!r}; one of {tuple(ARCHITECTURES)}")
    if meta.get("in_channels") is None:
        raise CheckpointError(f"checkpoint {path} does not record its input channels: pass --in-channels N")
    backbone = build_encoder(arch, int(meta["in_channels"]), **options)
    _check_layout(path, state, backbone, arch, int(meta["in_channels"]))
    backbone.load_state_dict(state)
    normalize = meta.get("normalize")
    if normalize is None:
        return backbone.eval()
    return PixelInput(backbone, tuple(normalize[0]), tuple(normalize[1])).eval()


def _check_layout(path: Path, state: dict, encoder: nn.Module, arch: str, in_channels: int) -> None:
    """Raise ``CheckpointError`` naming the first keys or shapes that do not fit ``arch``."""
    expected = encoder.state_dict()
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (unexpected or missing or wrong):
        return
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}")
    if missing:
        problems.append(f"missing keys {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    if wrong:
        problems.append(f"shapes {', '.join(wrong[:2])}")
    layout = ", ".join(list(expected)[:3])
    raise CheckpointError(
        f"checkpoint {path} does not fit --arch {arch} --in-channels {in_channels}: {'; '.join(problems)}; "
        f"--arch {arch} expects keys {layout}, ... ({len(expected)} in all)"
    )


def _plain(obj: Any) -> Any:
    """Only str/int/float/bool/None/list/dict: loadable with ``weights_only=True``."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
