"""Leave the user's model exactly as we found it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.dropout import _DropoutNd

# Stochastic layers of common libraries, matched by class name so that neither needs importing:
# torchvision.ops.StochasticDepth, timm's DropPath and DropBlock2d.
_STOCHASTIC_NAMES = ("StochasticDepth", "DropPath", "DropBlock2d")


def active_stochastic_layers(module: nn.Module, extra: tuple[type, ...] = ()) -> list[nn.Module]:
    """Submodules in training mode whose output is random: dropout of any kind, attention dropout,
    stochastic depth, drop-path, and instances of ``extra``. Layers with a drop probability of 0
    are not random."""
    found: list[nn.Module] = []
    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, nn.MultiheadAttention):  # its attention dropout is a float, on in train mode
            if m.dropout > 0:
                found.append(m)
        elif isinstance(m, _DropoutNd) or type(m).__name__ in _STOCHASTIC_NAMES or isinstance(m, extra):
            p = getattr(m, "p", getattr(m, "drop_prob", getattr(m, "drop_rate", None)))
            if p is None or p > 0:
                found.append(m)
    return found


@contextmanager
def preserved_state(module: nn.Module, *, eval_mode: bool = False) -> Iterator[None]:
    """Run a block without lasting side effects on ``module``.

    Inside the block, normalisation layers in training mode still normalise with
    batch statistics but do not update their running statistics (nor
    ``num_batches_tracked``). On exit, also when an exception escapes, every
    submodule's ``training`` flag and every parameter's ``requires_grad`` are
    restored exactly (flags are written directly, so a user's ``train()``
    override is not re-run).

    Args:
        module: The model to protect.
        eval_mode: Put the whole model in eval mode inside the block.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
        >>> with torch.no_grad(), preserved_state(model):
        ...     _ = model(torch.randn(8, 4))  # batch statistics, running statistics untouched
        >>> model[1].num_batches_tracked.item(), model.training
        (0, True)
    """
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    toggled: list[_BatchNorm] = []
    snapshots: list[tuple[nn.Module, list[tuple[str, torch.Tensor]]]] = []
    try:
        if eval_mode:
            module.eval()
        for m in module.modules():
            if not (isinstance(m, _NormBase) and m.training and m.track_running_stats):
                continue
            if isinstance(m, _BatchNorm):
                # In training mode BatchNorm passes no running buffers to the
                # kernel when tracking is off, so nothing is written: no copy needed.
                m.track_running_stats = False
                toggled.append(m)
            else:
                # InstanceNorm with tracked stats updates them regardless: snapshot.
                snapshots.append((m, [(n, b.detach().clone()) for n, b in m.named_buffers(recurse=False)]))
        yield
    finally:
        for m in toggled:
            m.track_running_stats = True
        with torch.no_grad():
            for m, buffers in snapshots:
                for name, saved in buffers:
                    getattr(m, name).copy_(saved)
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
