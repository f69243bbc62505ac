"""The data side of the generator recipes' training (``recipes/autoencoder.py``, ``recipes/eldm.py``,
docs/METHODS.md §1.2–1.3): what their objectives read, and the per-step noise that makes resume exact.

Their objectives live in :mod:`genssl.generators.autoencoder_objective` and
:mod:`genssl.generators.eldm_objective`.

* :class:`TensorBatchLoader` — batches of in-memory (or memory-mapped) per-sample tensors (latents,
  embeddings, images), in the shared epoch order of :func:`genssl.data.sampler.rank_batches`, so a
  resumed run reads exactly the batches of an uninterrupted one. Same protocol as the DALI loaders:
  ``set_epoch``, ``len()`` = steps per epoch, ``iter_from(step)``.
* :func:`step_generator` — the CPU generator of the training noise of (seed, global step, rank):
  with the loader's order, it makes step k of a resumed run equal to step k of an uninterrupted one.
* Dataset caches: :func:`cached_embeddings` (``e = normalize(f0(I))``, the CLS feature of the frozen
  encoder) and :func:`cached_latents` (autoencoder latents, posterior mean), each computed once per
  (dataset fingerprint, model hash, preprocessing) and stored with
  :class:`~genssl.generators.autoencoder.LatentCache`.

How the caches are computed under several ranks: every rank decodes its shard (``rank::world``,
:class:`~genssl.data.dali_loader.DaliEvalLoader`, no drop) and writes it to a part file next to the
cache; after a barrier rank 0 assembles the parts into the single cache file (atomic) and deletes
them; after a second barrier every rank memory-maps that file (:func:`open_cache_mmap`), so ranks of
one node share one copy in the page cache instead of holding one each. The cache folder must be
visible to every rank (the same assumption as checkpoints on multi-node runs). Latents are stored in
float16 by default (ImageNet at 256² → 32²×4: 10.5 GB instead of 21 GB).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from genssl.data.sampler import EpochLoader
from genssl.generators.autoencoder import LatentCache, autoencoder_hash, encode

__all__ = [
    "TensorBatchLoader", "step_generator", "EncoderInput", "encoder_input", "file_sha256", "cached_embeddings",
    "cached_latents", "cached_dataset_tensor", "open_cache_mmap", "AE_MEAN", "AE_STD",
]

AE_MEAN = (0.5, 0.5, 0.5)   # DaliEvalLoader normalisation that maps [0, 255] to [-1, 1]
AE_STD = (0.5, 0.5, 0.5)


def step_generator(seed: int, step: int, rank: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, global step, rank, stream): the training noise
    of step k is the same in an uninterrupted and a resumed run."""
    h = hashlib.sha256(f"genssl-train\x1f{seed}\x1f{step}\x1f{rank}\x1f{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


# ------------------------------------------------------------------------------------------------
# loader


class TensorBatchLoader(EpochLoader):
    """Batches of per-sample arrays for one rank: yields ``{name: Tensor[B, ...], "index": int64[B]}``.

    ``tensors`` maps names to arrays whose first axis is the sample (torch tensors, numpy arrays or
    numpy memmaps, e.g. from :func:`open_cache_mmap`). The order is the shared epoch order
    (``rank_batches``: one permutation per (seed, epoch), drop-last, rank r takes every W-th sample of
    each global batch), so W ranks with batch B read exactly what one rank with batch W·B reads, and
    ``iter_from(k)`` starts at batch k without touching batches 0..k-1. Tensors are moved to
    ``device`` (non-blocking from pinned memory on CUDA) when it is given.
    """

    def __init__(self, tensors: Mapping[str, object], batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: torch.device | str | None = None):
        if not tensors:
            raise ValueError("TensorBatchLoader needs at least one tensor")
        sizes = {k: len(v) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"TensorBatchLoader: all tensors need the same number of samples, got {sizes}")
        self.init_epochs(next(iter(sizes.values())), int(batch_size), int(rank), int(world_size), int(seed))
        self.tensors = dict(tensors)
        self.device = torch.device(device) if device is not None else None

    def _take(self, array, idx: np.ndarray) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            out = array[torch.from_numpy(idx)]
        else:
            out = torch.from_numpy(np.ascontiguousarray(np.asarray(array[idx])))
        if self.device is not None and self.device.type == "cuda":
            return out.pin_memory().to(self.device, non_blocking=True)
        return out.to(self.device) if self.device is not None else out

    def iter_from(self, step: int):
        self.check_step(step)
        for idx in self.batches()[step:]:
            batch = {k: self._take(v, idx) for k, v in self.tensors.items()}
            batch["index"] = torch.from_numpy(idx)
            yield batch


# ------------------------------------------------------------------------------------------------
# dataset caches


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


class EncoderInput:
    """How images are fed to the frozen encoder: side, resize/crop, normalisation (what the
    embedding cache key and the E-LDM's ``generator.json`` record)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 1.0):
        self.size, self.crop_ratio = int(size), float(crop_ratio)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def to_dict(self) -> dict:
        return {"size": self.size, "crop_ratio": self.crop_ratio, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderInput":
        return cls(d["size"], d["mean"], d["std"], d.get("crop_ratio", 1.0))


def encoder_input(meta: dict, size: int = 0, crop_ratio: float = 1.0) -> EncoderInput:
    """The encoder's input spec from its ``encoder.json``: side = ``size`` or the run's eval size (else
    the backbone's build size); mean/std = the training crops' normalisation (ImageNet's by default).
    ``crop_ratio`` 1.0 (default) resizes the shorter side to ``size`` and centre-crops: the encoder
    sees the same region whose latents the E-LDM learns."""
    from genssl.data.augment import IMAGENET_MEAN, IMAGENET_STD

    config = meta.get("config") or {}
    if not size:
        size = int((config.get("eval") or {}).get("size") or meta["arch"]["img_size"])
    crops = config.get("crops") or {}
    return EncoderInput(size, crops.get("mean", IMAGENET_MEAN), crops.get("std", IMAGENET_STD), crop_ratio)


_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "U8": np.uint8, "I16": np.int16, "BOOL": np.bool_}


def open_cache_mmap(cache: LatentCache) -> dict[str, np.ndarray]:
    """The tensors of a :class:`LatentCache` file as read-only numpy memmaps (no copy; pages shared by
    every process of the node). Checks the fingerprint / model hash like ``LatentCache.load``."""
    path = cache.path
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", {}) or {}
    if meta.get("fingerprint") != cache.fingerprint or meta.get("model_hash") != cache.model_hash:
        raise ValueError(f"cache {path} was written for fingerprint {meta.get('fingerprint')!r} / model "
                         f"{meta.get('model_hash')!r}, not {cache.fingerprint!r} / {cache.model_hash!r}; delete it to recompute")
    out = {}
    for name, info in header.items():
        dtype = _NP_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"cache {path}: tensor {name!r} has dtype {info['dtype']}, which cannot be memory-mapped")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
    return out


def cached_dataset_tensor(cache: LatentCache, name: str, index, dist, compute_batch: Callable[[torch.Tensor], torch.Tensor],
                          size: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 1.0,
                          batch_size: int = 64, num_threads: int = 2, dtype: torch.dtype = torch.float32,
                          log: Callable[[str], None] | None = print) -> np.ndarray:
    """``[N, ...]`` = ``compute_batch(images)`` over the whole dataset ``index``, computed once and cached.

    ``images`` are ``[B, 3, size, size]`` float32 from :class:`DaliEvalLoader` (resize + centre crop by
    ``crop_ratio``, normalised with ``mean``/``std``) on ``dist.device``. Every rank must call this (see
    the module docstring for the part-file protocol). Returns a read-only memmap of the cache file.
    """
    from safetensors.torch import load_file, save_file

    from genssl.data.dali_loader import DaliEvalLoader
    from genssl.engine.distributed import barrier, broadcast_object

    have = broadcast_object(cache.exists() if dist.is_main else None)
    if not have:
        if dist.is_main and log:
            log(f"computing {name} of {len(index)} images at {size}px -> {cache.path}")
        device_id = dist.local_rank if dist.device.type == "cuda" else None
        loader = DaliEvalLoader(index, size, batch_size, dist.rank, dist.world_size, device_id=device_id,
                                num_threads=num_threads, crop_ratio=crop_ratio, mean=mean, std=std)
        values, indices = [], []
        with torch.no_grad():
            for images, _, idx in loader:
                values.append(compute_batch(images.to(dist.device)).detach().to("cpu", dtype))
                indices.append(idx.cpu())
        part = {"indices": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)}
        if values:
            part["values"] = torch.cat(values).contiguous()  # CPU convs may return channels-last; safetensors refuses those
            # a file unreadable since indexing (reported by the loader) keeps a row: the image read in its place,
            # as the training loaders substitute it; the next run's index drops it
            for asked, used in loader.substitutions.items():
                row = int((part["indices"] == used).nonzero()[0])
                part["indices"] = torch.cat([part["indices"], torch.tensor([asked])])
                part["values"] = torch.cat([part["values"], part["values"][row:row + 1]])
        cache.cache_dir.mkdir(parents=True, exist_ok=True)
        part_path = cache.path.with_name(f".{cache.path.stem}.part{dist.rank}of{dist.world_size}.safetensors")
        tmp = part_path.with_name(part_path.name + f".tmp{os.getpid()}")
        save_file(part, str(tmp))
        os.replace(tmp, part_path)
        barrier()
        if dist.is_main:
            parts = [load_file(str(cache.path.with_name(f".{cache.path.stem}.part{r}of{dist.world_size}.safetensors")))
                     for r in range(dist.world_size)]
            full = None
            seen = torch.zeros(len(index), dtype=torch.bool)
            for p in parts:
                if "values" not in p:
                    continue
                if full is None:
                    full = torch.empty((len(index), *p["values"].shape[1:]), dtype=p["values"].dtype)
                full[p["indices"]] = p["values"]
                seen[p["indices"]] = True
            if full is None or not bool(seen.all()):
                raise RuntimeError(f"{name}: the ranks' parts cover {int(seen.sum())} of {len(index)} samples")
            cache.save({name: full})
            for r in range(dist.world_size):
                cache.path.with_name(f".{cache.path.stem}.part{r}of{dist.world_size}.safetensors").unlink(missing_ok=True)
        barrier()
    arrays = open_cache_mmap(cache)
    if name not in arrays:
        raise ValueError(f"cache {cache.path} holds {sorted(arrays)}, not {name!r}; delete it to recompute")
    if len(arrays[name]) != len(index):
        raise ValueError(f"cache {cache.path} holds {len(arrays[name])} rows for {len(index)} images; delete it")
    return arrays[name]


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    from genssl.data.index import default_cache_dir

    return default_cache_dir(cache_dir or None) / "generators"


def cached_embeddings(encoder_spec: str | os.PathLike, index, dist, size: int = 0, batch_size: int = 64,
                      num_threads: int = 2, cache_dir: str | os.PathLike | None = None,
                      log: Callable[[str], None] | None = print,
                      input_spec: EncoderInput | None = None) -> tuple[np.ndarray, dict]:
    """``e = normalize(f0(I))`` (the encoder's CLS / pooled feature, L2-normalised, float32 ``[N, E]``) of
    every image of ``index``, cached by (dataset fingerprint, encoder file sha256, input spec).

    ``encoder_spec`` is a run directory or its ``encoder.safetensors`` (:func:`load_encoder`).
    ``input_spec`` (default: :func:`encoder_input` of the encoder's metadata and ``size``) fixes the
    preprocessing, e.g. to the one an E-LDM recorded. Returns ``(embeddings memmap, info)`` with
    ``info`` = what the E-LDM records about its encoder (``path``, ``sha256``, ``embed_dim``, ``input``).
    """
    from genssl.engine.export import load_encoder, resolve_encoder_path

    path = resolve_encoder_path(encoder_spec).resolve()
    backbone, meta = load_encoder(path, dist.device)
    spec = input_spec or encoder_input(meta, size)
    sha = file_sha256(path)
    info = {"path": str(path), "sha256": sha, "embed_dim": int(meta["embed_dim"]), "input": spec.to_dict(),
            "data_fingerprint": meta.get("data_fingerprint", "")}
    key = f"encoder:{sha}|" + json.dumps(spec.to_dict(), sort_keys=True)
    cache = LatentCache(_cache_dir(cache_dir), index.fingerprint, key, name="embeddings")

    def embed(images: torch.Tensor) -> torch.Tensor:
        return F.normalize(backbone(images).float(), dim=-1)

    emb = cached_dataset_tensor(cache, "embeddings", index, dist, embed, spec.size, spec.mean, spec.std,
                                spec.crop_ratio, batch_size, num_threads, torch.float32, log)
    del backbone
    return emb, info


def cached_latents(ae, index, dist, image_size: int, batch_size: int = 64, num_threads: int = 2,
                   cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float16,
                   ae_hash: str | None = None, log: Callable[[str], None] | None = print) -> np.ndarray:
    """Scaled latents ``(z − shift)·scale`` (posterior mean) of every image of ``index`` at
    ``image_size`` (shorter side resized, centre crop), ``[N, C, h, w]`` in ``dtype``, cached by
    (dataset fingerprint, autoencoder hash, image size, dtype)."""
    key = f"autoencoder:{ae_hash or autoencoder_hash(ae)}|size={int(image_size)}|{str(dtype).replace('torch.', '')}"
    cache = LatentCache(_cache_dir(cache_dir), index.fingerprint, key, name="latents")
    p = next(ae.parameters())
    if p.device != dist.device:
        ae = ae.to(dist.device)
    return cached_dataset_tensor(cache, "latents", index, dist, lambda x: encode(ae, x).float(), image_size,
                                 AE_MEAN, AE_STD, 1.0, batch_size, num_threads, dtype, log)
