"""Helpers shared by the tests: small real models and state snapshots."""

from __future__ import annotations

import torch
from torch import nn

from robust_reg import WarmStart


def small_cnn(in_channels: int = 1, width: int = 8) -> nn.Module:
    """A conv encoder with BatchNorm (train-mode statistics matter) and a (N, C, 1, 1) output."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )


class Counting(nn.Module):
    """``encoder`` that counts its calls."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.calls = encoder, 0

    def forward(self, x):
        self.calls += 1
        return self.encoder(x)


def snapshot(module: nn.Module) -> dict:
    """Everything the user owns in a module: state dict, modes, flags, grads."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "modes": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in module.parameters()],
        "track": [getattr(m, "track_running_stats", None) for m in module.modules()],
    }


def assert_unchanged(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), f"state_dict entry {key} changed"
    assert before["modes"] == after["modes"], "train/eval modes changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad flags changed"
    assert before["track"] == after["track"], "track_running_stats flags changed"
    for i, (g0, g1) in enumerate(zip(before["grads"], after["grads"])):
        assert (g0 is None) == (g1 is None), f"parameter {i}: .grad appeared or vanished"
        if g0 is not None:
            assert torch.equal(g0, g1), f"parameter {i}: .grad changed"


# Lightning Trainer options for quiet CPU test runs (pytorch_lightning and lightning alike).
QUIET_TRAINER = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def capture_callback(base: type) -> type:
    """A callback class on ``base`` (``pytorch_lightning.Callback`` or ``lightning.Callback``) that
    records every step's loss and logged metrics and the backbone's gradients of the first step."""

    class Capture(base):
        def __init__(self):
            self.losses, self.metrics, self.grads = [], [], None

        def on_after_backward(self, trainer, module):
            if self.grads is None:
                self.grads = [p.grad.detach().clone() for p in module.backbone.parameters()]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(loss.item())
            self.metrics.append({k: v.item() for k, v in trainer.callback_metrics.items()})

    return Capture


def spy_on_regularizer(module: nn.Module, extra: tuple[str, ...] = ()) -> list:
    """Record ``(x, positive, *extra keyword arguments)`` of each call of a robustified module's regulariser."""
    calls = []
    reg = module.training_step.regularizer
    original = reg.forward

    def argument(kwargs: dict, name: str):
        start = kwargs.get("start")  # a warm start's memory, index and crops travel in start=memory.at(...)
        if name in ("memory", "index", "geometry") and isinstance(start, WarmStart):
            return getattr(start, name)
        return kwargs.get(name)

    def forward(encoder, x, **kwargs):
        calls.append((x, kwargs.get("positive"), *(argument(kwargs, name) for name in extra)))
        return original(encoder, x, **kwargs)

    reg.forward = forward
    return calls
