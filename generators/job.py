"""The sharded, resumable generation job core (no launcher code: a recipe calls
:func:`run_generation` once per rank, after its own distributed setup).

For each source image i it generates K views from ``e_i`` (GenView noise level ``l_i`` on the
condition) and J interpolated views from ``slerp(e_i, e_p; α)`` (partner p ≠ i drawn at random, α
from {0.2, 0.4, 0.6, 0.8}, α the weight on e_i; no condition noise), and writes them to the view store
(:mod:`genssl.data.viewstore`).

Guarantees:

* **Disjoint writers.** Shard s (S consecutive sources) is written by rank ``s % world_size`` only;
  chunks never straddle shards, so no two ranks write the same file.
* **Resumable.** A source is marked done only after its data is durable; a rerun skips done
  sources. Every random choice depends only on (base seed, source, view): image seeds via
  :func:`~genssl.generators.samplers.view_seed`, partners/α via :func:`interp_assignment`.
* **Byte-identical reruns.** Sources are processed in fixed groups (``batch_size // (K+J)`` sources,
  aligned to the shard start); a group with any source missing is regenerated whole (only the missing
  sources are written), so the sampler sees exactly the batches of an uninterrupted run and batched
  float arithmetic rounds the same way. A killed-and-resumed run therefore produces the same bytes as
  an uninterrupted one — on the same software/hardware, with the same ``batch_size``; the number of
  ranks does not matter.
* **Repairable.** :func:`verify_store` checks every chunk of a rank's shards (crc32c and size, and
  that every done source has its chunk files), marks the sources of damaged chunks not done and deletes
  those chunks; the next :func:`run_generation` regenerates them, byte-identical to the undamaged
  store (the guarantee above). A whole shard is regenerated when its ``done`` chunk or one of its
  per-shard chunks (partners, α, noise levels) is damaged.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from genssl.data.viewstore import create_view_store, open_view_store
from genssl.generators.conditioning import slerp
from genssl.generators.samplers import _hash_int, view_seed

__all__ = ["DEFAULT_ALPHAS", "interp_assignment", "run_generation", "verify_store", "format_verification",
           "contact_sheet"]

DEFAULT_ALPHAS = (0.2, 0.4, 0.6, 0.8)


def interp_assignment(base_seed: int, source: int, n_sources: int, J: int,
                      alphas: Sequence[float] = DEFAULT_ALPHAS) -> tuple[np.ndarray, np.ndarray]:
    """Partners (``int64 [J]``, uniform over the other sources) and α (``float32 [J]``, uniform over
    ``alphas``) of source ``source``; a pure function of its arguments."""
    if J == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if n_sources < 2:
        raise ValueError("interpolated views need at least 2 sources (a partner ≠ the source)")
    rng = np.random.default_rng(_hash_int("genssl-interp", int(base_seed), int(source)))
    r = rng.integers(0, n_sources - 1, size=J)
    partners = np.where(r >= source, r + 1, r).astype(np.int64)
    al = np.asarray(alphas, dtype=np.float32)[rng.integers(0, len(alphas), size=J)]
    return partners, al


def _fetcher(x, what: str, n_sources: int):
    """Turn an array [N, ...] or a callable(indices) into a callable(indices) -> array."""
    if x is None:
        return None
    if callable(x):
        return lambda idx: np.asarray(x(np.asarray(idx, dtype=np.int64)))
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 0:
        return lambda idx: np.full(len(idx), arr.item())
    if arr.shape[0] != n_sources:
        raise ValueError(f"{what} has {arr.shape[0]} rows for {n_sources} sources")
    return lambda idx: arr[np.asarray(idx, dtype=np.int64)]


def run_generation(store_path: str | os.PathLike, n_sources: int, embeddings, sampler: Callable, *,
                   fingerprint: str, rank: int = 0, world_size: int = 1, K: int = 1, J: int = 0,
                   base_seed: int = 0, noise_levels=None, batch_size: int = 16,
                   alphas: Sequence[float] = DEFAULT_ALPHAS, generator_hash: str | None = None,
                   sampler_settings: dict | None = None, image_size: tuple[int, int] | None = None,
                   shard_size: int = 1024, extra_attrs: dict | None = None, progress: bool = True,
                   view_format: str = "jpeg", view_quality: int = 95,
                   durable: bool = True, on_group_done: Callable[[list[int]], None] | None = None) -> dict:
    """Generate this rank's part of the view store at ``store_path`` (creating the store if needed).

    Args:
        embeddings: ``[N, E]`` array/tensor, or ``callable(indices int64[n]) -> [n, E]``.
        sampler: ``callable(embeddings [B,E] float32 tensor, seeds int64[B], noise_levels int64[B]) ->
            uint8 [B,H,W,3]`` (a :class:`~genssl.generators.samplers.GuidedSampler`, or anything alike).
        fingerprint: the dataset fingerprint (a store made for other data is refused).
        noise_levels: GenView levels per source (``None`` = 0, an int, ``[N]``, or a callable); applied to
            the K views; interpolated views use level 0.
        generator_hash, sampler_settings, image_size: default to the sampler's ``generator_hash()``,
            ``settings`` and ``image_size`` when it has them.
        batch_size: images per sampler call (fixed groups of ``max(1, batch_size // (K+J))`` sources).
        on_group_done: called with the source indices written after each group (tests, monitoring).
        shard_size, view_format, view_quality: the store's layout (`genssl.data.viewstore.create_view_store`);
            a group's sources are made durable together (`ViewStore.write_sources`: one commit per group).

    Returns ``{"rank", "world_size", "written", "skipped", "views", "seconds", "views_per_s"}``.
    """
    t_start = time.perf_counter()
    N, K, J = int(n_sources), int(K), int(J)
    if generator_hash is None:
        if not hasattr(sampler, "generator_hash"):
            raise ValueError("pass generator_hash= (the sampler has no generator_hash())")
        generator_hash = sampler.generator_hash()
    if sampler_settings is None:
        sampler_settings = dict(getattr(sampler, "settings", {}))
    if image_size is None:
        if not hasattr(sampler, "image_size"):
            raise ValueError("pass image_size=(H, W) (the sampler has no image_size)")
        image_size = tuple(sampler.image_size)
    if J and N < 2:
        raise ValueError("interpolated views (J > 0) need at least 2 sources")
    sampler_settings = {**sampler_settings, "base_seed": int(base_seed),
                        "alphas": [float(a) for a in alphas]}
    created_with = {"batch_size": int(batch_size), "world_size": int(world_size),
                    **dict(getattr(sampler, "runtime_info", {}))}
    attrs = {"fingerprint": fingerprint, "generator_hash": generator_hash, "sampler": sampler_settings,
             "created_with": created_with, **(extra_attrs or {})}
    H, W = image_size
    store = create_view_store(store_path, N, K, J, H, W, attrs, shard_size=shard_size, view_format=view_format,
                              view_quality=view_quality)
    store.set_writer(rank, world_size)

    get_e = _fetcher(embeddings, "embeddings", N)
    get_l = _fetcher(noise_levels, "noise_levels", N) if noise_levels is not None else (
        lambda idx: np.zeros(len(idx), np.int64))

    per_source = K + J
    group = max(1, int(batch_size) // per_source)
    my_shards = store.shards_for_rank(rank, world_size)
    done = store.done_mask()
    remaining = sum(int((~done[store.shard_range(s).start:store.shard_range(s).stop]).sum())
                    for s in my_shards)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=remaining * per_source, unit="view", unit_scale=False, dynamic_ncols=True,
                   desc=f"generate (rank 0/{world_size}, {N} sources)", file=sys.stderr)

    written: list[int] = []
    skipped = 0
    n_views = 0
    try:
        for s in my_shards:
            r = store.shard_range(s)
            for g0 in range(r.start, r.stop, group):
                idx = np.arange(g0, min(g0 + group, r.stop))
                todo = [int(i) for i in idx if not done[i]]
                if not todo:
                    skipped += len(idx)
                    continue
                skipped += len(idx) - len(todo)
                inter = [interp_assignment(base_seed, int(i), N, J, alphas) for i in idx]
                need = np.unique(np.concatenate([idx] + [p for p, _ in inter]))
                emb = np.asarray(get_e(need), dtype=np.float32)
                row = {int(v): k for k, v in enumerate(need)}
                levels = np.asarray(get_l(idx), dtype=np.int64).reshape(-1)
                req_e, req_seed, req_lvl = [], [], []
                for n, i in enumerate(idx):
                    ei = emb[row[int(i)]]
                    for k in range(K):
                        req_e.append(torch.from_numpy(ei))
                        req_seed.append(view_seed(base_seed, int(i), k, "view"))
                        req_lvl.append(int(levels[n]))
                    partners, als = inter[n]
                    for j in range(J):
                        ej = slerp(torch.from_numpy(ei), torch.from_numpy(emb[row[int(partners[j])]]),
                                   float(als[j]))
                        req_e.append(ej.float())
                        req_seed.append(view_seed(base_seed, int(i), j, "interp"))
                        req_lvl.append(0)
                E = torch.stack(req_e)
                seeds = np.asarray(req_seed, dtype=np.int64)
                lv = np.asarray(req_lvl, dtype=np.int64)
                images = []
                for b in range(0, len(seeds), int(batch_size)):
                    out = sampler(E[b:b + batch_size], seeds[b:b + batch_size], lv[b:b + batch_size])
                    images.append(out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out))
                images = np.concatenate(images, 0)
                if images.shape != (len(seeds), H, W, 3) or images.dtype != np.uint8:
                    raise ValueError(f"sampler returned {images.dtype} {images.shape}, expected uint8 "
                                     f"{(len(seeds), H, W, 3)}")
                rows = [n for n, i in enumerate(idx) if not done[i]]
                blocks = images.reshape(len(idx), per_source, H, W, 3)[rows]  # [n, K+J, H, W, 3]
                store.write_sources(todo, blocks[:, :K], levels[rows, None].repeat(K, 1), blocks[:, K:],
                                    np.stack([inter[n][0] for n in rows]), np.stack([inter[n][1] for n in rows]),
                                    durable=durable)  # staged and fsynced together, then marked done
                done[todo] = True
                written += todo
                n_views += per_source * len(todo)
                if bar is not None:
                    bar.update(per_source * len(todo))
                if on_group_done is not None:
                    on_group_done(todo)
    finally:
        if bar is not None:
            bar.close()
    secs = time.perf_counter() - t_start
    return {"rank": rank, "world_size": world_size, "written": written, "skipped": skipped,
            "views": n_views, "seconds": secs, "views_per_s": n_views / secs if secs > 0 else 0.0}


def verify_store(store_path: str | os.PathLike, rank: int = 0, world_size: int = 1, *, repair: bool = True,
                 fingerprint: str | None = None, generator_hash: str | None = None) -> dict:
    """Check this rank's shards of the view store (see the module docstring, "Repairable"); with
    ``repair``, make every damaged source regenerable. A store of other data or another generator
    (``fingerprint`` / ``generator_hash``, when given) is refused before anything is touched.

    Returns ``{"rank", "shards", "sources", "damaged": [{"array", "chunk", "sources": [start, stop],
    "reason"}], "invalidated": [source, ...]}`` (``invalidated`` empty without ``repair``)."""
    store = open_view_store(store_path, "r+" if repair else "r", expect_fingerprint=fingerprint,
                            expect_generator_hash=generator_hash)
    shards = store.shards_for_rank(rank, world_size)
    damages = [d for s in shards for d in store.verify_shard(s)]
    invalidated: list[int] = []
    if repair and damages:
        store.set_writer(rank, world_size)
        invalidated = store.repair(damages)
    return {"rank": rank, "shards": len(shards), "sources": sum(len(store.shard_range(s)) for s in shards),
            "damaged": [{"array": d.array, "chunk": str(d.chunk), "sources": [d.start, d.stop], "reason": d.reason}
                        for d in damages], "invalidated": invalidated}


def format_verification(store_path: str | os.PathLike, reports: Sequence[dict]) -> str:
    """A summary of :func:`verify_store` reports (one per rank): what was checked, each damaged chunk."""
    damaged = [d for r in reports for d in r["damaged"]]
    sources = sum(r["sources"] for r in reports)
    head = (f"verify {store_path}: {sources} sources in {sum(r['shards'] for r in reports)} shard(s) checked "
            f"(crc32c of every chunk, done flags against chunk files) on {len(reports)} rank(s): ")
    if not damaged:
        return head + "no damage"
    lines = []
    for d in damaged:
        a, b = d["sources"]
        who = f"source {a}" if b - a == 1 else f"sources {a}..{b - 1}"
        lines.append(f"  {who}: {d['array']} chunk {d['chunk']}: {d['reason']}")
    n_inv = len({i for r in reports for i in r["invalidated"]})
    tail = (f"\n  {n_inv} source(s) marked not done and their damaged chunks deleted: they are regenerated now"
            if n_inv else "\n  nothing changed (repair off)")
    return head + f"{len(damaged)} damaged chunk(s)\n" + "\n".join(lines) + tail


def contact_sheet(store_path: str | os.PathLike, out_png: str | os.PathLike, n: int = 16, seed: int = 0,
                  pad: int = 2, tensorboard_dir: str | os.PathLike | None = None) -> Path:
    """A PNG grid of ``n`` done sources picked at random (one row per source: its K views, then its
    J interpolated views). Written atomically; returns the path. With ``tensorboard_dir``, the grid is
    also logged there as the TensorBoard image ``views/contact_sheet`` (step: sources done)."""
    from PIL import Image

    store = open_view_store(store_path, "r")
    done = np.flatnonzero(store.done_mask())
    if len(done) == 0:
        raise ValueError(f"view store {store_path} has no generated source yet")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(done, size=min(n, len(done)), replace=False))
    K, J, H, W = store.views_per_image, store.interp_per_image, store.height, store.width
    cols = K + J
    sheet = np.full((len(pick) * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for r, i in enumerate(pick):
        tiles = list(store.views(int(i)) if K else []) + list(store.interp(int(i))[0] if J else [])  # K or J may be 0
        for c, tile in enumerate(tiles):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            sheet[y:y + H, x:x + W] = tile
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.png")
    Image.fromarray(sheet).save(tmp)
    os.replace(tmp, out)
    if tensorboard_dir is not None:
        from genssl.engine.metrics import log_image

        log_image(tensorboard_dir, "views/contact_sheet", sheet, int(len(done)))
    return out
