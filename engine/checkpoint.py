"""Atomic, resumable DeepSpeed checkpoints: temp directory + rename, last-k kept.

Layout under ``<run>/checkpoints/``::

    step00000120/        a complete checkpoint (DeepSpeed files + rank*_extra.pt + COMPLETE)
      universal/         its DeepSpeed universal form, made on the first resume at another world size
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

Resume at another world size (docs/ENGINE.md, "Resuming on a different number of ranks"): with ZeRO
1-3 (or the bf16 optimizer) each rank holds its own slice of the optimizer state, sized for the world
that wrote it. `CheckpointManager.to_universal` converts such a checkpoint once, with DeepSpeed's
``ds_to_universal``, into ``<tag>/universal/`` (whole tensors per parameter), which DeepSpeed loads
at any world size (``checkpoint.load_universal``). The converter unpickles in full, so every file is
first checked to load ``weights_only`` (`_check_weights_only`). ZeRO-0 fp32 checkpoints keep the
whole optimizer state in one file and load at any world size as they are.
"""

from __future__ import annotations

import datetime
import os
import pickle
import random
import re
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from genssl.engine.atomic import write_text_atomic
from genssl.engine.distributed import DistInfo, barrier

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"


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


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Python's, numpy's and torch's RNGs seeded from (seed, step, rank): a rank with no saved
    state to restore (a resume at another world size) still draws reproducibly."""
    words = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    random.seed(int(words[0]))
    np.random.seed(int(words[1]))
    torch.manual_seed((int(words[0]) << 32) | int(words[1]))


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


def _check_weights_only(folder: Path) -> None:
    """Every ``.pt`` file of ``folder`` loads with ``weights_only=True`` and the DeepSpeed allow-list,
    or a ValueError names the first that does not (before anything unpickles them in full)."""
    for path in sorted(folder.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refuse_pickled(path, exc) from None


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

    def world_size_of(self, tag: str) -> int:
        """How many ranks wrote checkpoint ``tag`` (its ``COMPLETE`` marker records it)."""
        return int((self.dir / tag / COMPLETE).read_text() or 0)

    def needs_universal(self, tag: str) -> bool:
        """True when ``tag`` was written at another world size with its optimizer state split across
        the ranks (ZeRO 1-3 or the bf16 optimizer write ``*optim_states.pt`` files): DeepSpeed then
        reads it only in its universal form (`to_universal`, ``checkpoint.load_universal``)."""
        return self.world_size_of(tag) != self.dist.world_size and any((self.dir / tag).glob("*optim_states.pt"))

    def to_universal(self, tag: str) -> None:
        """Collective. Make ``<tag>/universal/`` once: rank 0 converts with DeepSpeed's
        ``ds_to_universal`` into a temporary folder renamed into place, so a kill during the
        conversion leaves no half-written form; the others wait for it."""
        target = self.dir / tag / UNIVERSAL
        if self.dist.is_main and not (target / COMPLETE).is_file():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            _check_weights_only(self.dir / tag)
            tmp = self.dir / tag / f".{UNIVERSAL}-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            print(f"converting {self.dir / tag} ({self.world_size_of(tag)} ranks) to DeepSpeed's universal checkpoint "
                  f"for {self.dist.world_size} rank(s)", flush=True)
            # inject_missing_state: our checkpoints carry no Megatron-style universal_checkpoint_info
            args = SimpleNamespace(input_folder=str(self.dir / tag), output_folder=str(tmp), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
            with redirect_stdout(open(os.devnull, "w")):  # a page of progress lines per conversion
                ds_to_universal(args)
            (tmp / COMPLETE).write_text(str(self.world_size_of(tag)))
            _fsync_tree(tmp)
            os.rename(tmp, target)
        barrier()

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

    def load(self, engine, tag: str) -> tuple[dict, dict | None]:
        """Restore the engine (model, optimizer) and return (client_state, this rank's state).

        At another world size the rank states (RNG) of the writing ranks belong to no rank of this
        run: None. An engine built with ``checkpoint.load_universal`` reads ``<tag>/universal/``
        (`to_universal` first)."""
        universal = engine.load_universal_checkpoint()
        load_dir, load_tag = (self.dir / tag, UNIVERSAL) if universal else (self.dir, tag)
        if universal and not (load_dir / load_tag / COMPLETE).is_file():
            raise RuntimeError(f"{load_dir / load_tag} is missing: call to_universal({tag!r}) before load")
        # Two repairs after DeepSpeed 0.19's ZeRO-3 universal loader: it gives every param group the
        # first group's settings (ours differ per group: weight decay or none, late, fixed lr, see
        # engine/trainer.param_groups; all functions of the config and the step, so each group gets
        # its own back), and it stores one and the same `step` tensor in every group's optimizer
        # state, which Adam increments in place once per group: with 3 groups the bias correction
        # would count 3 steps per step.
        torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in torch_optimizer.param_groups]
        inner = engine.checkpoint_engine
        engine.checkpoint_engine = _WeightsOnlyLoads(inner)
        try:
            path, client_state = engine.load_checkpoint(str(load_dir), tag=load_tag)
        except pickle.UnpicklingError as exc:
            raise _refuse_pickled(self.dir / tag, exc) from None
        finally:
            engine.checkpoint_engine = inner
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        if universal:
            for group, own in zip(torch_optimizer.param_groups, settings):
                group.update(own)
            for state in torch_optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        if self.world_size_of(tag) != self.dist.world_size:
            return client_state, None
        extra = self.dir / tag / f"rank{self.dist.rank:05d}_extra.pt"
        try:
            rank_state = torch.load(extra, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refuse_pickled(extra, exc) from None
        return client_state, rank_state
