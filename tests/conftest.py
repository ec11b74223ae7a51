"""Shared fixtures: small real models and real offline data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import small_cnn

# The screening harness (benchmarks/harness.py) is not part of the package: its tests import it from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture
def encoder() -> nn.Module:
    torch.manual_seed(0)
    return small_cnn()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(16, 1, 12, 12)


@pytest.fixture(scope="session")
def digits():
    """sklearn's 1,797 real 8x8 digits, scaled to [0, 1], as (x, y) tensors."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y
