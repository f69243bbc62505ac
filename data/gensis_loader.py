"""Gen-SIS / Gen-DINO training batches: real multi-crops, generated views and interpolated views.

Gen-SIS (Belagali et al., "Gen-SIS: Generative Self-augmentation Improves Self-supervised Learning")
trains DINO where (1) with probability ``p_gen`` per sample one global crop comes from a synthetic
view of the same image, and (2) a disentanglement loss asks the student, shown a view interpolated
between image 1 and a partner image 2 (weight α on image 1), to predict the α-mix of the teacher's
outputs on the two real images. See docs/METHODS.md §1.4–1.6 and `genssl.models.gendino`.

Per sample ``i`` of a batch, one DALI pipeline turns

* the real image's file bytes (decoded by ``fn.decoders.image``: "mixed" on the GPU with
  ``device_id``, CPU otherwise),
* one synthetic view ``views[i, k]`` of the view store: its encoded bytes (JPEG, PNG or WebP, as the
  store holds them), decoded by the same ``fn.decoders.image`` as the real images ("mixed": on the GPU),
* one interpolated view ``interp[i, j]`` (encoded, decoded alike), its ``α = interp_alpha[i, j]`` and
  partner ``p = interp_partner[i, j]``, and the partner's real file bytes (decoded like image ``i``)

into DINO's vanilla augmentations (the same graph as `DaliMultiCropLoader`: `multicrop_graph`, one
crop slot at a time):

* ``crops``: ``spec.n_crops`` crops of the real image, global first. For a sample with
  ``from_gen`` set, the **second global crop (slot 1)** is cut from the synthetic view instead (its
  crop window is drawn for the synthetic view's size; its blur/solarize probabilities stay those of
  slot 1). Slot 0 — the teacher's view of image 1 for L_dis — is always real. Needs ``n_global >= 2``
  when ``p_gen > 0``.
* ``interp``: one global-size crop of the interpolated view with slot 1's augmentation plan (the
  student's input for L_dis);
* ``partner``: one global-size crop of the partner's real image with slot 0's plan (the teacher's
  view of image 2 for L_dis; image 1's is ``crops[0]``, augmented with the same plan).

Randomness, order and resume (the contract of `genssl.data.dali_loader`): the sample order is
`genssl.data.sampler.rank_batches`; every random number of batch ``step`` is drawn on the host from
``np.random.default_rng([seed, epoch, rank, step])`` in a fixed order — the real crops' parameters
first (exactly `DaliMultiCropLoader`'s stream, so with ``p_gen=0`` and ``interpolation=False`` the
crops are bit-identical to it), then the ``from_gen`` flags (``rng.random(B) < p_gen``), the synthetic
crop windows, the interpolated and the partner crops' parameters. Which of the K synthetic views and
which of the J interpolated views a source uses in an epoch is a function of (seed, epoch, i) alone
(one draw of N integers per (seed, epoch), `GenSISLoader.view_choice`). So a batch is a pure function of
(seed, epoch, rank, step): ``iter_from(k)`` yields exactly batches ``k..`` of the uninterrupted epoch
and reads nothing of batches ``0..k-1``.

Damage. The views are checked on the host before DALI sees them — crc32c of the shard index and inner
chunk (or staged view), present, structurally an image of the store's format — because DALI's decoder
fails the whole pipeline on a corrupt image. A synthetic view that fails its check (or a damaged
``done`` chunk: `genssl.data.viewstore.ViewStoreCorruptError`) makes its sample a real one for that step:
``from_gen`` is False and crop slot 1 is cut from the real image with the real stream's slot-1
parameters. A damaged interpolated view (or its partner or α, or a partner file that changed since
indexing) makes the interpolated crop a real crop of image i with slot 1's real parameters, the
partner image i itself and α = 1: the interpolation at α = 1 *is* image i, so L_dis stays well defined
(it asks the student to predict the teacher on image i). A real file that changed since indexing is
replaced by another sample of the batch before anything else is read or drawn
(`genssl.data.dali_loader.FileReader`). All of this is decided from the reads alone, with no extra
random numbers: a batch is a pure function of (seed, epoch, rank, step) and of the damage; with none,
nothing changes. Each damaged source is reported once per run (a warning, and an entry in
``<store>.damage.json``, which the generation job's ``verify=true`` supersedes), each sample's
``status`` says what it holds instead, and ``read_problems()`` counts the distinct sources and files
so far (for the metrics).

Reading. The host inputs of a batch are produced by `_GenSISFeed.batch(order, epoch, step)` (file bytes
via `genssl.data.dali_loader.FileReader`, views through `genssl.data.viewstore.ViewStoreReader`, per-sample reads on a
small thread pool). With ``py_workers > 0`` (default 2) it runs in DALI's parallel external source
(``parallel=True``, ``batch=True``, spawned worker processes, each building whole batches, so shard
and file reads never hold the training process's GIL). Because DALI pickles the source
into its workers when the pipeline is built, every pass (epoch or ``iter_from``) builds a fresh
pipeline: DALI starts the workers one after another, each importing torch and DALI (about 4 s per
worker on a busy 2-core CPU machine), once per epoch. ``py_workers=0`` builds the batches in a
background thread of this process instead (`read_ahead`, as `DaliMultiCropLoader`), one pipeline
reused across passes; both modes yield identical batches. Spawned workers re-import the main
module: scripts that build this loader need an ``if __name__ == "__main__":`` guard (the recipes
have one) — or use ``py_workers=0``.
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
from nvidia.dali.pipeline import Pipeline, do_not_convert, pipeline_def

from genssl.data.augment import MultiCropSpec, sample_multicrop_params
from genssl.data.dali_loader import (INTERP_DAMAGED, VIEW_DAMAGED, FileReader, ProblemCounts, ProblemReport, _decode,
                                     _Driver, _to_torch, multicrop_graph, read_ahead)
from genssl.data.sampler import EpochLoader
from genssl.data.index import DatasetIndex
from genssl.data.index_columns import PathColumn
from genssl.data.viewstore import REPAIR_HINT, ViewStoreError, ViewStoreReader, ViewStoreSchemaError, encode_view

__all__ = ["GEN_SLOT", "GenSISBatch", "GenSISLoader"]

GEN_SLOT = 1      # the global crop slot a synthetic view may replace
TEACHER_SLOT = 0  # the global crop slot the teacher sees of image 1 (L_dis), and the partner's plan
_SALT_VIEW, _SALT_INTERP = 0x5EED_0001, 0x5EED_0002
# What a sample feeds where no view is used (a real sample, a damaged view): a valid 1x1 image, though the
# conditional never decodes it, so the external source's batch stays uniform.
_PLACEHOLDER = np.frombuffer(encode_view(np.zeros((1, 1, 3), np.uint8), "png"), np.uint8)


@dataclasses.dataclass
class GenSISBatch:
    """One rank's batch. ``crops``: ``n_crops`` float32 ``[B,3,h,w]`` (global first; on the loader's
    device), ``indices`` int64 ``[B]``, ``from_gen`` bool ``[B]`` (crop slot 1 is synthetic). With
    interpolation: ``interp`` / ``partner`` float32 ``[B,3,G,G]`` (device), ``alpha`` float32 ``[B]``
    (weight on image ``indices``), ``partner_indices`` int64 ``[B]``; otherwise None. ``status`` uint8
    ``[B]``: 0, or the `genssl.data.dali_loader` bits ``SUBSTITUTED | VIEW_DAMAGED | INTERP_DAMAGED`` of
    what the sample holds instead (module docstring, "Damage"). Small per-sample tensors live on the CPU.

    Unpacks as ``crops, indices = batch`` like `DaliMultiCropLoader`'s batches, so objectives that
    only need the crops (e.g. `DINOObjective`) accept it unchanged.
    """

    crops: list[torch.Tensor]
    indices: torch.Tensor
    from_gen: torch.Tensor
    interp: torch.Tensor | None = None
    partner: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    partner_indices: torch.Tensor | None = None
    status: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.crops, self.indices))


# ---------------------------------------------------------------------------------------------
# host side: one batch's inputs, a pure function of (epoch, step)


class _Paths:
    """File paths as one UTF-8 blob + offsets: cheap to pickle into spawned workers (a list of
    1.3 M Python strings costs ~2x the memory and a slow pickle per worker and pass)."""

    def __init__(self, paths: list[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __getitem__(self, i: int) -> bytes:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes()


def _interp_slot(spec: MultiCropSpec) -> int:
    """The crop slot whose augmentation plan the interpolated view gets (slot 1; slot 0 if it is the only global)."""
    return GEN_SLOT if spec.n_global > GEN_SLOT else TEACHER_SLOT


def _slot_spec(spec: MultiCropSpec, slot: int) -> MultiCropSpec:
    """A one-crop spec whose only crop has the size, scale and blur/solarize plan of ``slot``."""
    plan = spec.plans()[slot]
    return dataclasses.replace(spec, n_global=1, n_local=0, global_size=plan.size, global_scale=plan.scale,
                               blur_p_global=(plan.blur_p,), solarize_p_global=(plan.solarize_p,))


@dataclasses.dataclass
class _Sample:
    """What is read for one sample's views (encoded image bytes, uint8 [n]); ``synthetic`` None or
    ``interp_ok`` False: damaged (module docstring)."""

    synthetic: np.ndarray | None = None
    interp: np.ndarray | None = None
    interp_ok: bool = True
    partner: int = -1
    alpha: float = 0.0
    partner_encoded: np.ndarray | None = None


class _GenSISFeed:
    """Everything needed to produce the host inputs of any batch; picklable (DALI workers)."""

    def __init__(self, index: DatasetIndex, reader: ViewStoreReader | None, spec: MultiCropSpec, batch_size: int,
                 rank: int, world_size: int, seed: int, p_gen: float, interpolation: bool, read_threads: int):
        self.n = len(index)
        # a PathColumn (the index's own) is already a compact blob that pickles by reference
        self.paths = index.paths if isinstance(index.paths, PathColumn) else _Paths(index.paths)
        self.sizes = np.asarray(index.sizes)
        self.files = FileReader.for_index(index, self.paths)
        self.damage = None if reader is None else ProblemReport(
            Path(str(reader.path) + ".damage.json"), "sources", "source", {"store": str(reader.path)},
            self.files.report.since_ns)
        self.reader, self.spec, self.batch_size = reader, spec, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.p_gen, self.interpolation, self.read_threads = p_gen, interpolation, read_threads
        self.use_gen = p_gen > 0
        self.K = self.J = 0
        self.view_wh = np.zeros(2, dtype=np.int64)
        if reader is not None:
            self.K, self.J = reader.store.views_per_image, reader.store.interp_per_image
            self.view_wh = np.array([reader.store.width, reader.store.height], dtype=np.int64)
        self.gen_spec = _slot_spec(spec, GEN_SLOT) if self.use_gen else None
        self.interp_spec, self.partner_spec = _slot_spec(spec, _interp_slot(spec)), _slot_spec(spec, TEACHER_SLOT)
        self._pool: ThreadPoolExecutor | None = None
        self._choice: tuple[int, np.ndarray, np.ndarray] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"], state["_choice"] = None, None  # per process
        return state

    # -- choices ---------------------------------------------------------------------------

    def view_choice(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(k [N], j [N])``: the synthetic and interpolated view each source uses in ``epoch``."""
        if self._choice is None or self._choice[0] != epoch:
            k = np.random.default_rng([self.seed, epoch, _SALT_VIEW]).integers(0, max(self.K, 1), size=self.n)
            j = np.random.default_rng([self.seed, epoch, _SALT_INTERP]).integers(0, max(self.J, 1), size=self.n)
            self._choice = (epoch, k, j)
        return self._choice[1], self._choice[2]

    # -- reads -----------------------------------------------------------------------------

    def _threads(self) -> ThreadPoolExecutor | None:
        if self.read_threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="genssl-gensis-read")
            _ = self.reader.store if self.reader is not None else None  # open once, before the threads race
        return self._pool

    def _map(self, fn_, items):
        pool = self._threads()
        return list(pool.map(fn_, items)) if pool is not None and len(items) > 1 else [fn_(x) for x in items]

    def _damaged(self, i: int, what: str, why: str) -> None:
        why = why.removeprefix(f"view store {self.reader.path}: ").split(". To repair, ")[0]  # said once, below
        self.damage.add(i, {"source": i, "array": what, "reason": why},
                        f"genssl.data: view store {self.reader.path}: the {what} of source {i} cannot be used ({why}); "
                        f"its samples use real crops instead. To repair, {REPAIR_HINT}")

    def _read_views(self, item: tuple[int, bool, int, int, np.ndarray]) -> _Sample:
        i, gen, k, j, encoded = item
        sample = _Sample()
        if self.use_gen:
            sample.synthetic = _PLACEHOLDER
            if gen:
                try:  # checked (crc32c, present, an image) before DALI may see it
                    sample.synthetic = np.frombuffer(self.reader.encoded_views(i)[k], np.uint8)
                except ViewStoreError as e:
                    self._damaged(i, "synthetic view", str(e))
                    sample.synthetic = None
        if self.interpolation:
            try:
                views, partners, alphas = self.reader.encoded_interp(i)
                sample.interp = np.frombuffer(views[j], np.uint8)
                sample.partner, sample.alpha = int(partners[j]), float(alphas[j])
                if not 0 <= sample.partner < self.n:
                    raise ViewStoreError(f"its partner index {sample.partner} is outside [0, {self.n})")
                sample.partner_encoded, why = self.files.read(sample.partner)
                if why is not None:  # no other image can stand in for the partner the view was made with
                    self.files.reported(sample.partner, why)
                    sample.interp_ok = False
            except ViewStoreError as e:
                self._damaged(i, "interpolated view", str(e))
                sample.interp_ok = False
            if not sample.interp_ok:  # alpha = 1: the interpolation is image i itself (module docstring)
                sample.interp = _PLACEHOLDER
                sample.partner, sample.alpha, sample.partner_encoded = i, 1.0, encoded
        return sample

    def batch(self, order: np.ndarray, epoch: int, step: int) -> tuple:
        """Host inputs of batch ``step`` (``order`` = this epoch's ``[steps, B]`` indices), in the order
        of the external source's outputs (`_outputs`)."""
        asked = order[step]
        b = len(asked)
        encoded, idx, status = self.files.batch(asked, self._threads())  # a changed file is replaced first
        rng = np.random.default_rng([self.seed, epoch, self.rank, step])
        params = sample_multicrop_params(rng, self.spec, self.sizes[idx])  # == DaliMultiCropLoader's stream
        real = params.copy()  # what a sample whose views are damaged falls back to
        gen = np.zeros(b, dtype=bool)
        if self.use_gen:
            gen = rng.random(b) < self.p_gen
            syn = sample_multicrop_params(rng, self.gen_spec, np.tile(self.view_wh, (b, 1)))
            params[gen, GEN_SLOT] = syn[gen, 0]  # crop windows drawn for the synthetic view's size
        ks, js = self.view_choice(epoch) if self.reader is not None else (np.zeros(self.n, np.int64),) * 2
        samples = self._map(self._read_views, [(int(i), bool(g), int(ks[i]), int(js[i]), e)
                                               for i, g, e in zip(idx, gen, encoded)])
        out = [encoded, idx, params, status, asked]
        if self.use_gen:
            lost = np.array([s.synthetic is None for s in samples])
            gen &= ~lost
            params[lost, GEN_SLOT] = real[lost, GEN_SLOT]
            status[lost] |= VIEW_DAMAGED
            out += [[s.synthetic if s.synthetic is not None else _PLACEHOLDER for s in samples], gen.astype(np.uint8)]
        if self.interpolation:
            ok = np.array([s.interp_ok for s in samples])
            status[~ok] |= INTERP_DAMAGED
            partners = np.array([s.partner for s in samples], dtype=np.int64)
            interp_params = sample_multicrop_params(rng, self.interp_spec, np.tile(self.view_wh, (b, 1)))
            interp_params[~ok, 0] = real[~ok, _interp_slot(self.spec)]  # drawn for image i's own size
            partner_params = sample_multicrop_params(rng, self.partner_spec, self.sizes[partners])
            out += [[s.interp for s in samples], interp_params, ok.astype(np.uint8),
                    [s.partner_encoded for s in samples], partner_params, partners,
                    np.array([s.alpha for s in samples], dtype=np.float32)]
        return tuple(out)


