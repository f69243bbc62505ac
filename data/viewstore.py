"""The view store: synthetic views of a generation run in one Zarr v3 group (docs/GENERATORS.md,
"The view store (`views.zarr`)"). No project imports.

Layout (N sources, K views and J interpolated views per source, H×W RGB)::

    views.zarr/
      zarr.json              group attributes: schema_version, fingerprint, generator_hash, sampler,
                             layout {n_sources, views_per_image, interp_per_image, height, width,
                             shard_size, sources_per_chunk, compression}, + the caller's extra keys
      views/                 uint8   [N, K, H, W, 3]   chunk [G, K, H, W, 3]   (G = sources_per_chunk)
      interp/                uint8   [N, J, H, W, 3]   chunk [G, J, H, W, 3]
      interp_partner/        int64   [N, J]            chunk [S, J]            (S = shard_size)
      interp_alpha/          float32 [N, J]            chunk [S, J]
      noise_level/           int16   [N, K]            chunk [S, K]
      done/                  bool    [N]               chunk [S]

Every chunk is encoded ``bytes → [zstd] → crc32c`` (Zarr v3 ``Crc32cCodec``): a corrupted chunk is
detected on read and reported as :class:`ViewStoreCorruptError` naming the array, the source index and
the chunk file. Writers own **shards** (contiguous ranges of S sources, S a multiple of G): every chunk
of every array lies inside one shard, so two writers that own different shards never write the same
file. ``write_source(i, ...)`` writes the data chunks of source i, fsyncs them (Zarr's ``LocalStore``
writes a temporary file and renames it, so a chunk file is always whole; the fsync makes it durable),
and only then sets ``done[i]``. A source whose ``done`` flag is set is therefore complete on disk; a
killed writer leaves at most unfinished sources with ``done = False`` (and perhaps stray
``*.partial`` temporary files, which are ignored).

Damage (a flipped bit, a truncated or deleted chunk file) is found two ways. Reading a source checks
the crc32c of the chunks it touches and that they exist (Zarr would silently read a deleted chunk as
zeros), raising :class:`ViewStoreCorruptError`; the training loader then uses the real crop for that
sample (`genssl.data.gensis_loader`). :meth:`ViewStore.verify_shard` checks a whole shard without
decoding (every chunk file's crc32c and size, and each done source's chunk files), and
:meth:`ViewStore.repair` marks the sources of every damaged chunk not done and deletes the chunk, so
the generation job (``verify=true``; a pipeline's generation stage always verifies) regenerates them.

Creation is atomic and idempotent: the group is built in a temporary sibling folder and renamed into
place; when the store already exists its attributes must match the request (same dataset
fingerprint, generator hash, layout and sampler settings) or a ``ValueError`` says what differs and
what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

__all__ = [
    "SCHEMA_VERSION", "ViewStoreError", "ViewStoreCorruptError", "ViewStore", "ViewStoreReader",
    "SourceRecord", "Damage", "create_view_store", "open_view_store",
]

SCHEMA_VERSION = 1
_DATA_ARRAYS = ("views", "interp")
_META_ARRAYS = ("interp_partner", "interp_alpha", "noise_level")
ARRAY_NAMES = _DATA_ARRAYS + _META_ARRAYS + ("done",)


class ViewStoreError(ValueError):
    """A view store cannot be used as asked (mismatch, missing source, bad arguments)."""


class ViewStoreCorruptError(ViewStoreError):
    """A chunk failed its crc32c check (or could not be decoded)."""


class Damage(NamedTuple):
    """One damaged chunk found by :meth:`ViewStore.verify_shard`: ``array``'s chunk file ``chunk`` holds
    sources ``start..stop-1``, all of which must be regenerated."""

    array: str
    chunk: Path
    start: int
    stop: int
    reason: str

    def sources(self) -> range:
        return range(self.start, self.stop)


class SourceRecord(NamedTuple):
    index: int
    views: np.ndarray           # uint8 [K, H, W, 3]
    noise_levels: np.ndarray    # int16 [K]
    interp: np.ndarray          # uint8 [J, H, W, 3]
    partners: np.ndarray        # int64 [J]
    alphas: np.ndarray          # float32 [J]


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _codecs(compression: str | None):
    import zarr.codecs as zc

    if not hasattr(zc, "Crc32cCodec"):  # pragma: no cover - zarr >= 3.0 has it
        raise RuntimeError("this zarr has no zarr.codecs.Crc32cCodec; install zarr>=3.0 and crc32c")
    comp = []
    if compression == "zstd":
        comp.append(zc.ZstdCodec(level=1))
    elif compression not in (None, "none"):
        raise ViewStoreError(f"compression must be None or 'zstd', got {compression!r}")
    comp.append(zc.Crc32cCodec())
    return zc.BytesCodec(), comp


def _layout(n_sources, K, J, H, W, shard_size, sources_per_chunk, compression) -> dict:
    return {"n_sources": int(n_sources), "views_per_image": int(K), "interp_per_image": int(J),
            "height": int(H), "width": int(W), "shard_size": int(shard_size),
            "sources_per_chunk": int(sources_per_chunk),
            "compression": compression if compression != "none" else None}


REPAIR_HINT = ("rerun the generation job with verify=true (python recipes/generate_views.py ... verify=true; a "
               "pipeline's generation stage verifies on every rerun): it finds every damaged chunk, invalidates its "
               "sources and regenerates them")


def _fix_hint() -> str:
    return ("write to a new out= directory, or run with the inputs this store was generated from")


def create_view_store(path: str | os.PathLike, n_sources: int, views_per_image: int,
                      interp_per_image: int, height: int, width: int, attrs: dict, *,
                      shard_size: int = 64, sources_per_chunk: int = 1,
                      compression: str | None = None) -> "ViewStore":
    """Create the store at ``path`` (or open it, if an identical one exists) and return it writable.

    Args:
        attrs: must hold ``fingerprint`` (dataset fingerprint) and ``generator_hash`` (generator
            checkpoint hash); ``sampler`` (dict of sampler settings) is recommended; any other
            JSON-serialisable keys are stored as they are.
        shard_size: S, sources per shard (the unit a writer owns; also the chunk of the small arrays).
        sources_per_chunk: G, sources per chunk of ``views``/``interp`` (must divide S). 1 = one file
            per source, the best for random access.
        compression: ``None`` (raw, fastest to read) or ``"zstd"`` (level 1).

    Safe to call from every rank at once: the group is built in a temporary folder and renamed into
    place; the losers of the race find the winner's store and check that it matches.
    """
    import zarr
    from zarr.storage import LocalStore

    path = Path(path)
    N, K, J, H, W = (int(v) for v in (n_sources, views_per_image, interp_per_image, height, width))
    if N < 1 or K < 0 or J < 0 or H < 1 or W < 1 or K + J < 1:
        raise ViewStoreError(f"bad view store shape: n_sources={N}, K={K}, J={J}, H={H}, W={W} "
                             f"(need N≥1, K,J≥0, K+J≥1, H,W≥1)")
    S, G = int(shard_size), int(sources_per_chunk)
    if S < 1 or G < 1 or S % G:
        raise ViewStoreError(f"shard_size ({S}) must be a positive multiple of sources_per_chunk ({G})")
    for key in ("fingerprint", "generator_hash"):
        if not attrs.get(key):
            raise ViewStoreError(f"create_view_store: attrs must contain a non-empty {key!r}")
    layout = _layout(N, K, J, H, W, S, G, compression)
    user = _jsonable({k: v for k, v in attrs.items()})
    user.setdefault("sampler", {})
    group_attrs = {**user, "schema_version": SCHEMA_VERSION, "layout": layout}

    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            g = zarr.open_group(store=LocalStore(tmp), mode="w", zarr_format=3)
            ser, comp = _codecs(layout["compression"])
            common = dict(serializer=ser, compressors=comp, config={"write_empty_chunks": True},
                          chunk_key_encoding={"name": "default", "separator": "."})
            g.create_array("views", shape=(N, K, H, W, 3), chunks=(G, max(K, 1), H, W, 3),
                           dtype="uint8", fill_value=0, **common)
            g.create_array("interp", shape=(N, J, H, W, 3), chunks=(G, max(J, 1), H, W, 3),
                           dtype="uint8", fill_value=0, **common)
            g.create_array("interp_partner", shape=(N, J), chunks=(S, max(J, 1)), dtype="int64",
                           fill_value=-1, **common)
            g.create_array("interp_alpha", shape=(N, J), chunks=(S, max(J, 1)), dtype="float32",
                           fill_value=0.0, **common)
            g.create_array("noise_level", shape=(N, K), chunks=(S, max(K, 1)), dtype="int16",
                           fill_value=0, **common)
            g.create_array("done", shape=(N,), chunks=(S,), dtype="bool", fill_value=False, **common)
            g.attrs.update(group_attrs)
            _fsync_tree(tmp)
            try:
                os.rename(tmp, path)          # atomic; fails if another rank won the race
                _fsync_dir(path.parent)
            except OSError:
                if not path.exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    store = open_view_store(path, mode="r+", expect_fingerprint=attrs["fingerprint"],
                            expect_generator_hash=attrs["generator_hash"])
    if store.layout != layout:
        diff = {k: (store.layout.get(k), layout.get(k)) for k in layout if store.layout.get(k) != layout.get(k)}
        raise ViewStoreError(f"view store {path} exists with a different layout "
                             f"(stored vs requested: {diff}); {_fix_hint()}")
    if _jsonable(store.attrs.get("sampler", {})) != user["sampler"]:
        raise ViewStoreError(f"view store {path} was generated with sampler settings "
                             f"{store.attrs.get('sampler')!r}, this run has {user['sampler']!r}; "
                             f"{_fix_hint()}")
    return store


def open_view_store(path: str | os.PathLike, mode: str = "r", expect_fingerprint: str | None = None,
                    expect_generator_hash: str | None = None) -> "ViewStore":
    """Open an existing store (``mode`` ``"r"`` or ``"r+"``), refusing it when its dataset fingerprint
    or generator hash differs from the expected ones."""
    return ViewStore(path, mode, expect_fingerprint, expect_generator_hash)


def _fsync_file(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        _fsync_dir(Path(dirpath))


class ViewStore:
    """An opened view store (see the module docstring). Use :func:`create_view_store` /
    :func:`open_view_store` to get one."""

    def __init__(self, path, mode: str = "r", expect_fingerprint: str | None = None,
                 expect_generator_hash: str | None = None):
        import zarr
        from zarr.storage import LocalStore

        if mode not in ("r", "r+"):
            raise ViewStoreError(f"view store mode must be 'r' or 'r+', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(f"no view store at {self.path} (no zarr.json); run the generation "
                                    f"job first, or pass the views.zarr folder it wrote")
        try:
            self._group = zarr.open_group(store=LocalStore(self.path, read_only=(mode == "r")),
                                          mode=mode, zarr_format=3)
        except Exception as e:
            raise ViewStoreError(f"{self.path} is not a readable Zarr v3 group: {e}") from e
        self.attrs = dict(self._group.attrs)
        sv = self.attrs.get("schema_version")
        if sv != SCHEMA_VERSION or "layout" not in self.attrs:
            raise ViewStoreError(f"{self.path} is not a genssl view store of schema {SCHEMA_VERSION} "
                                 f"(schema_version={sv!r})")
        self.fingerprint = self.attrs.get("fingerprint")
        self.generator_hash = self.attrs.get("generator_hash")
        if expect_fingerprint is not None and str(expect_fingerprint) != str(self.fingerprint):
            raise ViewStoreError(
                f"view store {self.path} was generated for dataset fingerprint {self.fingerprint!r}, but "
                f"this run's dataset has fingerprint {str(expect_fingerprint)!r}; {_fix_hint()}")
        if expect_generator_hash is not None and str(expect_generator_hash) != str(self.generator_hash):
            raise ViewStoreError(
                f"view store {self.path} was generated by generator {self.generator_hash!r}, but this "
                f"run's generator hash is {str(expect_generator_hash)!r}; {_fix_hint()}")
        self.layout = dict(self.attrs["layout"])
        lay = self.layout
        self.n_sources = lay["n_sources"]
        self.views_per_image = lay["views_per_image"]
        self.interp_per_image = lay["interp_per_image"]
        self.height, self.width = lay["height"], lay["width"]
        self.shard_size = lay["shard_size"]
        self.sources_per_chunk = lay["sources_per_chunk"]
        self.n_shards = -(-self.n_sources // self.shard_size)
        self._arrays = {}
        for name in ARRAY_NAMES:
            try:
                a = self._group[name]
            except KeyError as e:
                raise ViewStoreError(f"view store {self.path} lacks the array {name!r}") from e
            self._arrays[name] = a.with_config({"write_empty_chunks": True}) if mode == "r+" else a
        self._writer: tuple[int, int] | None = None

    # ------------------------------------------------------------------ geometry
    def __len__(self) -> int:
        return self.n_sources

    @property
    def sampler_settings(self) -> dict:
        return dict(self.attrs.get("sampler", {}))

    def shard_of(self, i: int) -> int:
        return int(i) // self.shard_size

    def shard_range(self, shard_id: int) -> range:
        if not 0 <= shard_id < self.n_shards:
            raise IndexError(f"shard {shard_id} out of range [0, {self.n_shards})")
        s0 = shard_id * self.shard_size
        return range(s0, min(s0 + self.shard_size, self.n_sources))

    def shards_for_rank(self, rank: int, world_size: int) -> list[int]:
        """Shards written by ``rank``: shard s belongs to rank ``s % world_size``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        return list(range(rank, self.n_shards, world_size))

    def set_writer(self, rank: int, world_size: int) -> None:
        """Restrict :meth:`write_source` to this rank's shards (a guard against two writers per file)."""
        self.shards_for_rank(rank, world_size)
        self._writer = (int(rank), int(world_size))

    def _check_index(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.n_sources:
            raise IndexError(f"source {i} out of range [0, {self.n_sources}) in view store {self.path}")
        return i

    def _chunk_file(self, name: str, i: int) -> Path:
        a = self._arrays[name]
        c0 = i // a.chunks[0]
        key = a.metadata.chunk_key_encoding.encode_chunk_key((c0,) + (0,) * (a.ndim - 1))
        return self.path / name / key

    # ------------------------------------------------------------------ reads
    def _read(self, name: str, sel, what: str):
        i0 = int((sel.start if isinstance(sel, slice) else sel) or 0)
        if name != "done" and not isinstance(sel, slice) and not self._chunk_file(name, i0).exists():
            # Zarr reads a missing chunk as its fill value (zeros) without complaint
            raise ViewStoreCorruptError(
                f"view store {self.path}: array {name!r} has no chunk file for {what} ({self._chunk_file(name, i0)} "
                f"is missing). To repair, {REPAIR_HINT}")
        try:
            return self._arrays[name][sel]
        except Exception as e:  # crc32c mismatch, truncated or undecodable chunk
            chunk = self._arrays[name].chunks[0]
            c_lo = (i0 // chunk) * chunk
            c_hi = min(c_lo + chunk, self.n_sources) - 1
            covers = f"source {c_lo}" if c_lo == c_hi else f"sources {c_lo}..{c_hi}"
            raise ViewStoreCorruptError(
                f"view store {self.path}: array {name!r} is corrupted at {what} (chunk file "
                f"{self._chunk_file(name, i0)}, holding {covers}): {str(e).rstrip('.')}. To repair, "
                f"{REPAIR_HINT}") from e

    def is_done(self, i: int) -> bool:
        i = self._check_index(i)
        return bool(self._read("done", i, f"source {i}"))

    def done_mask(self) -> np.ndarray:
        """``bool [N]``; on a corrupted ``done`` chunk, the error names the first bad shard."""
        try:
            return np.asarray(self._arrays["done"][:], dtype=bool)
        except Exception:
            parts = []
            for s in range(self.n_shards):
                r = self.shard_range(s)
                parts.append(np.asarray(self._read("done", slice(r.start, r.stop),
                                                   f"sources {r.start}..{r.stop - 1} (shard {s})")))
            return np.concatenate(parts).astype(bool)

    def missing(self) -> list[int]:
        """Source indices not yet done."""
        return np.flatnonzero(~self.done_mask()).tolist()

    def n_done(self) -> int:
        return int(self.done_mask().sum())

    def views(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        return self._read("views", i, f"source {i}")

    def noise_levels(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        return self._read("noise_level", i, f"source {i}")

    def interp(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i = self._check_index(i)
        return (self._read("interp", i, f"source {i}"), self._read("interp_partner", i, f"source {i}"),
                self._read("interp_alpha", i, f"source {i}"))

    def read_range(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """All arrays for sources ``start..stop-1`` (one read per array)."""
        sl = slice(int(start), int(stop))
        what = f"sources {start}..{stop - 1}"
        return {name: self._read(name, sl, what) for name in ARRAY_NAMES}

    # ------------------------------------------------------------------ writes
    def _require_writable(self):
        if self.mode != "r+":
            raise ViewStoreError(f"view store {self.path} is open read-only; open it with mode='r+'")

    def write_source(self, i: int, views, noise_levels, interp=None, partners=None, alphas=None,
                     durable: bool = True) -> None:
        """Write source ``i`` (views ``uint8 [K,H,W,3]``, noise levels ``[K]``, interpolated views
        ``uint8 [J,H,W,3]`` with partners ``[J]`` and α ``[J]``), make the chunks durable (fsync), then
        set ``done[i]``."""
        self._require_writable()
        i = self._check_index(i)
        if self._writer is not None:
            rank, ws = self._writer
            if self.shard_of(i) % ws != rank:
                raise ViewStoreError(f"rank {rank}/{ws} may not write source {i}: its shard "
                                     f"{self.shard_of(i)} belongs to rank {self.shard_of(i) % ws}")
        K, J, H, W = self.views_per_image, self.interp_per_image, self.height, self.width
        v = np.asarray(views)
        if v.shape != (K, H, W, 3) or v.dtype != np.uint8:
            raise ViewStoreError(f"write_source({i}): views must be uint8 {(K, H, W, 3)}, got "
                                 f"{v.dtype} {v.shape}")
        nl = np.asarray(noise_levels, dtype=np.int64).reshape(-1)
        if nl.shape != (K,):
            raise ViewStoreError(f"write_source({i}): {K} noise levels expected, got {nl.shape}")
        if J:
            if interp is None or partners is None or alphas is None:
                raise ViewStoreError(f"write_source({i}): this store holds J={J} interpolated views per "
                                     f"source; pass interp, partners and alphas")
            it = np.asarray(interp)
            if it.shape != (J, H, W, 3) or it.dtype != np.uint8:
                raise ViewStoreError(f"write_source({i}): interp must be uint8 {(J, H, W, 3)}, got "
                                     f"{it.dtype} {it.shape}")
            pa = np.asarray(partners, dtype=np.int64).reshape(-1)
            al = np.asarray(alphas, dtype=np.float32).reshape(-1)
            if pa.shape != (J,) or al.shape != (J,):
                raise ViewStoreError(f"write_source({i}): partners and alphas must have {J} entries")
            if (pa < 0).any() or (pa >= self.n_sources).any():
                raise ViewStoreError(f"write_source({i}): partner indices must lie in [0, {self.n_sources})")
        arrays = self._arrays
        written = []
        if K:
            arrays["views"][i] = v
            arrays["noise_level"][i] = nl.astype(np.int16)
            written += ["views", "noise_level"]
        if J:
            arrays["interp"][i] = it
            arrays["interp_partner"][i] = pa
            arrays["interp_alpha"][i] = al
            written += ["interp", "interp_partner", "interp_alpha"]
        if durable:
            dirs = set()
            for name in written:
                f = self._chunk_file(name, i)
                _fsync_file(f)
                dirs.add(f.parent)
            for d in dirs:
                _fsync_dir(d)
        arrays["done"][i] = True

    def invalidate(self, indices: Sequence[int]) -> None:
        """Mark sources not done (e.g. after a corruption report) so the next job run regenerates them."""
        self._require_writable()
        for i in indices:
            self._arrays["done"][self._check_index(i)] = False

    # ------------------------------------------------------------------ verification and repair
    def _used_arrays(self) -> list[str]:
        """Arrays that hold data: with K = 0 (J = 0) the view (interpolation) arrays are never written."""
        return ((["views", "noise_level"] if self.views_per_image else [])
                + (["interp", "interp_partner", "interp_alpha"] if self.interp_per_image else []))

    def _chunk_problem(self, name: str, f: Path) -> str | None:
        """Why chunk file ``f`` of ``name`` is damaged (None if it is whole): its crc32c (the same check as
        Zarr's ``Crc32cCodec``, without decoding) and, uncompressed, its size."""
        import google_crc32c

        try:
            data = f.read_bytes()
        except OSError as e:
            return f"unreadable ({e.strerror or e})"
        if len(data) < 4:
            return f"truncated ({len(data)} bytes)"
        if self.layout["compression"] is None:
            a = self._arrays[name]
            expected = int(np.prod(a.chunks)) * a.dtype.itemsize + 4
            if len(data) != expected:
                return f"wrong size ({len(data)} bytes, expected {expected}): truncated or overwritten"
        stored, computed = data[-4:], np.uint32(google_crc32c.value(data[:-4])).tobytes()
        if stored != computed:
            return f"crc32c mismatch (stored {stored.hex()}, computed {computed.hex()})"
        return None

    def verify_shard(self, shard_id: int) -> list[Damage]:
        """Every damaged chunk of shard ``shard_id``: a chunk file whose crc32c or size is wrong, and a
        missing chunk file of a source marked done. Reads each chunk file once, decodes nothing but the
        shard's ``done`` chunk. A damaged ``done`` chunk makes every source of the shard damaged (its
        flags cannot be trusted); missing chunks then cannot be judged, damaged ones still are."""
        r = self.shard_range(shard_id)
        damages: list[Damage] = []
        done = np.zeros(len(r), dtype=bool)
        done_file = self._chunk_file("done", r.start)
        if done_file.exists():
            why = self._chunk_problem("done", done_file)
            if why is None:
                try:
                    done = np.asarray(self._arrays["done"][r.start:r.stop], dtype=bool)
                except Exception as e:  # decodes wrongly although the crc matches (a writer bug)
                    why = f"undecodable: {e}"
            if why is not None:
                damages.append(Damage("done", done_file, r.start, r.stop, why))
        for name in self._used_arrays():
            step = self._arrays[name].chunks[0]
            for c0 in range(r.start, r.stop, step):
                c1 = min(c0 + step, r.stop)
                f = self._chunk_file(name, c0)
                if f.exists():
                    why = self._chunk_problem(name, f)
                elif done[c0 - r.start:c1 - r.start].any():
                    why = "chunk file missing, though its sources are marked done"
                else:
                    continue
                if why is not None:
                    damages.append(Damage(name, f, c0, c1, why))
        return damages

    def repair(self, damages: Sequence[Damage]) -> list[int]:
        """Make the sources of ``damages`` regenerable; returns them, sorted. Their ``done`` flags are
        cleared first (a damaged ``done`` chunk is deleted: its shard then counts as not done), then the
        damaged chunk files are deleted, so a crash half-way leaves nothing marked done that is not
        whole, and the job's writes never read a damaged chunk back (Zarr rewrites a partly covered
        chunk by reading it)."""
        self._require_writable()
        for d in damages:
            if d.array == "done":
                d.chunk.unlink(missing_ok=True)
        sources = sorted({i for d in damages for i in d.sources()})
        lost_flags = {i for d in damages if d.array == "done" for i in d.sources()}
        self.invalidate([i for i in sources if i not in lost_flags])
        for d in damages:
            if d.array != "done":
                d.chunk.unlink(missing_ok=True)
        for name in {d.array for d in damages}:
            _fsync_dir(self.path / name)
        return sources


class ViewStoreReader:
    """Read side for the data path: ``len``, ``views(i)``, ``interp(i)``, ``is_done(i)``,
    ``iter_shard(s)``, ``missing()``.

    The ``done`` mask is read once at open (:meth:`refresh` re-reads it). Reading a source that is not
    done raises :class:`ViewStoreError`. A damaged ``done`` chunk raises :class:`ViewStoreCorruptError`
    at open; with ``tolerate_damage=True`` (the training loader) its shard counts as done instead and
    reading any of its sources raises it. Picklable (reopens lazily), so it can be handed to spawned
    loader workers.
    """

    def __init__(self, path, expect_fingerprint: str | None = None,
                 expect_generator_hash: str | None = None, tolerate_damage: bool = False):
        self.path = Path(path)
        self.expect_fingerprint = expect_fingerprint
        self.expect_generator_hash = expect_generator_hash
        self.tolerate_damage = bool(tolerate_damage)
        self._store: ViewStore | None = None
        self._done: np.ndarray | None = None
        self._bad_flags: dict[int, str] = {}  # shard -> why its done chunk is unreadable
        _ = self.store                      # open now: provenance errors surface at construction

    def __getstate__(self):
        # the done mask travels with the pickle, so workers need not re-read N/S done chunks
        return {"path": self.path, "expect_fingerprint": self.expect_fingerprint,
                "expect_generator_hash": self.expect_generator_hash, "tolerate_damage": self.tolerate_damage,
                "_done": self._done, "_bad_flags": self._bad_flags}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._store = None

    @property
    def store(self) -> ViewStore:
        if self._store is None:
            self._store = open_view_store(self.path, "r", self.expect_fingerprint,
                                          self.expect_generator_hash)
            if self._done is None:
                self.refresh()
        return self._store

    def refresh(self) -> None:
        """Re-read the done mask (class docstring for a damaged ``done`` chunk)."""
        s = self.store
        self._bad_flags = {}
        if not self.tolerate_damage:
            self._done = s.done_mask()
            return
        try:
            self._done = np.asarray(s._arrays["done"][:], dtype=bool)  # one read, the usual case
            return
        except Exception:
            pass
        parts = []
        for shard in range(s.n_shards):
            r = s.shard_range(shard)
            try:
                parts.append(np.asarray(s._read("done", slice(r.start, r.stop),
                                                f"sources {r.start}..{r.stop - 1} (shard {shard})"), dtype=bool))
            except ViewStoreCorruptError as e:
                self._bad_flags[shard] = str(e)
                parts.append(np.ones(len(r), dtype=bool))
        self._done = np.concatenate(parts)

    def __len__(self) -> int:
        return self.store.n_sources

    @property
    def attrs(self) -> dict:
        return self.store.attrs

    @property
    def n_shards(self) -> int:
        return self.store.n_shards

    def is_done(self, i: int) -> bool:
        s = self.store
        return bool(self._done[s._check_index(i)])

    def missing(self) -> list[int]:
        _ = self.store
        return np.flatnonzero(~self._done).tolist()

    def _require_done(self, i: int) -> int:
        i = self.store._check_index(i)
        if not self._done[i]:
            raise ViewStoreError(f"source {i} of view store {self.path} is not generated yet (done=False); "
                                 f"rerun the generation job to complete the store")
        bad = self._bad_flags.get(self.store.shard_of(i))
        if bad is not None:
            raise ViewStoreCorruptError(bad)
        return i

    def views(self, i: int) -> np.ndarray:
        return self.store.views(self._require_done(i))

    def noise_levels(self, i: int) -> np.ndarray:
        return self.store.noise_levels(self._require_done(i))

    def interp(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.store.interp(self._require_done(i))

    def iter_shard(self, shard_id: int) -> Iterator[SourceRecord]:
        """Yield the done sources of one shard, in order (one read per array for the whole shard)."""
        r = self.store.shard_range(shard_id)
        data = self.store.read_range(r.start, r.stop)
        for k, i in enumerate(r):
            if self._done[i]:
                yield SourceRecord(i, data["views"][k], data["noise_level"][k], data["interp"][k],
                                   data["interp_partner"][k], data["interp_alpha"][k])
