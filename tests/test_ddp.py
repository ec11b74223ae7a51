"""The lightly adapter under Lightning's real ``ddp`` strategy: two CPU processes, gloo."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightly")
pytest.importorskip("pytorch_lightning")

SCRIPT = Path(__file__).with_name("ddp_lightly_script.py")


@pytest.mark.parametrize("method, mode", [("simclr", "plain"), ("byol", "adversarial_view")])
def test_two_ddp_ranks_finish_in_sync_with_finite_regulariser(tmp_path, method, mode):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), method, mode],
        cwd=SCRIPT.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]["values"]) == len(ranks[1]["values"]) == 3
    assert all(math.isfinite(v) and v > 0 for rank in ranks for v in rank["values"])
    # Each rank regularised its own shard of the data ...
    assert ranks[0]["values"] != ranks[1]["values"]
    # ... yet gradients were all-reduced: parameters are identical across ranks,
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    # and training did move them.
    assert any(not torch.equal(v, ranks[0]["initial"][k]) for k, v in ranks[0]["params"].items())