class _PassSource:
    """DALI parallel (``batch_info=True``) source of one pass: batch ``start + iteration``."""

    def __init__(self, feed: _GenSISFeed, order: np.ndarray, epoch: int, start: int) -> None:
        self.feed, self.order, self.epoch, self.start = feed, order, epoch, start

    def __call__(self, info):
        step = self.start + info.iteration
        if step >= len(self.order):
            raise StopIteration
        return self.feed.batch(self.order, self.epoch, step)


# ---------------------------------------------------------------------------------------------
# graph


def _decoded_or(pred, encoded, otherwise, device_id):
    """Per sample: the decoded view where ``pred``, else ``otherwise`` (DALI conditional execution,
    converted by AutoGraph: only the samples of the true branch reach the decoder)."""
    if pred:
        out = _decode(encoded, device_id)
    else:
        out = otherwise
    return out


@do_not_convert
def _crop(images, spec: MultiCropSpec, params):
    """The vanilla DINO augmentation of one crop slot (``spec`` a one-crop spec, ``params`` ``[1, P]``)."""
    return multicrop_graph(images, spec, params)[0]


@pipeline_def(enable_conditionals=True)
def _gensis_pipeline(source, parallel: bool, spec: MultiCropSpec, on_gpu: bool, use_gen: bool, interpolation: bool,
                     prefetch: int):
    names, dtypes, ndims, layouts = _outputs(use_gen, interpolation)
    kw = dict(parallel=True, batch_info=True, prefetch_queue_depth=prefetch) if parallel else dict(cycle="raise")
    nodes = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True, dtype=dtypes,
                                               ndim=ndims, layout=layouts, **kw)))
    device_id = 0 if on_gpu else None
    real = _decode(nodes["encoded"], device_id)
    params = nodes["params"]
    second = real
    if use_gen:  # synthetic views are decoded exactly like the real images
        second = _decoded_or(fn.cast(nodes["gen"], dtype=types.BOOL), nodes["synthetic"], real, device_id)
    outs = [_crop(second if c == GEN_SLOT and use_gen else real, _slot_spec(spec, c), params[c:c + 1])
            for c in range(spec.n_crops)]
    if interpolation:  # a damaged interpolated view is replaced by image i itself (alpha 1)
        interp = _decoded_or(fn.cast(nodes["interp_ok"], dtype=types.BOOL), nodes["interp"], real, device_id)
        outs.append(_crop(interp, _slot_spec(spec, _interp_slot(spec)), nodes["interp_params"]))
        outs.append(_crop(_decode(nodes["partner_encoded"], device_id), _slot_spec(spec, TEACHER_SLOT),
                          nodes["partner_params"]))
    outs.append(nodes["idx"])
    if use_gen:
        outs.append(nodes["gen"])
    if interpolation:
        outs += [nodes["partner"], nodes["alpha"]]
    return tuple(outs + [nodes["status"], nodes["asked"]])


