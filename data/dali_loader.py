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
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
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
from genssl.data.index import DatasetIndex
from genssl.data.sampler import EpochLoader, rank_batches

NO_BLUR_SIGMA = 1e-3  # a 3-tap kernel whose side weights underflow to 0: exactly the identity


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


def _read(paths: Sequence[str], idx: np.ndarray, pool: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
    """File bytes of a batch; concurrent reads hide per-file latency (network file systems)."""
    files = [paths[i] for i in idx]
    read = lambda path: np.fromfile(path, dtype=np.uint8)  # noqa: E731
    return list(pool.map(read, files)) if pool is not None else [read(f) for f in files]


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
        self._driver = _Driver(self._build, device_id)

    def iter_from(self, step: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Batches ``step..len()-1`` of the current epoch; earlier ones are never read or decoded."""
        self.check_step(step)
        return self._iter(step)

    def _iter(self, step: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        if step == len(self):
            return
        feed = read_ahead(self._feed(self.batches(), self.epoch, step), self.prefetch + 1)
        for outs in self._driver.run(feed):
            yield list(outs[:-1]), outs[-1]

    def _feed(self, order: np.ndarray, epoch: int, start: int) -> Iterator[tuple]:
        for step in range(start, len(order)):
            idx = order[step]
            rng = np.random.default_rng([self.seed, epoch, self.rank, step])
            params = sample_multicrop_params(rng, self.spec, self.index.sizes[idx])
            yield _read(self.index.paths, idx, self._pool), idx, params

    def _build(self, source) -> Pipeline:
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                        seed=self.seed + 7919 * self.rank, prefetch_queue_depth=self.prefetch)
        with pipe:
            encoded, idx, params = fn.external_source(source=source, num_outputs=3, cycle="raise", batch=True,
                                                      dtype=[types.UINT8, types.INT64, types.FLOAT], ndim=[1, 0, 2])
            crops = multicrop_graph(_decode(encoded, self.device_id), self.spec, params)
            pipe.set_outputs(*crops, idx)
        pipe.build()
        return pipe


class DaliEvalLoader:
    """Evaluation batches for one rank: yields ``(images [B,3,size,size] float32, labels [B] int64,
    indices [B] int64)`` over samples ``rank::world_size``: across ranks every sample exactly once,
    nothing dropped (the last batch may be smaller; ranks may differ by one sample).

    Images are resized so the shorter side is ``size / crop_ratio`` and centre-cropped to ``size``
    (done as one resize of the centre region); images whose shorter side is at most ``size`` are
    resized whole to ``size x size`` (tiny images, e.g. 32 px, would otherwise lose their border).
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
            idx = self.shard[start:start + self.batch_size]
            yield _read(self.index.paths, idx, self._pool), idx, self.centre_rois(idx)

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
