"""Running a test scenario in several spawned processes (the distributed tests' launcher)."""

import multiprocessing as mp
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

WORLD = 2  # processes
SHARD = 16  # examples per rank; single-process references use WORLD * SHARD


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(
    worker: Callable[[int, int, str, str], None],
    scenario: str,
    tmp_path: Path,
    world: int,
    limit: float,
) -> list[dict]:
    """Run ``worker(rank, port, out_dir, scenario)`` in ``world`` processes; each leaves its
    result in ``out_dir/rank{r}.pt``. Ranks still running after ``limit`` seconds are killed
    and fail the test; a rank that wrote nothing gives ``{}``."""
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(r, port, str(tmp_path), scenario), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(5)
    assert not alive, f"{scenario}: ranks still running after {limit} s"
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {})
    return results


def step_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full float64 batch of a training step, the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * SHARD, 6, generator=gen, dtype=torch.float64)
    y = torch.sin(x[:, :1] * 1.5) + 0.3 * x[:, 1:2] * x[:, 2:3]
    return x, y


def spawn_clean(
    worker: Callable[[int, int, str, str], None], scenario: str, tmp_path: Path, limit: float
) -> list[dict]:
    """:func:`spawn` over ``WORLD`` ranks, failing the test if any rank reported an error."""
    results = spawn(worker, scenario, tmp_path, WORLD, limit)
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res.get('error')}"
    return results