def _outputs(use_gen: bool, interpolation: bool) -> tuple[list, list, list, list]:
    """(names, dtypes, ndims, layouts) of the external source, in `_GenSISFeed.batch`'s order."""
    rows = [("encoded", types.UINT8, 1, ""), ("idx", types.INT64, 0, ""), ("params", types.FLOAT, 2, ""),
            ("status", types.UINT8, 0, ""), ("asked", types.INT64, 0, "")]
    if use_gen:
        rows += [("synthetic", types.UINT8, 1, ""), ("gen", types.UINT8, 0, "")]
    if interpolation:
        rows += [("interp", types.UINT8, 1, ""), ("interp_params", types.FLOAT, 2, ""), ("interp_ok", types.UINT8, 0, ""),
                 ("partner_encoded", types.UINT8, 1, ""), ("partner_params", types.FLOAT, 2, ""),
                 ("partner", types.INT64, 0, ""), ("alpha", types.FLOAT, 0, "")]
    return tuple(list(col) for col in zip(*rows))


# ---------------------------------------------------------------------------------------------
# loader


class GenSISLoader(EpochLoader):
    """Gen-DINO batches for one rank (module docstring): yields `GenSISBatch`; ``len()`` = steps per
    epoch; ``set_epoch``, ``iter_from(step)``, ``batches()`` as `DaliMultiCropLoader`.

    Args:
        index: the dataset the view store was generated from (source ``i`` = ``index.paths[i]``).
        store_path: the generation run's ``views.zarr`` (may be None only with ``p_gen=0`` and
            ``interpolation=False``, i.e. vanilla DINO).
        p_gen: probability that a sample's global crop slot 1 comes from a synthetic view.
        interpolation: read the interpolated views and partners (for the disentanglement loss).
        expect_fingerprint: dataset fingerprint the store must carry; None = ``index.fingerprint``.
        py_workers: spawned reader processes (DALI parallel external source); 0 = a background thread.
        read_threads: threads per reader (process or thread) for the per-sample reads of a batch.
    """

    def __init__(self, index: DatasetIndex, store_path: str | os.PathLike | None, spec: MultiCropSpec, batch_size: int,
                 rank: int, world_size: int, seed: int, p_gen: float = 0.5, interpolation: bool = True,
                 device_id: int | None = None, num_threads: int = 2, expect_fingerprint: str | None = None,
                 prefetch: int = 2, py_workers: int = 2, read_threads: int = 4) -> None:
        if num_threads < 1 or prefetch < 1 or py_workers < 0 or read_threads < 1:
            raise ValueError(f"need num_threads >= 1, prefetch >= 1, py_workers >= 0, read_threads >= 1; got "
                             f"{num_threads}, {prefetch}, {py_workers}, {read_threads}")
        if not 0.0 <= p_gen <= 1.0:
            raise ValueError(f"p_gen is a probability and must be in [0, 1], got {p_gen}")
        if p_gen > 0 and spec.n_global < 2:
            raise ValueError(f"p_gen > 0 replaces global crop slot {GEN_SLOT} by a synthetic view and keeps slot 0 real; "
                             f"that needs n_global >= 2, got {spec.n_global}")
        self.init_epochs(len(index), batch_size, rank, world_size, seed)
        self.index, self.spec = index, spec
        self.p_gen, self.interpolation = float(p_gen), bool(interpolation)
        self.device_id, self.num_threads, self.prefetch, self.py_workers = device_id, num_threads, prefetch, py_workers
        needs_store = self.p_gen > 0 or self.interpolation
        if store_path is None and needs_store:
            raise ValueError("GenSISLoader needs store_path (the generation run's views.zarr) unless p_gen=0 and "
                             "interpolation=False")
        reader = _open_store(store_path, index, expect_fingerprint, self.p_gen > 0, self.interpolation) \
            if needs_store else None
        self.store_path = Path(store_path) if store_path is not None else None
        self._feed = _GenSISFeed(index, reader, spec, batch_size, rank, world_size, seed, self.p_gen,
                                 self.interpolation, read_threads)
        self._problems = ProblemCounts()
        self._driver = _Driver(lambda source: self._build(source, parallel=False), device_id)

    # -- protocol ----------------------------------------------------------------------------

    def view_choice(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(k [N], j [N])``: which synthetic / interpolated view each source uses in ``epoch``
        (default: the current one); a function of (seed, epoch, source index) only."""
        return self._feed.view_choice(self.epoch if epoch is None else int(epoch))

    def iter_from(self, step: int) -> Iterator[GenSISBatch]:
        """Batches ``step..len()-1`` of the current epoch; earlier ones are never read or decoded."""
        self.check_step(step)
        return self._iter(step)

    def read_problems(self) -> dict[str, int]:
        """``{"files_skipped", "views_damaged"}``: distinct files and sources met so far by the batches this
        loader yielded that could not be used as asked (module docstring, "Damage"); for the metrics."""
        return self._problems.counts()

    # -- internals ---------------------------------------------------------------------------

    def _iter(self, step: int) -> Iterator[GenSISBatch]:
        if step == len(self):
            return
        order, epoch = self.batches(), self.epoch
        if self.py_workers > 0:
            runs = self._run_parallel(_PassSource(self._feed, order, epoch, step))
        else:
            feed = (self._feed.batch(order, epoch, s) for s in range(step, len(order)))
            runs = self._driver.run(read_ahead(feed, self.prefetch + 1))
        for outs in runs:
            yield self._unpack(list(outs))

    def _run_parallel(self, source: _PassSource) -> Iterator[tuple[torch.Tensor, ...]]:
        """A pipeline per pass: DALI pickles the source into its workers when it is built."""
        pipe = self._build(source, parallel=True)
        device = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
        try:
            while True:
                try:
                    outs = pipe.run()
                except StopIteration:
                    return
                yield tuple(_to_torch(o, device if o.__class__.__name__.endswith("GPU") else torch.device("cpu"))
                            for o in outs)
        finally:
            del pipe  # stops the workers

    def _unpack(self, outs: list[torch.Tensor]) -> GenSISBatch:
        n = self.spec.n_crops
        *outs, status, asked = outs
        crops, rest = outs[:n], outs[n:]
        interp = partner = None
        if self.interpolation:
            interp, partner, rest = rest[0], rest[1], rest[2:]
        idx, rest = rest[0], rest[1:]
        from_gen = torch.zeros(idx.shape[0], dtype=torch.bool)
        if self.p_gen > 0:
            from_gen, rest = rest[0].bool(), rest[1:]
        self._problems.add(asked, idx, status)
        if self.interpolation:
            return GenSISBatch(crops, idx, from_gen, interp, partner, alpha=rest[1], partner_indices=rest[0],
                               status=status)
        return GenSISBatch(crops, idx, from_gen, status=status)

    def _build(self, source, parallel: bool) -> Pipeline:
        pipe = _gensis_pipeline(
            source=source, parallel=parallel, spec=self.spec, on_gpu=self.device_id is not None,
            use_gen=self.p_gen > 0, interpolation=self.interpolation, prefetch=self.prefetch + self.py_workers,
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
            seed=self.seed + 7919 * self.rank, prefetch_queue_depth=self.prefetch,
            **(dict(py_num_workers=self.py_workers, py_start_method="spawn") if parallel else {}))
        pipe.build()
        return pipe


def open_store_reader(store_path, fingerprint: str, rerun: str) -> ViewStoreReader:
    """The view store at ``store_path`` for training on data of ``fingerprint`` (damaged views tolerated:
    the loaders fall back per sample); a missing, old-schema or foreign store is a ValueError naming
    the fix, ``rerun`` saying how to regenerate it."""
    try:
        return ViewStoreReader(store_path, expect_fingerprint=fingerprint, tolerate_damage=True)
    except FileNotFoundError as e:
        raise ValueError(f"{e}; {rerun}") from e
    except ViewStoreSchemaError as e:  # says how to convert it
        raise ValueError(str(e)) from e
    except ViewStoreError as e:
        raise ValueError(f"{e}. The views do not belong to the data being trained on: point views= at the store "
                         f"generated for this dataset, or {rerun}") from e


def _open_store(store_path, index: DatasetIndex, expect_fingerprint: str | None, need_views: bool,
                need_interp: bool) -> ViewStoreReader:
    """Open the view store and check it fits ``index``; every problem is a ValueError naming the fix."""
    rerun = ("rerun the generation job (generators.job.run_generation / the Gen-SIS recipe's generation "
             "stage) for this dataset")
    fingerprint = index.fingerprint if expect_fingerprint is None else expect_fingerprint
    reader = open_store_reader(store_path, fingerprint, rerun)
    store = reader.store
    if store.n_sources != len(index):
        raise ValueError(f"view store {store_path} holds {store.n_sources} sources but the dataset has {len(index)} "
                         f"images; {rerun}")
    if need_views and store.views_per_image < 1:
        raise ValueError(f"view store {store_path} has no synthetic views (K=0) but p_gen > 0; {rerun} with K >= 1 "
                         f"or set p_gen=0")
    if need_interp and store.interp_per_image < 1:
        raise ValueError(f"view store {store_path} has no interpolated views (J=0) but interpolation is on; {rerun} "
                         f"with J >= 1 or turn interpolation off")
    missing = reader.missing()
    if missing:
        raise ValueError(f"view store {store_path}: {len(missing)} of {store.n_sources} sources are not generated yet "
                         f"(done=False; first: {missing[:8]}); {rerun} to complete the store — it skips the sources "
                         f"already done")
    return reader
