"""The README's quick start and the per-method plain loops run as written, with the recommended call."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from robust_reg import RobustnessRegularizer

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = ROOT / "examples" / "snippets"


@pytest.fixture
def regulariser_calls(monkeypatch):
    """Every regulariser call's (form, whether a positive was given)."""
    calls = []
    original = RobustnessRegularizer.forward

    def spy(self, encoder, x, *args, **kwargs):
        calls.append((self.form, kwargs.get("positive") is not None))
        return original(self, encoder, x, *args, **kwargs)

    monkeypatch.setattr(RobustnessRegularizer, "forward", spy)
    return calls


@pytest.mark.parametrize("method", ["simclr", "byol", "mocov3", "vicreg"])
def test_each_method_snippet_trains_with_the_recommended_call(method, monkeypatch, regulariser_calls):
    pytest.importorskip("lightly")
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(SNIPPETS))
    try:
        module = importlib.import_module(method)
        torch.manual_seed(0)
        loss = module.train(steps=3)
    finally:  # the snippets' plain module names must not linger for other tests
        for name in (method, "common"):
            sys.modules.pop(name, None)
    assert torch.isfinite(torch.tensor(loss))
    assert regulariser_calls == [("embedding", True)] * 3


def _readme_quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start: plain PyTorch") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_quick_start_runs_verbatim(regulariser_calls):
    lightly_loss = pytest.importorskip("lightly.loss")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))
    before = [p.detach().clone() for p in model.parameters()]
    namespace = {
        "loader": [(torch.rand(8, 3, 16, 16), torch.zeros(8)) for _ in range(2)],
        "augment": lambda x: (x + 0.01 * torch.randn_like(x)).clamp(0, 1),
        "model": model,
        "criterion": lightly_loss.NTXentLoss(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
    }
    exec(compile(_readme_quick_start(), "README.md quick start", "exec"), namespace)
    assert regulariser_calls == [("embedding", True)] * 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_readme_pretrained_backbone_line_runs_verbatim():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## You already have a pretrained backbone") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    before = [p.detach().clone() for p in backbone.parameters()]
    namespace = {"backbone": backbone, "train_loader": [(torch.rand(8, 3, 16, 16), torch.zeros(8)) for _ in range(2)]}
    exec(compile(code, "README.md pretrained backbone", "exec"), namespace)
    assert namespace["robust"] is not backbone and not namespace["robust"].training
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.parameters()))
