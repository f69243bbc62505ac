"""Atomic, resumable DeepSpeed checkpoints: temp directory + rename, last-k kept.

Layout under ``<run>/checkpoints/``::

    step00000120/        a complete checkpoint (DeepSpeed files + rank*_extra.pt + COMPLETE)
    latest               text file naming the newest complete checkpoint (informative: resume scans)
    .tmp/                where a checkpoint is written before it is renamed into place

A run killed at any moment leaves either the previous complete checkpoint or the new one, never a
half-written directory that resume would pick. The run directory is assumed to be on a file system
every rank sees (the usual multi-node setup); each rank writes its own shard files.

Resume unpickles nothing but tensors, plain values and an allow-list: a checkpoint folder may come
from someone else, and a full unpickle runs whatever the file names. ``rank*_extra.pt`` holds tensors and plain numbers only (the python and numpy
RNG states are converted to tensors, `rng_state`) and is read with ``torch.load(weights_only=True)``
and no allow-list. DeepSpeed reads its own files with ``weights_only=False``; `CheckpointManager.load`
makes those reads ``weights_only=True`` too, allowing the few DeepSpeed classes its optimizer states
hold (`_deepspeed_safe_globals`: records rebuilt from their attributes, an enum; no code of the file's).
"""

from __future__ import annotations

import datetime
import os
import pickle
import random
import re
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
    """This process's RNG states as tensors and plain numbers (``torch.load(weights_only=True)`` reads
    them back): python's Mersenne Twister words [625] and numpy's keys [624] as int64 tensors."""
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint files hold (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3, fp32 and bf16 checkpoints):
    the optimizer's loss scaler and the (numel, start) records of its parameter slices, both rebuilt
    from their attributes, and the ZeRO stage enum."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose ``load`` is ``torch.load(weights_only=True)`` with
    `_deepspeed_safe_globals` allowed; everything else is the wrapped engine's."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def _refuse_pickled(path: Path, exc: Exception) -> ValueError:
    # torch's message is a page long and suggests weights_only=False: name only what was refused
    found = re.search(r"GLOBAL (\S+)", str(exc))
    what = f"a pickled {found.group(1)}" if found else "pickled objects"
    return ValueError(
        f"{path} holds {what}, which genssl does not unpickle (loading it could run code of the file's); it was "
        "written by an older genssl or by another program. Start afresh with a new out= (or ckpt.resume=false), or "
        "resume with the genssl version that wrote it")


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, dist: DistInfo):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.dist = dist

    def latest(self) -> str | None:
        """Tag of the newest complete checkpoint (highest step with ``COMPLETE``), or None.

        Found by a scan, not read from the ``latest`` file: a run killed after renaming a checkpoint
        into place but before rewriting ``latest`` has that checkpoint complete while ``latest`` still
        names the one before (bench/faults.py, point ``ckpt-rename``); trusting the file would throw
        away a checkpoint interval of work. ``latest`` is kept for people and tools."""
        tags = sorted(p.name for p in self.dir.glob("step*") if (p / COMPLETE).is_file())
        return tags[-1] if tags else None

    def set_aside(self) -> Path | None:
        """Collective. A fresh start (``ckpt.resume=false``) in a folder holding checkpoints renames
        ``checkpoints/`` to ``checkpoints.replaced-<UTC time>/`` and returns it (None when there was
        nothing to keep). Left in place, the old run's checkpoints would be taken for this run's: the
        newest step would survive pruning and a later rerun would resume it, while this run's own
        checkpoints, at lower steps, were deleted as the oldest."""
        aside = None
        if self.dist.is_main and any(self.dir.glob("step*")):
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            aside = self.dir.with_name(f"{self.dir.name}.replaced-{stamp}")
            os.rename(self.dir, aside)
            print(f"ckpt.resume=false: the checkpoints already in {self.dir} were moved to {aside} (delete it "
                  "when it is not needed); this run starts from step 0", flush=True)
        barrier()
        return aside

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
        inner = engine.checkpoint_engine
        engine.checkpoint_engine = _WeightsOnlyLoads(inner)
        try:
            path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        except pickle.UnpicklingError as exc:
            raise _refuse_pickled(self.dir / tag, exc) from None
        finally:
            engine.checkpoint_engine = inner
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        extra = self.dir / tag / f"rank{self.dist.rank:05d}_extra.pt"
        try:
            rank_state = torch.load(extra, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refuse_pickled(extra, exc) from None
        return client_state, rank_state
