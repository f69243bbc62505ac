"""StableRep training batches: every source with all its m synthetic views (docs/METHODS.md §3).

StableRep (Tian et al., NeurIPS 2023, arXiv:2306.00984) treats the m images generated from one
caption as positives of each other, so a batch must hold *all* m views of each of its sources (the
paper's minibatch ``x: [n, m, 3, h, w]``). This loader yields, per rank, n = ``batch_size`` sources
and V views of each, every view augmented on its own:

* ``synthetic`` (the paper's setting): V = m synthetic views of the view store;
* ``real+synthetic``: V = 1 + m, view slot 0 the real image, slots 1..m its synthetic views.

Which m of a source's K ≥ m stored views it uses in an epoch is a function of (seed, epoch, source)
(the official code generates 10 images per caption and samples 6 per batch). Sources are sharded
across ranks by `genssl.data.sampler.rank_batches` (one permutation per (seed, epoch), rank r takes
every W-th source of each global batch), so all views of a source are on one rank and in one global
batch, and a W-rank run sees exactly the sources of a 1-rank run with W times the batch.

Augmentation: view slot c gets the plan of global crop c of ``spec`` (blur and solarize probabilities
cycling as in `MultiCropSpec.plans`; ``n_local`` must be 0). Every random number of batch ``step`` is
drawn on the host from ``np.random.default_rng([seed, epoch, rank, step])``, in a fixed order that does
not depend on what the store holds: the crop parameters of all slots for the views' size, then for
the real images' size. So a batch is a pure function of (seed, epoch, rank, step) and of the damage:
``iter_from(k)`` yields exactly batches ``k..`` of the uninterrupted epoch, reading nothing before.

Damage (as `genssl.data.gensis_loader`). The views are checked on the host before DALI sees them
(`ViewStoreReader.encoded_views`: crc32c, present, an image); a source whose views fail
(`ViewStoreError`) has all its synthetic slots cut from its real image instead, with the real-size
parameters of those slots (status ``VIEW_DAMAGED``): the crops stay positives of the right source.
In ``synthetic`` mode the real file is read only for such a source. A real file that changed since
indexing (``real+synthetic``), or a damaged source whose real file is unusable too, or a damaged
source without real images (a captions store), is replaced by another sample of the batch — the next
usable one, cyclically — with its index (status ``SUBSTITUTED``): a duplicated source is still
correctly labelled. Each damaged source is reported once per run (a warning and ``<store>.damage.json``);
a batch with no usable sample stops the run with an error.

Reading runs in a background thread (`genssl.data.dali_loader.read_ahead`); views are decoded by
DALI's image decoder like the real images ("mixed" on the GPU with ``device_id``, CPU otherwise).
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.pipeline import Pipeline, pipeline_def

from genssl.data.augment import MultiCropSpec, sample_multicrop_params
from genssl.data.dali_loader import (SUBSTITUTED, VIEW_DAMAGED, FileReader, ProblemCounts, ProblemReport, _decode,
                                     _Driver, read_ahead)
from genssl.data.gensis_loader import _PLACEHOLDER, _crop, _decoded_or, _slot_spec, open_store_reader
from genssl.data.index import DatasetIndex
from genssl.data.sampler import EpochLoader
from genssl.data.viewstore import REPAIR_HINT, ViewStoreError, ViewStoreReader

__all__ = ["MODES", "MultiViewBatch", "MultiViewLoader"]

MODES = ("synthetic", "real+synthetic")
_SALT_CHOICE = 0x5EED_0003


@dataclasses.dataclass
class MultiViewBatch:
    """One rank's batch. ``crops``: V float32 ``[n, 3, G, G]`` (view slot v of every source; on the
    loader's device), ``indices`` int64 ``[n]`` the sources, ``real`` bool ``[n, V]`` (the slot holds a
    crop of the real image: slot 0 in ``real+synthetic``, or a damaged view's fallback), ``status`` uint8
    ``[n]`` (`genssl.data.dali_loader` bits). Unpacks as ``crops, indices = batch``."""

    crops: list[torch.Tensor]
    indices: torch.Tensor
    real: torch.Tensor
    status: torch.Tensor

    def __iter__(self):
        return iter((self.crops, self.indices))


class _Feed:
    """The host inputs of any batch (a pure function of (epoch, step) and of the damage)."""

    def __init__(self, index: DatasetIndex | None, reader: ViewStoreReader, spec: MultiCropSpec, m: int,
                 real_slot: bool, rank: int, seed: int, read_threads: int):
        self.index, self.reader, self.m, self.real_slot = index, reader, m, real_slot
        self.rank, self.seed = rank, seed
        self.K = reader.store.views_per_image
        self.n_views = m + int(real_slot)
        self.spec = dataclasses.replace(spec, n_global=self.n_views, n_local=0)  # slot c = global crop c's plan
        self.view_wh = np.array([reader.store.width, reader.store.height], dtype=np.int64)
        self.files = FileReader.for_index(index) if index is not None else None
        since = self.files.report.since_ns if self.files is not None else None
        self.damage = ProblemReport(Path(str(reader.path) + ".damage.json"), "sources", "source",
                                    {"store": str(reader.path)}, since)
        self.pool = ThreadPoolExecutor(read_threads, thread_name_prefix="genssl-multiview") if read_threads > 1 else None

    def view_choice(self, epoch: int, sources: np.ndarray) -> np.ndarray:
        """``[n, m]``: which of its K stored views each source uses in ``epoch`` (distinct, in random order)."""
        return np.stack([np.random.default_rng([self.seed, epoch, _SALT_CHOICE, int(i)]).permutation(self.K)[:self.m]
                         for i in sources]).astype(np.int64)

    def _views(self, i) -> list[bytes] | None:
        i = int(i)
        try:
            return self.reader.encoded_views(i)
        except ViewStoreError as e:
            why = str(e).removeprefix(f"view store {self.reader.path}: ").split(". To repair, ")[0]
            self.damage.add(i, {"source": i, "array": "synthetic views", "reason": why},
                            f"genssl.data: view store {self.reader.path}: the synthetic views of source {i} cannot be "
                            f"used ({why}); its views are cut from its real image (or another source stands in). "
                            f"To repair, {REPAIR_HINT}")
            return None

    def batch(self, order: np.ndarray, epoch: int, step: int) -> tuple:
        asked = order[step]
        b = len(asked)
        if self.real_slot:  # every sample needs its real image: a changed file is replaced first
            encoded, idx, status = self.files.batch(asked, self.pool)
        else:
            encoded, idx, status = [_PLACEHOLDER] * b, np.array(asked, np.int64, copy=True), np.zeros(b, np.uint8)
        rng = np.random.default_rng([self.seed, epoch, self.rank, step])
        view_params = sample_multicrop_params(rng, self.spec, np.tile(self.view_wh, (b, 1)))  # [b, V, P]
        real_sizes = self.index.sizes[idx] if self.index is not None else np.tile(self.view_wh, (b, 1))
        real_params = sample_multicrop_params(rng, self.spec, real_sizes)
        read = list(self.pool.map(self._views, idx)) if self.pool is not None else [self._views(i) for i in idx]
        usable = np.ones(b, dtype=bool)
        for s, views in enumerate(read):
            if views is not None:
                continue
            status[s] |= VIEW_DAMAGED
            if self.files is None:  # no real image to fall back to (a captions store)
                usable[s] = False
            elif not self.real_slot:
                data, why = self.files.read(int(idx[s]))
                if why is not None:
                    self.files.reported(int(idx[s]), why)
                    usable[s] = False
                else:
                    encoded[s] = data
        if not usable.any():
            raise RuntimeError(f"none of the {b} sources of this batch has usable views or real images (view store "
                               f"{self.reader.path}; see {self.reader.path}.damage.json). To repair, {REPAIR_HINT}")
        good = np.flatnonzero(usable)
        for s in np.flatnonzero(~usable):  # the next usable sample stands in, cyclically (module docstring)
            sub = next((g for g in good if g > s), good[0])
            encoded[s], idx[s], read[s], status[s] = encoded[sub], idx[sub], read[sub], status[sub] | SUBSTITUTED
            view_params[s], real_params[s] = view_params[sub], real_params[sub]
        choice = self.view_choice(epoch, idx)
        is_real = np.zeros((b, self.n_views), dtype=bool)
        is_real[:, 0] = self.real_slot
        slots = [[_PLACEHOLDER] * b for _ in range(self.m)]
        for s, views in enumerate(read):
            if views is None:
                is_real[s, int(self.real_slot):] = True
                continue
            for c in range(self.m):
                slots[c][s] = np.frombuffer(views[choice[s, c]], np.uint8)
        params = np.where(is_real[:, :, None], real_params, view_params).astype(np.float32)
        return (encoded, *slots, (~is_real).astype(np.uint8), params, idx, status, np.asarray(asked, np.int64))


@pipeline_def(enable_conditionals=True)
def _multiview_pipeline(source, spec: MultiCropSpec, m: int, real_slot: bool, decoder: int | None):
    n_views = m + int(real_slot)
    outs = fn.external_source(source=source, num_outputs=m + 6, batch=True, cycle="raise",
                              dtype=[types.UINT8] * (m + 2) + [types.FLOAT, types.INT64, types.UINT8, types.INT64],
                              ndim=[1] * (m + 2) + [2, 0, 0, 0])
    encoded, slots, synthetic, params, idx, status, asked = outs[0], outs[1:m + 1], outs[m + 1], *outs[m + 2:]
    real = _decode(encoded, decoder)
    crops = []
    for c in range(n_views):
        image = real
        if c >= int(real_slot):  # a view slot: its decoded view, or the real image where the view is damaged
            image = _decoded_or(fn.cast(synthetic[c], dtype=types.BOOL), slots[c - int(real_slot)], real, decoder)
        crops.append(_crop(image, _slot_spec(spec, c), params[c:c + 1]))
    return (*crops, synthetic, idx, status, asked)


class MultiViewLoader(EpochLoader):
    """StableRep batches for one rank (module docstring): yields `MultiViewBatch`; ``len()`` = steps per
    epoch; ``set_epoch``, ``iter_from(step)``, ``batches()`` as the other loaders.

    Args:
        store_path: the view store (``views.zarr``) with K >= m views per source.
        index: the real images the store was generated from (source i = ``index.paths[i]``); None for
            a store without real images (captions), which allows only ``mode="synthetic"``.
        batch_size: sources per rank (each brings V views).
        m: synthetic views per source per batch (StableRep: 6).
        mode: ``"synthetic"`` or ``"real+synthetic"``.
        expect_fingerprint: what the store's ``fingerprint`` must be; default ``index.fingerprint``
            (required without an index).
    """

    def __init__(self, store_path: str | os.PathLike, spec: MultiCropSpec, batch_size: int, rank: int, world_size: int,
                 seed: int, m: int = 6, mode: str = "synthetic", index: DatasetIndex | None = None,
                 device_id: int | None = None, num_threads: int = 2, expect_fingerprint: str | None = None,
                 prefetch: int = 2, read_threads: int = 4) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if index is None and mode != "synthetic":
            raise ValueError("mode='real+synthetic' needs the real images (index=); a store made from captions has none")
        if m < 1 or num_threads < 1 or prefetch < 1 or read_threads < 1:
            raise ValueError(f"need m, num_threads, prefetch, read_threads >= 1; got {m}, {num_threads}, {prefetch}, "
                             f"{read_threads}")
        if spec.n_local:
            raise ValueError(f"StableRep uses one crop per view: set crops.n_local=0 (got {spec.n_local})")
        if expect_fingerprint is None and index is None:
            raise ValueError("without index=, pass expect_fingerprint= (the fingerprint the store was made for)")
        reader = _open_store(store_path, index, expect_fingerprint or index.fingerprint, m)
        self.init_epochs(reader.store.n_sources, batch_size, rank, world_size, seed)
        self.store_path, self.spec, self.m, self.mode = Path(store_path), spec, int(m), mode
        self.n_views = self.m + int(mode == "real+synthetic")
        self.device_id, self.num_threads, self.prefetch = device_id, num_threads, prefetch
        self._feed = _Feed(index, reader, spec, self.m, mode == "real+synthetic", rank, seed, read_threads)
        self._problems = ProblemCounts()
        self._driver = _Driver(self._build, device_id)

    def view_choice(self, sources, epoch: int | None = None) -> np.ndarray:
        """``[n, m]`` stored view numbers ``sources`` use in ``epoch`` (default: the current one)."""
        return self._feed.view_choice(self.epoch if epoch is None else int(epoch), np.asarray(sources).reshape(-1))

    def iter_from(self, step: int) -> Iterator[MultiViewBatch]:
        """Batches ``step..len()-1`` of the current epoch; earlier ones are never read or decoded."""
        self.check_step(step)
        return self._iter(step)

    def read_problems(self) -> dict[str, int]:
        """``{"files_skipped", "views_damaged"}`` distinct files / sources met so far (for the metrics)."""
        return self._problems.counts()

    def _iter(self, step: int) -> Iterator[MultiViewBatch]:
        if step == len(self):
            return
        order, epoch = self.batches(), self.epoch
        feed = read_ahead((self._feed.batch(order, epoch, s) for s in range(step, len(order))), self.prefetch + 1)
        for outs in self._driver.run(feed):
            *crops, synthetic, idx, status, asked = outs
            self._problems.add(asked, idx, status)
            yield MultiViewBatch(list(crops), idx, synthetic == 0, status)

    def _build(self, source) -> Pipeline:
        pipe = _multiview_pipeline(source=source, spec=self._feed.spec, m=self.m, real_slot=self.mode != "synthetic",
                                   decoder=self.device_id, device_id=self.device_id, batch_size=self.batch_size,
                                   num_threads=self.num_threads,
                                   seed=self.seed + 7919 * self.rank, prefetch_queue_depth=self.prefetch)
        pipe.build()
        return pipe


def _open_store(store_path, index: DatasetIndex | None, fingerprint: str, m: int) -> ViewStoreReader:
    """Open the store and check it fits; every problem is a ValueError naming the fix."""
    rerun = "rerun the generation stage (deepspeed recipes/stablerep.py ... or recipes/generate_views.py) for these data"
    reader = open_store_reader(store_path, fingerprint, rerun)
    store = reader.store
    if index is not None and store.n_sources != len(index):
        raise ValueError(f"view store {store_path} holds {store.n_sources} sources but the dataset has {len(index)} "
                         f"images; {rerun}")
    if store.views_per_image < m:
        raise ValueError(f"view store {store_path} holds {store.views_per_image} views per source, fewer than m={m}; "
                         f"lower stablerep.m or {rerun} with generation.views_per_image >= {m} (a new out=)")
    missing = reader.missing()
    if missing:
        raise ValueError(f"view store {store_path}: {len(missing)} of {store.n_sources} sources are not generated yet "
                         f"(first: {missing[:8]}); {rerun} to complete it — it skips the sources already done")
    return reader
