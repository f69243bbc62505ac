"""DALI loaders: DINO multi-crop training batches and centre-crop eval batches, one pipeline per rank.

Order and augmentation parameters are decided on the host, not by DALI:

* order: the project's shared epoch order (`genssl.data.sampler.rank_batches`): one permutation
  per (seed, epoch), cut to whole global batches (drop_last), rank ``r`` takes positions
  ``r::world_size``; so every rank has the same step count and a W-rank run reads exactly the
  samples of a 1-rank run with W times the batch. `epoch_batches` returns it as an array; the
  torch baseline and the synthetic loader use the same order.
* augmentation: every random number of batch ``step`` comes from
  ``np.random.default_rng([seed, epoch, rank, step])`` (see `genssl.data.augment`), fed to the graph
  through ``fn.external_source`` next to the file bytes.

So a batch is a pure function of (seed, epoch, rank, step): ``iter_from(k)`` starts the feed at
batch ``k`` without reading or decoding batches ``0..k-1``, and a resumed run gets exactly the
images *and* crops the uninterrupted run would have had, provided world size and batch size are
unchanged. With a different world size or batch size the order (and therefore the crops) differs;
changing only ``num_threads``/``prefetch`` or CPU vs GPU changes nothing but floating-point detail
(GPU and CPU decoders/resamplers differ in the last bits).

The feed runs a few batches ahead in a background thread (`read_ahead`), reading file bytes with
a small thread pool; decoding is DALI's ("mixed" = nvJPEG on the GPU when ``device_id`` is given,
CPU otherwise).

Files that changed after indexing. DALI fails the whole pipeline (and the run) on one undecodable
file, so `FileReader` checks every file before its bytes go to DALI: its size and mtime against the
index (``DatasetIndex.file_stats``) and a cheap header/trailer test (JPEG start and end-of-image
markers, PNG signature and IEND chunk). A WebDataset member is read in place (its byte range of its
shard, `genssl.data.index.sample_location`) and checked the same way, against its shard's size and
mtime. A file that was deleted, truncated, replaced or cannot be read is skipped: the sample takes
the bytes of the next sample of the batch (cyclically) whose file is fine, and its index becomes
that sample's (the batch is honest about what it holds); the crop parameters are drawn after this
choice, from the substitute's size. That is deterministic given the
same damage: a batch stays a pure function of (seed, epoch, rank, step) and of which files are
broken. Each such file is reported once per run (a warning, and an entry in ``read_errors.json``
next to the index's ``quarantine.json``; the next ``build_index`` re-validates and quarantines it),
and the loader counts them (``read_problems()``). A batch none of whose files can be read stops the
run with an error: the data are gone (unmounted?), not damaged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from genssl.data.augment import (P_BRIGHT, P_CONTRAST, P_FLIP, P_HUE, P_SAT, P_SIGMA, P_SOLAR, P_X0,
                                 P_X1, P_Y0, P_Y1, MultiCropSpec, sample_multicrop_params)
from genssl.data.index import READ_ERRORS_FILE, DatasetIndex, sample_location
from genssl.data.sampler import EpochLoader, rank_batches

NO_BLUR_SIGMA = 1e-3  # a 3-tap kernel whose side weights underflow to 0: exactly the identity
# Per-sample status bits (a pipeline output: what a sample holds instead of what was asked for).
SUBSTITUTED = 1     # its file could not be used: another sample of the batch was read in its place
VIEW_DAMAGED = 2    # its synthetic view failed its check: crop slot 1 is real (gensis_loader)
INTERP_DAMAGED = 4  # its interpolated view or partner failed: the interpolated crop is real, alpha 1 (gensis_loader)

log = logging.getLogger("genssl.data")


# ---------------------------------------------------------------------------------------------
# sampling


def epoch_batches(n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """``[steps, batch_size]`` sample indices this rank reads in ``epoch`` (the shared order of
    `genssl.data.sampler.rank_batches`, as one array; ``steps = n // (batch_size * world_size)``)."""
    _check_rank(rank, world_size)
    batches = rank_batches(n, batch_size, rank, world_size, seed, epoch)
    return np.asarray(batches, dtype=np.int64).reshape(len(batches), batch_size)


def eval_shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's samples for evaluation: ``rank::world_size``, no padding, no drop."""
    _check_rank(rank, world_size)
    return np.arange(rank, n, world_size, dtype=np.int64)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


# ---------------------------------------------------------------------------------------------
# reading files that may have changed since indexing


class ProblemReport:
    """Reports each problem once per run: a warning in the log and an entry ``{key_field: key, ...,
    "reported_ns"}`` in the JSON file ``path`` (``{"count", items: [...]}`` + ``header``), merged under a
    lock so every rank and reader process can add to it. "Once per run": a problem already in the file
    is reported again only when it was reported before ``since_ns`` (this run's loader was made), i.e.
    by an earlier run. ``path=None`` only logs. Picklable (spawned DALI workers)."""

    def __init__(self, path: str | os.PathLike | None, items: str, key_field: str, header: dict,
                 since_ns: int | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.items, self.key_field, self.header = items, key_field, header
        self.since_ns = time.time_ns() if since_ns is None else int(since_ns)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {**self.__dict__, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add(self, key, entry: dict, message: str) -> None:
        key = str(key)
        with self._lock:  # reader threads
            if key in self._seen:
                return
            self._seen.add(key)
            fresh = True
            if self.path is not None:
                try:
                    fresh = self._record(key, entry)
                except OSError as exc:  # e.g. a read-only dataset cache or view store: the log still has it
                    message += f" (could not be added to {self.path}: {exc.strerror or exc})"
            if fresh:
                log.warning("%s", message)

    def _record(self, key: str, entry: dict) -> bool:
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                doc = {}
                with contextlib.suppress(OSError, ValueError):
                    doc = json.loads(self.path.read_text())
                rows = {str(r.get(self.key_field)): r for r in doc.get(self.items, []) if isinstance(r, dict)}
                old = rows.get(key)
                if old is not None and old.get("reported_ns", 0) >= self.since_ns:
                    return False  # another rank or reader process of this run reported it
                rows[key] = {self.key_field: entry.get(self.key_field, key), **entry, "reported_ns": time.time_ns()}
                ordered = sorted(rows.values(), key=lambda r: str(r.get(self.key_field)))
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({**self.header, "count": len(ordered), self.items: ordered}, indent=1))
                os.replace(tmp, self.path)
                return True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def image_bytes_problem(data: np.ndarray) -> str | None:
    """Why DALI should not be given these bytes (None if they look whole): every indexed file is a JPEG
    or an 8-bit PNG (the index converts the rest), so a start marker and an end marker are a cheap
    test against truncation and replacement."""
    if len(data) == 0:
        return "the file is empty"
    head, tail = bytes(data[:8]), bytes(data[-64:])
    if head[:2] == b"\xff\xd8":
        return None if tail.rstrip(b"\x00").endswith(b"\xff\xd9") else "JPEG without its end-of-image marker (truncated)"
    if head == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "PNG without its IEND chunk (truncated)"
    return "neither a JPEG nor a PNG any more (replaced)"


class FileReader:
    """File bytes of indexed samples for DALI, checked first (module docstring, "Files that changed
    after indexing"). ``paths[i]`` a str or bytes path, ``stats`` ``[N, 2]`` (bytes, mtime_ns) or None
    (header test only); ``ranges``/``shards`` as in `DatasetIndex` (WebDataset members read in place:
    the stats are the shard's, so a member of a shard changed since indexing is skipped). Picklable."""

    def __init__(self, paths, stats: np.ndarray | None, report: ProblemReport | None,
                 ranges: np.ndarray | None = None, shards: Sequence[str] = ()) -> None:
        self.paths, self.stats, self.report = paths, stats, report
        self.ranges, self.shards = ranges, shards

    @classmethod
    def for_index(cls, index: DatasetIndex, paths=None, since_ns: int | None = None) -> "FileReader":
        """A reader of ``index`` (``paths``: a compact stand-in for ``index.paths``) reporting to
        ``read_errors.json`` beside its ``quarantine.json``."""
        where = Path(index.report).with_name(READ_ERRORS_FILE) if index.report is not None else None
        report = ProblemReport(where, "files", "path", {"root": str(index.root)}, since_ns)
        return cls(index.paths if paths is None else paths, index.file_stats, report, index.ranges, index.shards)

    def read(self, i: int) -> tuple[np.ndarray | None, str | None]:
        """``(bytes, None)``, or ``(None, why)`` when file ``i`` must not be decoded."""
        path, offset, length = sample_location(self.paths, self.ranges, self.shards, i)
        file, whose = ("it", "its") if length < 0 else ("its shard", "its shard's")
        try:
            with open(path, "rb") as f:
                if self.stats is not None and self.stats[i, 0] >= 0:
                    st, (size, mtime) = os.fstat(f.fileno()), self.stats[i]
                    if st.st_size != size:
                        return None, f"{whose} size changed since indexing ({size} -> {st.st_size} bytes): truncated or replaced"
                    if st.st_mtime_ns != mtime:
                        return None, f"{file} was modified since indexing (mtime changed): replaced or rewritten"
                if length >= 0:
                    f.seek(offset)
                data = np.fromfile(f, dtype=np.uint8, count=length)
        except FileNotFoundError:
            return None, f"{file} was deleted since indexing"
        except OSError as exc:
            return None, f"{file} cannot be read ({exc.strerror or exc})"
        if length >= 0 and len(data) != length:
            return None, f"its shard ends inside it ({len(data)} of {length} bytes): truncated"
        why = image_bytes_problem(data)
        return (None, why) if why else (data, None)

    def batch(self, idx: np.ndarray, pool: ThreadPoolExecutor | None = None
              ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """``(bytes per sample, indices read [B] int64, status [B] uint8)`` for asked indices ``idx``."""
        got = list(pool.map(self.read, idx)) if pool is not None and len(idx) > 1 else [self.read(i) for i in idx]
        final = np.array(idx, dtype=np.int64, copy=True)
        status = np.zeros(len(idx), dtype=np.uint8)
        good = [b for b, (data, _) in enumerate(got) if data is not None]
        if len(good) == len(got):
            return [data for data, _ in got], final, status
        if not good:
            shown = "; ".join(f"{os.fsdecode(self.paths[i])}: {why}" for i, (_, why) in list(zip(idx, got))[:3])
            raise RuntimeError(f"none of the {len(idx)} files of this batch can be read ({shown}; ...): the data seem "
                               "to be gone (unmounted, moved or deleted). Restore them and rerun the command: training "
                               "resumes from the last checkpoint, and the dataset index is re-validated")
        data = [d for d, _ in got]
        for b, (_, why) in enumerate(got):
            if why is None:
                continue
            sub = next((g for g in good if g > b), good[0])  # the next usable sample, cyclically
            data[b], final[b], status[b] = data[sub], idx[sub], SUBSTITUTED
            self.reported(int(idx[b]), why)
        return data, final, status

    def reported(self, i: int, why: str) -> None:
        """Report file ``i`` as unusable (once per run)."""
        if self.report is not None:
            path = os.fsdecode(self.paths[i])
            self.report.add(path, {"path": path, "index": int(i), "reason": why},
                            f"genssl.data: skipping {path}: {why}. Its samples use another image until the dataset "
                            f"index is rebuilt (the next run re-validates it)")


class ProblemCounts:
    """What a loader's batches held instead of what was asked, counted in the training process from
    the per-sample status: distinct files skipped and distinct sources whose views were damaged,
    since this loader was made. ``read_problems()`` of the loaders returns `counts`."""

    def __init__(self) -> None:
        self.files: set[int] = set()
        self.views: set[int] = set()

    def add(self, asked: torch.Tensor, indices: torch.Tensor, status: torch.Tensor) -> None:
        """``asked`` / ``indices`` ``[B]``: the samples asked for / read (they differ where SUBSTITUTED)."""
        asked, indices, status = asked.cpu().numpy(), indices.cpu().numpy(), status.cpu().numpy()
        self.files.update(asked[(status & SUBSTITUTED) != 0].tolist())
        self.views.update(indices[(status & (VIEW_DAMAGED | INTERP_DAMAGED)) != 0].tolist())

    def counts(self) -> dict[str, int]:
        return {"files_skipped": len(self.files), "views_damaged": len(self.views)}


_END = object()


def read_ahead(batches: Iterator, depth: int) -> Iterator:
    """Run ``batches`` up to ``depth`` items ahead in a background thread, in order.

    DALI calls the external source synchronously inside ``Pipeline.run()``, i.e. on the training
    loop's thread; reading files and drawing parameters there would add their latency to every
    step. Abandoning the returned generator stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in batches:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    threading.Thread(target=work, daemon=True, name="genssl-read-ahead").start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------
# graph


def _on(node: DataNode, like: DataNode) -> DataNode:
    """Move a per-sample CPU scalar next to ``like`` (arithmetic needs both on one device)."""
    return node.gpu() if like.device == "gpu" else node


def multicrop_graph(images: DataNode, spec: MultiCropSpec, params: DataNode) -> list[DataNode]:
    """Decoded HWC uint8 RGB images -> ``spec.n_crops`` float32 CHW normalised crops, global first.

    ``params`` is a CPU node of ``[n_crops, N_PARAMS]`` float32 per sample, made on the host by
    `sample_multicrop_params`. Kept separate from any reader so other pipelines (e.g. synthetic
    views from the view store) can push their own images through the same recipe.
    """
    mean = [255.0 * m for m in spec.mean]
    std = [255.0 * s for s in spec.std]
    crops = []
    for c, plan in enumerate(spec.plans()):
        p = params[c]
        x = fn.resize(images, size=[plan.size, plan.size], roi_start=p[P_Y0:P_X0 + 1], roi_end=p[P_Y1:P_X1 + 1],
                      roi_relative=True, antialias=True)
        if spec.jitter_p > 0 or spec.grayscale_p > 0:
            x = fn.color_twist(x, brightness=p[P_BRIGHT], contrast=p[P_CONTRAST], saturation=p[P_SAT], hue=p[P_HUE])
        if plan.blur_p > 0:
            x = fn.gaussian_blur(x, sigma=dmath.max(p[P_SIGMA], NO_BLUR_SIGMA))
        if plan.solarize_p > 0:  # 127.5 - |x - 127.5| is x below 128 and 255 - x from 128 up
            x = fn.cast(x, dtype=types.FLOAT)
            x = x + _on(p[P_SOLAR], x) * ((127.5 - dmath.abs(x - 127.5)) - x)
        crops.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std,
                                              mirror=fn.cast(p[P_FLIP], dtype=types.INT32)))
    return crops


def _decode(encoded: DataNode, device_id: int | None) -> DataNode:
    return fn.decoders.image(encoded, device="mixed" if device_id is not None else "cpu",
                             output_type=types.RGB, adjust_orientation=False)  # index baked EXIF in


def _to_torch(out, device: torch.device) -> torch.Tensor:
    """A dense DALI batch -> torch tensor on ``device`` (one copy)."""
    dense = out.as_tensor()
    dtype = {types.FLOAT: torch.float32, types.INT64: torch.int64, types.UINT8: torch.uint8}[dense.dtype]
    t = torch.empty(dense.shape(), dtype=dtype, device=device)
    if device.type == "cuda":
        feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(device))
    else:
        feed_ndarray(dense, t)
    return t


# ---------------------------------------------------------------------------------------------
# pipeline driver shared by both loaders


class _Driver:
    """Owns one DALI pipeline whose external source is this object; each `run` feeds it a new batch
    iterator. The pipeline is reset between complete passes and rebuilt only when a pass was
    abandoned half-way (DALI cannot rewind a pipeline that still holds prefetched batches)."""

    def __init__(self, build, device_id: int | None) -> None:
        self._build = build  # (source) -> built Pipeline
        self._pipe: Pipeline | None = None
        self._state = "none"  # none | dirty (a pass is running or was abandoned) | ended
        self._batches: Iterator | None = None
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")

    def __iter__(self) -> Iterator:
        """DALI calls this when it (re)starts the source, which may be right after the previous
        epoch ended; so the batches are looked up lazily, at the first ``next()``."""

        def lazily() -> Iterator:
            assert self._batches is not None
            yield from self._batches

        return lazily()

    def run(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, ...]]:
        self._batches = batches
        if self._state == "ended":
            self._pipe.reset()
        elif self._state == "dirty":
            self._pipe = None
            self._state = "none"
        if self._pipe is None:
            self._pipe = self._build(self)
        self._state = "dirty"
        while True:
            try:
                outs = self._pipe.run()
            except StopIteration:
                self._state = "ended"
                return
            yield tuple(_to_torch(o, self.device if o.__class__.__name__.endswith("GPU") else torch.device("cpu"))
                        for o in outs)


# ---------------------------------------------------------------------------------------------
# loaders


class DaliMultiCropLoader(EpochLoader):
    """DINO multi-crop batches for one rank: yields ``(crops, indices)``, ``crops`` a list of
    ``spec.n_crops`` float32 ``[B, 3, h, w]`` tensors (global first; on ``cuda:device_id`` or CPU),
    ``indices`` int64 ``[B]`` (CPU) positions in ``index``. ``len()`` = steps per epoch."""

    def __init__(self, index: DatasetIndex, spec: MultiCropSpec, batch_size: int, rank: int, world_size: int,
                 seed: int, device_id: int | None = None, num_threads: int = 2, prefetch: int = 2) -> None:
        if num_threads < 1 or prefetch < 1:
            raise ValueError(f"need num_threads >= 1 and prefetch >= 1; got {num_threads}, {prefetch}")
        self.init_epochs(len(index), batch_size, rank, world_size, seed)
        self.index, self.spec = index, spec
        self.device_id, self.num_threads, self.prefetch = device_id, num_threads, prefetch
        self._pool = ThreadPoolExecutor(max(2, num_threads), thread_name_prefix="genssl-read")
        self._files = FileReader.for_index(index)
        self._problems = ProblemCounts()
        self._driver = _Driver(self._build, device_id)

    def iter_from(self, step: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Batches ``step..len()-1`` of the current epoch; earlier ones are never read or decoded."""
        self.check_step(step)
        return self._iter(step)

    def read_problems(self) -> dict[str, int]:
        """``{"files_skipped": distinct files skipped so far (module docstring), "views_damaged": 0}``."""
        return self._problems.counts()

    def _iter(self, step: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        if step == len(self):
            return
        feed = read_ahead(self._feed(self.batches(), self.epoch, step), self.prefetch + 1)
        for outs in self._driver.run(feed):
            *crops, idx, status, asked = outs
            self._problems.add(asked, idx, status)
            yield crops, idx

    def _feed(self, order: np.ndarray, epoch: int, start: int) -> Iterator[tuple]:
        for step in range(start, len(order)):
            encoded, idx, status = self._files.batch(order[step], self._pool)
            rng = np.random.default_rng([self.seed, epoch, self.rank, step])
            params = sample_multicrop_params(rng, self.spec, self.index.sizes[idx])  # after substitution
            yield encoded, idx, params, status, order[step]

    def _build(self, source) -> Pipeline:
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                        seed=self.seed + 7919 * self.rank, prefetch_queue_depth=self.prefetch)
        with pipe:
            encoded, idx, params, status, asked = fn.external_source(
                source=source, num_outputs=5, cycle="raise", batch=True,
                dtype=[types.UINT8, types.INT64, types.FLOAT, types.UINT8, types.INT64], ndim=[1, 0, 2, 0, 0])
            crops = multicrop_graph(_decode(encoded, self.device_id), self.spec, params)
            pipe.set_outputs(*crops, idx, status, asked)
        pipe.build()
        return pipe


class DaliEvalLoader:
    """Evaluation batches for one rank: yields ``(images [B,3,size,size] float32, labels [B] int64,
    indices [B] int64)`` over samples ``rank::world_size``: across ranks every sample exactly once,
    nothing dropped (the last batch may be smaller; ranks may differ by one sample).

    Images are resized so the shorter side is ``size / crop_ratio`` and centre-cropped to ``size``
    (done as one resize of the centre region); images whose shorter side is at most ``size`` are
    resized whole to ``size x size`` (tiny images, e.g. 32 px, would otherwise lose their border).

    Files are read through `FileReader` like the training loaders' (module docstring): a file deleted,
    truncated or replaced since indexing is reported and its row of the batch holds another sample of
    the batch, with that sample's index and label. So a consumer keyed by index sees every readable
    image under its own index and the unreadable ones not at all (`extract_features` keeps one row
    per index); ``substitutions`` maps each unreadable index to the one read in its place.
    """

    def __init__(self, index: DatasetIndex, size: int, batch_size: int, rank: int, world_size: int,
                 device_id: int | None = None, num_threads: int = 2, crop_ratio: float = 0.875,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        if size < 1 or batch_size < 1 or not 0 < crop_ratio <= 1:
            raise ValueError(f"need size >= 1, batch_size >= 1, 0 < crop_ratio <= 1; got {size}, {batch_size}, {crop_ratio}")
        self.index, self.size, self.batch_size = index, size, batch_size
        self.shard = eval_shard(len(index), rank, world_size)
        self.device_id, self.num_threads, self.crop_ratio = device_id, num_threads, crop_ratio
        self.mean, self.std = [255.0 * m for m in mean], [255.0 * s for s in std]
        self._labels = torch.as_tensor(np.asarray(index.labels, dtype=np.int64))
        self._pool = ThreadPoolExecutor(max(2, num_threads), thread_name_prefix="genssl-read")
        self._files = FileReader.for_index(index)
        self.substitutions: dict[int, int] = {}  # unreadable index -> index read in its place (filled while iterating)
        self._driver = _Driver(self._build, device_id)

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if len(self.shard) == 0:
            return
        for images, idx in self._driver.run(read_ahead(self._feed(), 3)):
            yield images, self._labels[idx], idx

    def centre_rois(self, idx: np.ndarray) -> np.ndarray:
        """``[B, 4]`` relative (y0, x0, y1, x1) of the region that becomes the output image."""
        w, h = self.index.sizes[idx, 0].astype(np.float64), self.index.sizes[idx, 1].astype(np.float64)
        short = np.minimum(w, h)
        side = np.where(short <= self.size, short, short * self.crop_ratio)
        ch = np.where(short <= self.size, h, side) / h
        cw = np.where(short <= self.size, w, side) / w
        return np.stack([(1 - ch) / 2, (1 - cw) / 2, (1 + ch) / 2, (1 + cw) / 2], axis=1).astype(np.float32)

    def _feed(self) -> Iterator[tuple]:
        for start in range(0, len(self.shard), self.batch_size):
            asked = self.shard[start:start + self.batch_size]
            data, idx, status = self._files.batch(asked, self._pool)
            for b in np.flatnonzero(status & SUBSTITUTED):
                self.substitutions[int(asked[b])] = int(idx[b])
            yield data, idx, self.centre_rois(idx)

    def _build(self, source) -> Pipeline:
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id, seed=0)
        with pipe:
            encoded, idx, roi = fn.external_source(source=source, num_outputs=3, cycle="raise", batch=True,
                                                   dtype=[types.UINT8, types.INT64, types.FLOAT], ndim=[1, 0, 1])
            x = fn.resize(_decode(encoded, self.device_id), size=[self.size, self.size], roi_start=roi[0:2],
                          roi_end=roi[2:4], roi_relative=True, antialias=True)
            x = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=self.mean, std=self.std)
            pipe.set_outputs(x, idx)
        pipe.build()
        return pipe
