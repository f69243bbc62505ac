"""Run a test scenario on several gloo ranks in spawned processes and collect each rank's results.

A scenario is ``SCENARIOS[name](rank, world) -> dict`` in a worker module; `spawn` imports that
module by name in every rank (spawned processes cannot receive the function itself).
"""

from __future__ import annotations

import importlib
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def _worker(rank: int, world: int, init_file: str, out_dir: str, module: str, scenario: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = importlib.import_module(module).SCENARIOS[scenario](rank, world)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # Tear down together: a rank destroying its gloo group while the other still has traffic in
        # flight can abort that rank ("terminate called without an active exception", seen once in CI).
        dist.barrier()
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(module: str, scenario: str, tmp_path: Path, world: int = 2) -> list[dict]:
    """Run ``module.SCENARIOS[scenario]`` on ``world`` gloo ranks; each rank's results (files the test wrote)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("TRITON_INTERPRET", "1")
    mp.spawn(_worker, args=(world, str(tmp_path / "dist_init"), str(tmp_path), module, scenario), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
