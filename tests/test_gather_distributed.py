"""``gather_distributed=True``: under torch.distributed the value and the DDP-averaged gradient are those
of one process on the concatenated batch (two CPU processes on gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from robust_reg import BackboneRobustnessRegularizer

WORLD = 2
HERE = Path(__file__).resolve().parent


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, 8))


def batch() -> torch.Tensor:
    return torch.rand(12, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def value_and_grad(model: nn.Module, x: torch.Tensor, gather: bool, skip: int = 0) -> tuple[float, list[torch.Tensor]]:
    """The regulariser's value and gradient; the random start of sample i is the i-th draw after a seed,
    whichever process runs it (a process holding the second half skips the first half's draws)."""
    torch.manual_seed(2)
    torch.empty(skip, *x.shape[1:]).uniform_(-0.1, 0.1)
    value = BackboneRobustnessRegularizer(epsilon=0.1, steps=2, gather_distributed=gather)(model, x).loss
    grads = torch.autograd.grad(value, list(model.parameters()))
    return value.item(), list(grads)


def _worker(rank: int, out: str, gather: bool) -> None:
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to race for on a busy machine.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        shard = batch().chunk(WORLD)[rank]
        value, grads = value_and_grad(encoder(), shard, gather, skip=rank * shard.shape[0])
        for g in grads:  # what DDP does to parameter gradients
            dist.all_reduce(g)
            g /= WORLD
        torch.save({"value": value, "grads": grads}, f"{out}/rank{rank}.tmp")
        os.replace(f"{out}/rank{rank}.tmp", f"{out}/rank{rank}.pt")  # complete or absent
    finally:
        dist.destroy_process_group()


def run_two_processes(out, gather: bool) -> list[dict]:
    """Spawn the two ranks from a fresh interpreter, as tests/test_ddp.py does: state other tests leave
    in this process (threads, environment) made spawned gloo workers abort in the full suite."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import {__name__} as t; t._spawn({str(out)!r}, {gather})"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _spawn(out: str, gather: bool) -> None:
    try:
        mp.spawn(_worker, args=(out, gather), nprocs=WORLD, join=True)
    except mp.ProcessExitedException:
        # Seen here now and then: a gloo worker aborting (SIGABRT) as the process group is torn down.
        # Each rank saves its complete result before teardown; without both results this still fails.
        if not all(Path(out, f"rank{r}.pt").is_file() for r in range(WORLD)):
            raise
        print("a worker exited abnormally after saving its result", file=sys.stderr)


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    return run_two_processes(tmp_path_factory.mktemp("gathered"), gather=True)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return run_two_processes(tmp_path_factory.mktemp("local"), gather=False)


@pytest.fixture(scope="module")
def single():
    value, grads = value_and_grad(encoder(), batch(), gather=False)
    assert value > 0.01  # a real deviation, so the comparisons below can fail
    return value, grads


def test_gathered_value_equals_the_single_process_value_on_the_whole_batch(gathered, single):
    for rank in gathered:
        assert rank["value"] == pytest.approx(single[0], rel=1e-5)


def test_gathered_gradient_after_ddp_averaging_equals_the_single_process_gradient(gathered, single):
    for got, want in zip(gathered[0]["grads"], single[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_without_gathering_each_process_divides_by_its_local_spread(local, single):
    assert local[0]["value"] != pytest.approx(single[0], rel=1e-3)


def test_outside_torch_distributed_gathering_is_a_no_op(single):
    assert value_and_grad(encoder(), batch(), gather=True)[0] == pytest.approx(single[0], rel=1e-6)
