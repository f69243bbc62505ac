"""Atomic, resumable DeepSpeed checkpoints: temp directory + rename, last-k kept.

Layout under ``<run>/checkpoints/``::

    step00000120/        a complete checkpoint (DeepSpeed files + rank*_extra.pt + COMPLETE)
    latest               text file naming the newest complete checkpoint
    .tmp/                where a checkpoint is written before it is renamed into place

A run killed at any moment leaves either the previous complete checkpoint or the new one, never a
half-written directory that resume would pick. The run directory is assumed to be on a file system
every rank sees (the usual multi-node setup); each rank writes its own shard files.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from genssl.engine.atomic import write_text_atomic
from genssl.engine.distributed import DistInfo, barrier

COMPLETE = "COMPLETE"


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        dfd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, dist: DistInfo):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.dist = dist

    def latest(self) -> str | None:
        """Tag of the newest complete checkpoint, or None."""
        marker = self.dir / "latest"
        if marker.is_file():
            tag = marker.read_text().strip()
            if (self.dir / tag / COMPLETE).is_file():
                return tag
        # `latest` lost or stale (killed between rename and marker): fall back to a scan.
        tags = sorted(p.name for p in self.dir.glob("step*") if (p / COMPLETE).is_file())
        return tags[-1] if tags else None

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> str:
        """Collective: every rank calls it. ``rank_state`` is this rank's own (RNG, loader)."""
        tag = f"step{step:08d}"
        tmp_root = self.dir / ".tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp_root / tag, ignore_errors=True)
            tmp_root.mkdir(parents=True, exist_ok=True)
        barrier()
        engine.save_checkpoint(str(tmp_root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, tmp_root / tag / f"rank{self.dist.rank:05d}_extra.pt")
        barrier()
        if self.dist.is_main:
            _fsync_tree(tmp_root / tag)
            (tmp_root / tag / COMPLETE).write_text(str(self.dist.world_size))
            shutil.rmtree(self.dir / tag, ignore_errors=True)
            os.rename(tmp_root / tag, self.dir / tag)
            write_text_atomic(self.dir / "latest", tag)
            self._prune()
        barrier()
        return tag

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.dir.glob("step*") if (p / COMPLETE).is_file())
        for old in tags[: -self.keep_last]:
            shutil.rmtree(self.dir / old, ignore_errors=True)

    def load(self, engine, tag: str) -> tuple[dict, dict]:
        """Restore the engine (model, optimizer) and return (client_state, this rank's state)."""
        saved_world = int((self.dir / tag / COMPLETE).read_text() or 0)
        if saved_world != self.dist.world_size:
            raise ValueError(
                f"checkpoint {self.dir / tag} was written by {saved_world} ranks but this run has "
                f"{self.dist.world_size}; resume with the same number of ranks, or start afresh with a new out= "
                "(or ckpt.resume=false)")
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        rank_state = torch.load(self.dir / tag / f"rank{self.dist.rank:05d}_extra.pt", weights_only=False)
        return client_state, rank_state
