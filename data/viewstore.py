"""The view store: synthetic views of a generation run in one Zarr v3 group, as encoded images inside
Zarr shards (docs/GENERATORS.md, "The view store (`views.zarr`)"; docs/DATA.md, "View store"). No
project imports.

Layout (schema 2; N sources, K views and J interpolated views per source, H×W RGB)::

    views.zarr/
      zarr.json          group attributes: schema_version, fingerprint, generator_hash, sampler, layout
                         {n_sources, views_per_image, interp_per_image, height, width, shard_size,
                         sources_per_chunk, compression, view_format, view_quality}, + the caller's keys
      views/             bytes [N, K]  shard [S, K], inner chunk [G, K]   one encoded image per element
      interp/            bytes [N, J]  shard [S, J], inner chunk [G, J]
      interp_partner/    int64 [N, J]  chunk [S, J]
      interp_alpha/      float32 [N, J] chunk [S, J]
      noise_level/       int16 [N, K]  chunk [S, K]
      done/              bool [N]      chunk [S]
      _staging/<s>/<i>   (transient) source i's encoded views while its shard s is unfinished

A view is stored as the file bytes of a JPEG (``view_format="jpeg"``, ``view_quality`` 1..100, default
95, Pillow's 4:2:0 chroma subsampling) or a lossless PNG / WebP, so the training loader hands them to
DALI's image decoder exactly like the real images (`genssl.data.gensis_loader`); ``views(i)`` decodes on
the host (Pillow) and returns ``uint8 [K, H, W, 3]`` as before. The two image arrays use Zarr's
sharding codec (``sharding_indexed``): every shard of S = ``shard_size`` sources is ONE file holding
its inner chunks (G = ``sources_per_chunk`` sources each, encoded ``vlen-bytes → crc32c``) and an index
protected by its own crc32c; the small arrays have one chunk per shard. So a store has one file per S
sources per array (S = 1024: < 1 per 1,000). The ``variable_length_bytes`` data type is zarr-python's
(it warns that it has no Zarr v3 specification yet); the store checks at open that the codecs are
exactly these, and reads the shards itself (`_ShardFile`: the index at the end, crc32c of the index
and of every inner chunk), so a change in zarr-python's defaults is an error, not a silent misread.

Writers and durability. Writers own **shards** (rank ``s % world_size`` writes shard s: the generation
job's shards are these Zarr shards), so two writers never write the same file. Rewriting a shard file
per source would cost O(S²) bytes, so ``write_source(i, ...)`` first *stages* the source: its encoded
views go to ``_staging/<s>/<i>`` (a small file with a crc32c per view, written to a temporary name,
fsynced, renamed), its noise levels, partners and α into their per-shard chunks (fsynced), and only
then is ``done[i]`` set. When the last source of a shard is done, the shard is *sealed*: its shard
files are written whole (Zarr writes a temporary file and renames it), fsynced, and only then are the
staging files deleted. A killed writer leaves done sources staged (readable, verified), perhaps a
complete but unsealed shard — :meth:`ViewStore.set_writer` seals those — and at most unfinished
sources with ``done = False``. Staged data takes precedence over the shard file when both exist.

Damage (a flipped bit, a truncated or deleted file) is found two ways. Reading a source checks the
crc32c of the shard index and inner chunk (or of the staged view) and that the view is there and
looks like an image of the store's format, raising :class:`ViewStoreCorruptError` naming the array,
source and file; the training loader then uses the real crop for that sample. :meth:`ViewStore.verify_shard`
checks a whole shard without decoding images, and :meth:`ViewStore.repair` marks the sources of every
damage not done and deletes the files that are unusable as a whole (a shard whose index is damaged, a
damaged small-array chunk or staging file); a shard with one bad inner chunk stays and is rewritten
when its regenerated sources are sealed. The generation job (``verify=true``) regenerates them.

Creation is atomic and idempotent (a temporary sibling folder renamed into place); an existing store
must match the request (dataset fingerprint, generator hash, layout, sampler settings) or a
``ValueError`` says what differs. A store of schema 1 (raw uint8 views, one file per source) is
refused with the command that converts it: ``python -m genssl.data.convert_views OLD NEW``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

__all__ = [
    "SCHEMA_VERSION", "VIEW_FORMATS", "ViewStoreError", "ViewStoreCorruptError", "ViewStoreSchemaError",
    "ViewStore", "ViewStoreReader", "SourceRecord", "Damage", "create_view_store", "open_view_store",
    "encode_view", "decode_view", "old_schema_message",
]

SCHEMA_VERSION = 2
VIEW_FORMATS = ("jpeg", "png", "webp")
_DATA_ARRAYS = ("views", "interp")
_META_ARRAYS = ("interp_partner", "interp_alpha", "noise_level")
ARRAY_NAMES = _DATA_ARRAYS + _META_ARRAYS + ("done",)
STAGING = "_staging"
_EMPTY = 2**64 - 1                    # sharding spec: offset/length of an absent inner chunk
_STAGE_MAGIC = b"GSSLSRC1"



@contextlib.contextmanager
def _quiet():
    """zarr-python warns that its variable-length bytes type has no v3 spec yet; the store pins and
    checks the codecs itself (`ViewStore._check_codecs`), so the warning says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*VariableLengthBytes.*")
        yield


class ViewStoreError(ValueError):
    """A view store cannot be used as asked (mismatch, missing source, bad arguments)."""


class ViewStoreCorruptError(ViewStoreError):
    """A chunk failed its crc32c check (or is missing, or could not be decoded)."""


class ViewStoreSchemaError(ViewStoreError):
    """The store was written in another schema (see :func:`old_schema_message`)."""


class Damage(NamedTuple):
    """One damage found by :meth:`ViewStore.verify_shard`: ``array``'s file ``chunk`` (a shard file, a
    chunk file or a staging file) is damaged for sources ``start..stop-1``, which must be regenerated.
    ``whole_file``: the file is unusable as a whole (repair deletes it); False for one bad inner chunk of
    a shard file (the shard is rewritten when its regenerated sources are sealed)."""

    array: str
    chunk: Path
    start: int
    stop: int
    reason: str
    whole_file: bool = True

    def sources(self) -> range:
        return range(self.start, self.stop)


class SourceRecord(NamedTuple):
    index: int
    views: np.ndarray           # uint8 [K, H, W, 3]
    noise_levels: np.ndarray    # int16 [K]
    interp: np.ndarray          # uint8 [J, H, W, 3]
    partners: np.ndarray        # int64 [J]
    alphas: np.ndarray          # float32 [J]


REPAIR_HINT = ("rerun the generation job with verify=true (python recipes/generate_views.py ... verify=true; a "
               "pipeline's generation stage verifies on every rerun): it finds every damaged chunk, invalidates its "
               "sources and regenerates them")


def old_schema_message(path, version) -> str:
    return (f"{path} is a view store of schema {version!r} (raw uint8 views, one chunk file per source), which this "
            f"genssl no longer reads: it reads schema {SCHEMA_VERSION} (encoded images in Zarr shards). Convert it "
            f"once (every chunk is verified; the new store is written to a temporary folder and renamed into place): "
            f"python -m genssl.data.convert_views {path} {path}.v{SCHEMA_VERSION}  (then point views= at the new "
            f"store), or in place, keeping the old one as {path}.schema{version}: "
            f"python -m genssl.data.convert_views {path} {path}")


def _fix_hint() -> str:
    return "write to a new out= directory, or run with the inputs this store was generated from"


def _crc(data) -> bytes:
    import google_crc32c

    return np.uint32(google_crc32c.value(bytes(data))).tobytes()


# ---------------------------------------------------------------------------------------------- images

def encode_view(img: np.ndarray, view_format: str = "jpeg", quality: int | None = 95) -> bytes:
    """``uint8 [H, W, 3]`` -> the file bytes of one image (deterministic for a given Pillow)."""
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(img), "RGB")
    if view_format == "jpeg":
        im.save(buf, "JPEG", quality=int(quality))
    elif view_format == "png":
        im.save(buf, "PNG", compress_level=1)  # lossless either way; level 1 encodes ~10x faster than 6
    elif view_format == "webp":
        im.save(buf, "WEBP", lossless=True, quality=0, method=0)  # lossless; fastest effort
    else:
        raise ViewStoreError(f"view_format must be one of {VIEW_FORMATS}, got {view_format!r}")
    return buf.getvalue()


def decode_view(data: bytes) -> np.ndarray:
    """File bytes of one image -> ``uint8 [H, W, 3]`` (Pillow)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def _image_problem(view_format: str, data: bytes) -> str | None:
    """Why ``data`` cannot be an image of ``view_format`` (cheap structural check; None if plausible)."""
    if not data:
        return "missing (empty)"
    if view_format == "jpeg":
        ok = data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    elif view_format == "png":
        ok = data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND"
    else:
        ok = data[:4] == b"RIFF" and data[8:12] == b"WEBP" and struct.unpack_from("<I", data, 4)[0] + 8 == len(data)
    return None if ok else f"not a whole {view_format} image ({len(data)} bytes)"


# ---------------------------------------------------------------------------------------------- files

def _pack_source(blobs: Sequence[bytes], K: int, J: int) -> bytes:
    """Staging file of one source: magic, K, J, (length u64, crc32c) per part, the header's crc32c, then
    the parts: K + J encoded views and one of the small arrays' values (`_pack_meta`)."""
    head = _STAGE_MAGIC + struct.pack("<II", K, J) + b"".join(struct.pack("<Q", len(b)) + _crc(b) for b in blobs)
    return head + _crc(head) + b"".join(blobs)


def _unpack_source(data: bytes, K: int, J: int) -> list[bytes | str]:
    """The K + J + 1 parts of a staging file; an entry is a ``str`` (the reason) where a part is damaged."""
    n = K + J + 1
    head_len = 16 + 12 * n
    if len(data) < head_len + 4 or data[:8] != _STAGE_MAGIC or data[8:16] != struct.pack("<II", K, J):
        return [f"staging file truncated or not one ({len(data)} bytes)"] * n
    if _crc(data[:head_len]) != data[head_len:head_len + 4]:
        return ["crc32c checksum mismatch in the staging file's header"] * n
    out: list[bytes | str] = []
    pos = head_len + 4
    for k in range(n):
        length, = struct.unpack_from("<Q", data, 16 + 12 * k)
        crc = data[24 + 12 * k:28 + 12 * k]
        blob = data[pos:pos + length]
        pos += length
        out.append(blob if len(blob) == length and _crc(blob) == crc else
                   (f"truncated ({len(blob)} of {length} bytes)" if len(blob) != length
                    else f"crc32c checksum mismatch (part {k} of the staging file)"))
    return out


def _pack_meta(levels: np.ndarray, partners: np.ndarray, alphas: np.ndarray) -> bytes:
    return (levels.astype("<i2").tobytes() + partners.astype("<i8").tobytes() + alphas.astype("<f4").tobytes())


def _unpack_meta(blob: bytes, K: int, J: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(noise levels int16 [K], partners int64 [J], α float32 [J])`` of a staging file."""
    return (np.frombuffer(blob, "<i2", K, 0).astype(np.int16), np.frombuffer(blob, "<i8", J, 2 * K).astype(np.int64),
            np.frombuffer(blob, "<f4", J, 2 * K + 8 * J).astype(np.float32))


def _vlen_items(chunk: bytes, expect: int) -> list[bytes]:
    """Zarr's ``vlen-bytes`` chunk encoding: u32 count, then (u32 length, bytes) per element."""
    count, = struct.unpack_from("<I", chunk, 0)
    if count != expect:
        raise ValueError(f"holds {count} elements, expected {expect}")
    pos, out = 4, []
    for _ in range(count):
        n, = struct.unpack_from("<I", chunk, pos)
        out.append(bytes(chunk[pos + 4:pos + 4 + n]))
        pos += 4 + n
    if pos != len(chunk):
        raise ValueError(f"{len(chunk) - pos} stray bytes")
    return out


class _ShardFile:
    """The parsed index of one shard file (Zarr v3 ``sharding_indexed``, index at the end: per inner
    chunk, in C order, u64 offset and u64 length, then the crc32c of the index)."""

    def __init__(self, tail: bytes, size: int, n_inner: int) -> None:
        want = 16 * n_inner + 4
        self.problem: str | None = None
        self.index = None
        if size < want or len(tail) != want:
            self.problem = f"truncated ({size} bytes, shorter than its index of {want})"
        elif _crc(tail[:-4]) != tail[-4:]:
            self.problem = "crc32c checksum mismatch in the shard index (damaged, truncated or overwritten)"
        else:
            idx = np.frombuffer(tail[:-4], "<u8").reshape(n_inner, 2)
            body = size - want
            bad = (idx[:, 0] != _EMPTY) & (idx[:, 0] + idx[:, 1] > body)
            if bad.any():
                self.problem = "the shard index points past the end of the file (truncated)"
            else:
                self.index = idx

    def chunk(self, read, c: int, n_items: int) -> list[bytes] | str:
        """Inner chunk ``c`` as its elements, or the reason it is unusable (``read(n, off)`` reads bytes)."""
        off, n = (int(v) for v in self.index[c])
        if off == _EMPTY:
            return "missing (the shard holds no data for it)"
        data = read(n, off)
        if len(data) != n or n < 4:
            return "truncated"
        if _crc(data[:-4]) != data[-4:]:
            return "crc32c checksum mismatch"
        try:
            return _vlen_items(data[:-4], n_items)
        except (ValueError, struct.error) as e:
            return f"undecodable ({e})"


# ---------------------------------------------------------------------------------------------- create

def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _layout(n_sources, K, J, H, W, shard_size, sources_per_chunk, compression, view_format, view_quality) -> dict:
    return {"n_sources": int(n_sources), "views_per_image": int(K), "interp_per_image": int(J),
            "height": int(H), "width": int(W), "shard_size": int(shard_size),
            "sources_per_chunk": int(sources_per_chunk),
            "compression": compression if compression != "none" else None,
            "view_format": view_format, "view_quality": int(view_quality) if view_format == "jpeg" else None}


def _meta_codecs(compression: str | None):
    import zarr.codecs as zc

    comp = []
    if compression == "zstd":
        comp.append(zc.ZstdCodec(level=1))
    elif compression not in (None, "none"):
        raise ViewStoreError(f"compression must be None or 'zstd', got {compression!r}")
    comp.append(zc.Crc32cCodec())
    return zc.BytesCodec(), comp


def _build_group(tmp: Path, layout: dict, group_attrs: dict) -> None:
    import zarr
    import zarr.codecs as zc
    from zarr.storage import LocalStore

    N, K, J = layout["n_sources"], layout["views_per_image"], layout["interp_per_image"]
    S, G = layout["shard_size"], layout["sources_per_chunk"]
    g = zarr.open_group(store=LocalStore(tmp), mode="w", zarr_format=3)
    keys = {"name": "default", "separator": "."}
    for name, width in (("views", K), ("interp", J)):
        # vlen-bytes then crc32c per inner chunk (Zarr adds the crc32c'd index of each shard)
        g.create_array(name, shape=(N, width), chunks=(G, max(width, 1)), shards=(S, max(width, 1)),
                       dtype=zarr.dtype.VariableLengthBytes(), fill_value=b"", compressors=[zc.Crc32cCodec()],
                       chunk_key_encoding=keys)
    ser, comp = _meta_codecs(layout["compression"])
    common = dict(serializer=ser, compressors=comp, config={"write_empty_chunks": True}, chunk_key_encoding=keys)
    g.create_array("interp_partner", shape=(N, J), chunks=(S, max(J, 1)), dtype="int64", fill_value=-1, **common)
    g.create_array("interp_alpha", shape=(N, J), chunks=(S, max(J, 1)), dtype="float32", fill_value=0.0, **common)
    g.create_array("noise_level", shape=(N, K), chunks=(S, max(K, 1)), dtype="int16", fill_value=0, **common)
    g.create_array("done", shape=(N,), chunks=(S,), dtype="bool", fill_value=False, **common)
    g.attrs.update(group_attrs)


def create_view_store(path: str | os.PathLike, n_sources: int, views_per_image: int,
                      interp_per_image: int, height: int, width: int, attrs: dict, *,
                      shard_size: int = 1024, sources_per_chunk: int = 1, compression: str | None = None,
                      view_format: str = "jpeg", view_quality: int = 95) -> "ViewStore":
    """Create the store at ``path`` (or open it, if an identical one exists) and return it writable.

    Args:
        attrs: must hold ``fingerprint`` (dataset fingerprint) and ``generator_hash`` (generator
            checkpoint hash); ``sampler`` (dict of sampler settings) is recommended; any other
            JSON-serialisable keys are stored as they are.
        shard_size: S, sources per shard: one file per array, the unit a writer owns. 1024 keeps a
            store under one file per 1,000 sources per array.
        sources_per_chunk: G, sources per inner chunk of ``views``/``interp`` (must divide S): the unit
            of a read. 1 = one source, the best for random access.
        compression: ``None`` or ``"zstd"`` (level 1) for the small arrays (the images are compressed).
        view_format: ``"jpeg"`` (lossy, ``view_quality`` 1..100), ``"png"`` or ``"webp"`` (lossless).

    Safe to call from every rank at once: the group is built in a temporary folder and renamed into
    place; the losers of the race find the winner's store and check that it matches.
    """
    path = Path(path)
    N, K, J, H, W = (int(v) for v in (n_sources, views_per_image, interp_per_image, height, width))
    if N < 1 or K < 0 or J < 0 or H < 1 or W < 1 or K + J < 1:
        raise ViewStoreError(f"bad view store shape: n_sources={N}, K={K}, J={J}, H={H}, W={W} "
                             f"(need N≥1, K,J≥0, K+J≥1, H,W≥1)")
    S, G = int(shard_size), int(sources_per_chunk)
    if S < 1 or G < 1 or S % G:
        raise ViewStoreError(f"shard_size ({S}) must be a positive multiple of sources_per_chunk ({G})")
    if view_format not in VIEW_FORMATS:
        raise ViewStoreError(f"view_format must be one of {VIEW_FORMATS}, got {view_format!r}")
    if view_format == "jpeg" and not 1 <= int(view_quality) <= 100:
        raise ViewStoreError(f"view_quality is a JPEG quality in 1..100, got {view_quality}")
    for key in ("fingerprint", "generator_hash"):
        if not attrs.get(key):
            raise ViewStoreError(f"create_view_store: attrs must contain a non-empty {key!r}")
    layout = _layout(N, K, J, H, W, S, G, compression, view_format, view_quality)
    _meta_codecs(layout["compression"])  # a bad compression fails before anything is written
    user = _jsonable(dict(attrs))
    user.setdefault("sampler", {})
    group_attrs = {**user, "schema_version": SCHEMA_VERSION, "layout": layout}

    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _quiet():
                _build_group(tmp, layout, group_attrs)
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
    or generator hash differs from the expected ones, or when it is of another schema."""
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


def _runs(mask: np.ndarray, offset: int) -> list[tuple[int, int]]:
    """Contiguous runs of True in ``mask`` as ``(start, stop)`` source ranges."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(offset + int(a), offset + int(b)) for a, b in zip(edges[::2], edges[1::2])]


# ---------------------------------------------------------------------------------------------- store

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
            with _quiet():
                self._group = zarr.open_group(store=LocalStore(self.path, read_only=(mode == "r")),
                                              mode=mode, zarr_format=3)
        except Exception as e:
            raise ViewStoreError(f"{self.path} is not a readable Zarr v3 group: {e}") from e
        self.attrs = dict(self._group.attrs)
        sv = self.attrs.get("schema_version")
        if sv == 1:
            raise ViewStoreSchemaError(old_schema_message(self.path, sv))
        if sv != SCHEMA_VERSION or "layout" not in self.attrs:
            newer = isinstance(sv, int) and sv > SCHEMA_VERSION
            raise ViewStoreError(f"{self.path} is not a genssl view store of schema {SCHEMA_VERSION} "
                                 f"(schema_version={sv!r})" + ("; it was written by a newer genssl: upgrade" if newer else ""))
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
        self.view_format, self.view_quality = lay["view_format"], lay["view_quality"]
        self.n_shards = -(-self.n_sources // self.shard_size)
        self._arrays = {}
        for name in ARRAY_NAMES:
            try:
                with _quiet():
                    a = self._group[name]
            except KeyError as e:
                raise ViewStoreError(f"view store {self.path} lacks the array {name!r}") from e
            self._arrays[name] = a.with_config({"write_empty_chunks": True}) if mode == "r+" else a
        for name in _DATA_ARRAYS:
            self._check_codecs(name)
        self._writer: tuple[int, int] | None = None
        self._staged_shards: set[int] | None = None     # shards with a staging folder (lazy)
        # read-only: each chunk of (partners, α) read once, not once per source (`_interp_meta`)
        self._interp_meta_chunks: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if mode == "r" else None
        self._done_cache: dict[int, np.ndarray] = {}      # a writer's done flags of the shards it wrote
        self._indices: dict[str, tuple[tuple, _ShardFile]] = {}  # shard file -> (stat key, parsed index)

    def _check_codecs(self, name: str) -> None:
        """The shard layout `_ShardFile` reads: refuse anything else rather than misread it."""
        with _quiet():
            meta = self._arrays[name].metadata.to_dict()
        codecs = meta.get("codecs") or [{}]
        conf = codecs[0].get("configuration", {})
        width = max(self.views_per_image if name == "views" else self.interp_per_image, 1)
        ok = (meta.get("data_type") == "variable_length_bytes" and len(codecs) == 1
              and codecs[0].get("name") == "sharding_indexed" and conf.get("index_location", "end") == "end"
              and [c.get("name") for c in conf.get("codecs", [])] == ["vlen-bytes", "crc32c"]
              and [c.get("name") for c in conf.get("index_codecs", [])] == ["bytes", "crc32c"]
              and conf.get("index_codecs", [{}])[0].get("configuration", {}).get("endian", "little") == "little"
              and list(conf.get("chunk_shape", [])) == [self.sources_per_chunk, width]
              and list(meta["chunk_grid"]["configuration"]["chunk_shape"]) == [self.shard_size, width])
        if not ok:
            raise ViewStoreError(f"view store {self.path}: array {name!r} is not laid out as genssl writes it "
                                 f"(sharded vlen-bytes + crc32c with shard [{self.shard_size}, {width}]); "
                                 f"regenerate it, or convert it with python -m genssl.data.convert_views")

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
        """Restrict :meth:`write_source` to this rank's shards (a guard against two writers per file),
        and seal those of them a killed writer left complete but unsealed."""
        mine = self.shards_for_rank(rank, world_size)
        self._writer = (int(rank), int(world_size))
        if self.mode != "r+":
            return
        try:
            done = self.done_mask()
        except ViewStoreCorruptError:
            return  # verify finds it; the shard is sealed when its sources are written again
        for s in mine:
            r = self.shard_range(s)
            if self._has_staging(s) and done[r.start:r.stop].all():
                try:
                    self._seal(s, durable=True)
                except ViewStoreCorruptError:
                    pass  # as above: a damaged staged view is verify's to find

    def _check_index(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.n_sources:
            raise IndexError(f"source {i} out of range [0, {self.n_sources}) in view store {self.path}")
        return i

    def _chunk_file(self, name: str, i: int) -> Path:
        """The file holding source ``i`` of ``name``: its shard file (images) or chunk file."""
        a = self._arrays[name]
        step = a.shards[0] if a.shards else a.chunks[0]
        key = a.metadata.chunk_key_encoding.encode_chunk_key((int(i) // step,) + (0,) * (a.ndim - 1))
        return self.path / name / key

    def _staging_file(self, i: int) -> Path:
        return self.path / STAGING / str(self.shard_of(i)) / str(int(i))

    def _has_staging(self, s: int) -> bool:
        if self._staged_shards is None:
            try:
                self._staged_shards = {int(d) for d in os.listdir(self.path / STAGING) if d.isdigit()}
            except FileNotFoundError:
                self._staged_shards = set()
        return s in self._staged_shards

    def _staged_sources(self, s: int) -> dict[int, Path]:
        d = self.path / STAGING / str(s)
        try:
            return {int(f): d / f for f in os.listdir(d) if f.isdigit()}
        except FileNotFoundError:
            return {}

    def chunk_location(self, name: str, i: int) -> tuple[Path, int, int]:
        """``(file, offset, length)`` of the bytes holding source ``i`` of array ``name``: its staging
        file, the inner chunk in its shard file, or its chunk file (for tests and damage reports)."""
        i = self._check_index(i)
        staged = self._staging_file(i)
        if name != "done" and staged.exists():
            return staged, 0, staged.stat().st_size
        if name in _DATA_ARRAYS:
            f = self._chunk_file(name, i)
            shard = self._shard_index(name, f)
            if shard.index is None:
                raise ViewStoreCorruptError(f"view store {self.path}: {f}: {shard.problem}")
            off, n = (int(v) for v in shard.index[self._inner(i)])
            return f, off, n
        f = self._chunk_file(name, i)
        return f, 0, f.stat().st_size

    # ------------------------------------------------------------------ reads
    def _inner(self, i: int) -> int:
        """Position of source i's inner chunk in its shard's index."""
        return (int(i) % self.shard_size) // self.sources_per_chunk

    def _width(self, name: str) -> int:
        return self.views_per_image if name == "views" else self.interp_per_image

    def _shard_index(self, name: str, f: Path, fd: int | None = None) -> _ShardFile:
        """The parsed index of shard file ``f`` (cached per file version; FileNotFoundError if none)."""
        own = fd is None
        if own:
            fd = os.open(f, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            hit = self._indices.get(str(f))
            if hit is not None and hit[0] == key:
                return hit[1]
            n_inner = self.shard_size // self.sources_per_chunk
            want = 16 * n_inner + 4
            tail = os.pread(fd, want, max(st.st_size - want, 0)) if st.st_size >= want else b""
            shard = _ShardFile(tail, st.st_size, n_inner)
            if len(self._indices) > 256:
                self._indices.clear()
            self._indices[str(f)] = (key, shard)
            return shard
        finally:
            if own:
                os.close(fd)

    def _corrupt(self, name: str, i: int, f: Path, why: str) -> ViewStoreCorruptError:
        return ViewStoreCorruptError(f"view store {self.path}: array {name!r} is damaged at source {i} (file {f}): "
                                     f"{why}. To repair, {REPAIR_HINT}")

    def _encoded(self, name: str, i: int) -> list[bytes]:
        """The encoded images of source ``i`` in ``name`` (staged first, else from its shard), each
        crc32c-checked and structurally an image of the store's format; else ViewStoreCorruptError."""
        K, J = self.views_per_image, self.interp_per_image
        width = self._width(name)
        if width == 0:
            return []
        items = None
        staged = self._staged_parts(i)
        if staged is not None:
            f, got = staged
            items = got[:K] if name == "views" else got[K:K + J]
        if items is None:
            f = self._chunk_file(name, i)
            try:
                fd = os.open(f, os.O_RDONLY)
            except FileNotFoundError:
                raise self._corrupt(name, i, f, "its shard file is missing") from None
            try:
                shard = self._shard_index(name, f, fd)
                if shard.index is None:
                    raise self._corrupt(name, i, f, shard.problem)
                got = shard.chunk(lambda n, off: os.pread(fd, n, off), self._inner(i), self.sources_per_chunk * width)
            finally:
                os.close(fd)
            if isinstance(got, str):
                raise self._corrupt(name, i, f, got)
            row = i % self.sources_per_chunk
            items = got[row * width:(row + 1) * width]
        for k, item in enumerate(items):
            why = item if isinstance(item, str) else _image_problem(self.view_format, item)
            if why is not None:
                raise self._corrupt(name, i, f, f"view {k}: {why}")
        return items

    def _staged_parts(self, i: int) -> tuple[Path, list[bytes | str]] | None:
        """``(staging file, its parts)`` when source i is staged (staged data wins over the shard's)."""
        if not self._has_staging(self.shard_of(i)):
            return None
        p = self._staging_file(i)
        try:
            return p, _unpack_source(p.read_bytes(), self.views_per_image, self.interp_per_image)
        except FileNotFoundError:
            return None

    def _staged_meta(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        staged = self._staged_parts(i)
        if staged is None:
            return None
        f, parts = staged
        if isinstance(parts[-1], str):
            raise self._corrupt("noise_level", i, f, parts[-1])
        return _unpack_meta(parts[-1], self.views_per_image, self.interp_per_image)

    def _decoded(self, name: str, i: int) -> np.ndarray:
        out = np.empty((self._width(name), self.height, self.width, 3), np.uint8)
        for k, data in enumerate(self._encoded(name, i)):
            try:
                img = decode_view(data)
            except Exception as e:  # a crc-valid image the decoder rejects: a writer bug
                raise self._corrupt(name, i, self._chunk_file(name, i), f"view {k} does not decode ({e})") from e
            if img.shape != out.shape[1:]:
                raise self._corrupt(name, i, self._chunk_file(name, i),
                                    f"view {k} decodes to {img.shape}, expected {out.shape[1:]}")
            out[k] = img
        return out

    def _read(self, name: str, sel, what: str):
        """A read of a small array (noise levels, partners, α, done), mapping damage to ViewStoreCorruptError."""
        i0 = int((sel.start if isinstance(sel, slice) else sel) or 0)
        if name != "done" and not isinstance(sel, slice) and not self._chunk_file(name, i0).exists():
            # Zarr reads a missing chunk as its fill value without complaint
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
            msg = str(e).rstrip(".").replace("Stored and computed checksum do not match", "crc32c checksum mismatch")
            raise ViewStoreCorruptError(
                f"view store {self.path}: array {name!r} is corrupted at {what} (chunk file "
                f"{self._chunk_file(name, i0)}, holding {covers}): {msg}. To repair, {REPAIR_HINT}") from e

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
        """``uint8 [K, H, W, 3]``, decoded."""
        return self._decoded("views", self._check_index(i))

    def encoded_views(self, i: int) -> list[bytes]:
        """The K views of source ``i`` as image file bytes (checked: crc32c, present, an image)."""
        return self._encoded("views", self._check_index(i))

    def noise_levels(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        staged = self._staged_meta(i)
        return staged[0] if staged is not None else self._read("noise_level", i, f"source {i}")

    def noise_level_array(self) -> np.ndarray:
        """Every source's noise levels ``[N, K]`` (0 for sources not written yet); sources of an
        unsealed shard from their staging files."""
        levels = np.array(self._read("noise_level", slice(0, self.n_sources), "the noise levels"))
        for s in range(self.n_shards):
            if self._has_staging(s):
                for i in self._staged_sources(s):
                    levels[i] = self.noise_levels(i)
        return levels

    def _interp_meta(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        staged = self._staged_meta(i)
        if staged is not None:
            return staged[1], staged[2]
        if self._interp_meta_chunks is None:  # a writable store may change under the reader
            return self._read("interp_partner", i, f"source {i}"), self._read("interp_alpha", i, f"source {i}")
        # A read-only store keeps the chunk holding i: reading a few bytes per source through Zarr cost
        # ~0.8 ms each, 85 % of the Gen-SIS loader's host time (docs/SCALING.md); the arrays are
        # 12·J bytes per source. A chunk that is missing or corrupt fails as the per-source read did.
        chunk = self._arrays["interp_partner"].chunks[0]
        lo = (i // chunk) * chunk
        held = self._interp_meta_chunks.get(lo)
        if held is None:
            hi = min(lo + chunk, self.n_sources)
            what = f"source {i}"  # errors name the source asked for; they give the chunk's range too
            for name in ("interp_partner", "interp_alpha"):
                self._read(name, lo, what)  # the missing-chunk check a slice read skips
            held = (np.asarray(self._read("interp_partner", slice(lo, hi), what)),
                    np.asarray(self._read("interp_alpha", slice(lo, hi), what)))
            self._interp_meta_chunks[lo] = held
        return held[0][i - lo], held[1][i - lo]

    def interp(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(uint8 [J, H, W, 3] decoded, partners int64 [J], α float32 [J])``."""
        i = self._check_index(i)
        return (self._decoded("interp", i), *self._interp_meta(i))

    def encoded_interp(self, i: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        """As :meth:`interp`, the J views as image file bytes."""
        i = self._check_index(i)
        return (self._encoded("interp", i), *self._interp_meta(i))

    def read_range(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """All arrays for sources ``start..stop-1``, views decoded (zeros where a source is not done)."""
        sl = slice(int(start), int(stop))
        what = f"sources {start}..{stop - 1}"
        out = {name: np.array(self._read(name, sl, what)) for name in _META_ARRAYS + ("done",)}
        for k, i in enumerate(range(start, stop)):
            staged = self._staged_meta(i) if out["done"][k] else None
            if staged is not None:
                out["noise_level"][k], out["interp_partner"][k], out["interp_alpha"][k] = staged
        for name in _DATA_ARRAYS:
            out[name] = np.zeros((stop - start, self._width(name), self.height, self.width, 3), np.uint8)
            for k, i in enumerate(range(start, stop)):
                if out["done"][k]:
                    out[name][k] = self._decoded(name, i)
        return out

    # ------------------------------------------------------------------ writes
    def _require_writable(self):
        if self.mode != "r+":
            raise ViewStoreError(f"view store {self.path} is open read-only; open it with mode='r+'")

    def _encode_all(self, i: int, images: np.ndarray) -> list[bytes]:
        try:
            return [encode_view(im, self.view_format, self.view_quality) for im in images]
        except Exception as e:
            raise ViewStoreError(f"write_source({i}): cannot encode the views as {self.view_format}: {e}") from e

    def write_source(self, i: int, views, noise_levels, interp=None, partners=None, alphas=None,
                     durable: bool = True) -> None:
        """Write source ``i`` (views ``uint8 [K,H,W,3]``, noise levels ``[K]``, interpolated views
        ``uint8 [J,H,W,3]`` with partners ``[J]`` and α ``[J]``): stage it, make it durable (fsync),
        then set ``done[i]``; seal its shard when it was the shard's last source (module docstring)."""
        self.write_sources([i], np.asarray(views)[None], np.asarray(noise_levels)[None],
                           None if interp is None else np.asarray(interp)[None],
                           None if partners is None else np.asarray(partners)[None],
                           None if alphas is None else np.asarray(alphas)[None], durable=durable)

    def write_sources(self, indices: Sequence[int], views, noise_levels, interp=None, partners=None, alphas=None,
                      durable: bool = True) -> None:
        """:meth:`write_source` for n sources at once (views ``uint8 [n,K,H,W,3]``, noise levels ``[n,K]``,
        interp ``uint8 [n,J,H,W,3]``, partners and α ``[n,J]``): the staging files are fsynced together
        (concurrent fsyncs let the file system commit them as one), then every ``done`` flag is set with
        one write per shard. A generation job writing a group of sources pays one commit per group."""
        self._require_writable()
        K, J, H, W = self.views_per_image, self.interp_per_image, self.height, self.width
        idx = [self._check_index(i) for i in indices]
        if self._writer is not None:
            rank, ws = self._writer
            for i in idx:
                if self.shard_of(i) % ws != rank:
                    raise ViewStoreError(f"rank {rank}/{ws} may not write source {i}: its shard "
                                         f"{self.shard_of(i)} belongs to rank {self.shard_of(i) % ws}")
        n = len(idx)
        first = idx[0] if idx else 0
        v = np.asarray(views)
        if v.shape != (n, K, H, W, 3) or v.dtype != np.uint8:
            raise ViewStoreError(f"write_source({first}): views must be uint8 {(K, H, W, 3)} per source, got "
                                 f"{v.dtype} {v.shape[1:] if v.ndim else v.shape}")
        nl = np.asarray(noise_levels, dtype=np.int64).reshape(n, -1)
        if nl.shape != (n, K):
            raise ViewStoreError(f"write_source({first}): {K} noise levels expected, got {nl.shape[1:]}")
        it = np.zeros((n, 0, H, W, 3), np.uint8)
        pa, al = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
        if J:
            if interp is None or partners is None or alphas is None:
                raise ViewStoreError(f"write_source({first}): this store holds J={J} interpolated views per "
                                     f"source; pass interp, partners and alphas")
            it = np.asarray(interp)
            if it.shape != (n, J, H, W, 3) or it.dtype != np.uint8:
                raise ViewStoreError(f"write_source({first}): interp must be uint8 {(J, H, W, 3)} per source, got "
                                     f"{it.dtype} {it.shape[1:]}")
            pa = np.asarray(partners, dtype=np.int64).reshape(n, -1)
            al = np.asarray(alphas, dtype=np.float32).reshape(n, -1)
            if pa.shape != (n, J) or al.shape != (n, J):
                raise ViewStoreError(f"write_source({first}): partners and alphas must have {J} entries")
            if (pa < 0).any() or (pa >= self.n_sources).any():
                raise ViewStoreError(f"write_source({first}): partner indices must lie in [0, {self.n_sources})")
        files = [(i, self._encode_all(i, v[k]) + self._encode_all(i, it[k]) + [_pack_meta(nl[k], pa[k], al[k])])
                 for k, i in enumerate(idx)]  # encode everything before anything is written
        self._stage(files, durable)
        shards = sorted({self.shard_of(i) for i in idx})
        for s in shards:
            flags = self._shard_done(s)
            r = self.shard_range(s)
            flags[[i - r.start for i in idx if self.shard_of(i) == s]] = True
            self._arrays["done"][r.start:r.stop] = flags
            if flags.all():
                self._seal(s, durable)

    def _shard_done(self, s: int) -> np.ndarray:
        """The writer's copy of shard s's done flags (it is the shard's only writer)."""
        if s not in self._done_cache:
            r = self.shard_range(s)
            self._done_cache[s] = np.array(self._read("done", slice(r.start, r.stop), f"shard {s}"), dtype=bool)
        return self._done_cache[s]

    def _stage(self, files: list[tuple[int, list[bytes]]], durable: bool) -> None:
        """Write staging files under temporary names, fsync them (concurrently), rename them into place,
        fsync their folders."""
        from concurrent.futures import ThreadPoolExecutor

        tmps = []
        try:
            for i, parts in files:
                p = self._staging_file(i)
                if not p.parent.exists():
                    p.parent.mkdir(parents=True, exist_ok=True)
                    if durable:
                        _fsync_dir(p.parent.parent)
                        _fsync_dir(self.path)
                tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.partial")
                tmps.append((tmp, p))
                tmp.write_bytes(_pack_source(parts, self.views_per_image, self.interp_per_image))
            if durable:
                if len(tmps) > 1:
                    with ThreadPoolExecutor(min(16, len(tmps))) as pool:
                        list(pool.map(_fsync_file, [t for t, _ in tmps]))
                else:
                    _fsync_file(tmps[0][0])
            for tmp, p in tmps:
                os.replace(tmp, p)
        finally:
            for tmp, _ in tmps:
                tmp.unlink(missing_ok=True)
        if durable:
            for d in {p.parent for _, p in tmps}:
                _fsync_dir(d)
        if self._staged_shards is not None:
            self._staged_shards.update(self.shard_of(i) for i, _ in files)

    def _seal(self, s: int, durable: bool) -> None:
        """Write shard ``s`` whole into its Zarr arrays (staged sources, else the shard's current
        content), make that durable, then delete its staging files."""
        r = self.shard_range(s)
        sl = slice(r.start, r.stop)
        staged = self._staged_sources(s)
        K, J = self.views_per_image, self.interp_per_image
        parts = {}
        for i, p in staged.items():
            got = _unpack_source(p.read_bytes(), K, J)
            bad = next((x for x in got if isinstance(x, str)), None)
            if bad is not None:
                raise self._corrupt("views" if K else "interp", i, p, bad)
            parts[i] = got
        written = []
        for name, width, lo in (("views", K, 0), ("interp", J, K)):
            if width == 0:
                continue
            rows = np.empty((len(r), width), dtype=object)
            for k, i in enumerate(r):
                rows[k] = parts[i][lo:lo + width] if i in parts else self._encoded(name, i)
            with _quiet():
                self._arrays[name][sl] = rows
            written.append(name)
        meta = {name: np.array(self._read(name, sl, f"shard {s}")) for name in self._used_meta()}
        for i, got in parts.items():
            levels, pa, al = _unpack_meta(got[-1], K, J)
            for name, values in (("noise_level", levels), ("interp_partner", pa), ("interp_alpha", al)):
                if name in meta:
                    meta[name][i - r.start] = values
        for name, values in meta.items():
            self._arrays[name][sl] = values
            written.append(name)
        if durable:
            for name in written:
                _fsync_file(self._chunk_file(name, r.start))
                _fsync_dir(self.path / name)
        for p in staged.values():
            p.unlink(missing_ok=True)
        shutil.rmtree(self.path / STAGING / str(s), ignore_errors=True)
        if durable:
            _fsync_dir(self.path / STAGING)
        if self._staged_shards is not None:
            self._staged_shards.discard(s)

    def _write_shard(self, s: int, views, noise_levels, interp, partners, alphas, done) -> None:
        """Write shard ``s`` whole, without staging or fsync: for `genssl.data.convert_views`, which
        builds a fresh store and makes it durable before renaming it into place. ``views`` / ``interp``:
        object ``[n, K]`` / ``[n, J]`` of encoded images (``b""`` where not done) or None when K (J) = 0;
        the small arrays ``[n, ...]``; ``done`` bool ``[n]``."""
        self._require_writable()
        r = self.shard_range(s)
        sl = slice(r.start, r.stop)
        with _quiet():
            for name, rows in (("views", views), ("interp", interp)):
                if rows is not None:
                    self._arrays[name][sl] = rows
        for name, values in (("noise_level", noise_levels), ("interp_partner", partners), ("interp_alpha", alphas)):
            if values is not None:
                self._arrays[name][sl] = values
        self._arrays["done"][sl] = np.asarray(done, dtype=bool)

    def invalidate(self, indices: Sequence[int]) -> None:
        """Mark sources not done (e.g. after a corruption report) so the next job run regenerates them."""
        self._require_writable()
        for i in indices:
            i = self._check_index(i)
            self._arrays["done"][i] = False
            if self.shard_of(i) in self._done_cache:
                self._done_cache[self.shard_of(i)][i % self.shard_size] = False

    # ------------------------------------------------------------------ verification and repair
    def _used_meta(self) -> list[str]:
        """Small arrays that hold data: with K = 0 (J = 0) the view (interpolation) arrays are never written."""
        return (["noise_level"] if self.views_per_image else []) + (
            ["interp_partner", "interp_alpha"] if self.interp_per_image else [])

    def _chunk_problem(self, name: str, f: Path) -> str | None:
        """Why small-array chunk file ``f`` of ``name`` is damaged (None if whole): its crc32c (the
        check of Zarr's ``Crc32cCodec``, without decoding) and, uncompressed, its size."""
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
        stored, computed = data[-4:], _crc(data[:-4])
        if stored != computed:
            return f"crc32c mismatch (stored {stored.hex()}, computed {computed.hex()})"
        return None

    def _shard_damages(self, name: str, s: int, need: np.ndarray) -> list[Damage]:
        """Damage of shard ``s``'s file of image array ``name`` for the sources in ``need`` (done, not staged)."""
        r = self.shard_range(s)
        f = self._chunk_file(name, r.start)
        if not need.any():
            return []
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            return [Damage(name, f, a, b, "shard file missing, though its sources are marked done")
                    for a, b in _runs(need, r.start)]
        n_inner = self.shard_size // self.sources_per_chunk
        want = 16 * n_inner + 4
        shard = _ShardFile(data[-want:] if len(data) >= want else b"", len(data), n_inner)
        if shard.index is None:
            return [Damage(name, f, r.start, r.stop, shard.problem)]
        G, width = self.sources_per_chunk, self._width(name)
        damages = []
        for c0 in range(r.start, r.stop, G):
            c1 = min(c0 + G, r.stop)
            if not need[c0 - r.start:c1 - r.start].any():
                continue
            got = shard.chunk(lambda n, off: data[off:off + n], self._inner(c0), G * width)
            if isinstance(got, str):
                why = got
            else:  # the images of the sources that need them
                mine = [x for k, x in enumerate(got) if k // width < c1 - c0 and need[c0 - r.start + k // width]]
                why = next((p for p in map(lambda x: _image_problem(self.view_format, x), mine) if p), None)
            if why is not None:
                damages.append(Damage(name, f, c0, c1, why, whole_file=False))
        return damages

    def verify_shard(self, shard_id: int) -> list[Damage]:
        """Every damage of shard ``shard_id``: a staging file with a bad crc32c (or not an image where a
        view should be); a small-array chunk file whose crc32c or size is wrong, or that is missing
        though sources not staged are done; a shard file whose index is damaged, or missing for done
        sources; an inner chunk of a done source that is missing, fails its crc32c or does not hold
        images of the store's format. Reads each file once and decodes no image. A damaged ``done``
        chunk makes every source of the shard damaged (its flags cannot be trusted); missing files
        cannot be judged then, damaged ones still are."""
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
        K, J = self.views_per_image, self.interp_per_image
        staged = self._staged_sources(shard_id)
        for i, p in sorted(staged.items()):
            try:
                got = _unpack_source(p.read_bytes(), K, J)
            except OSError as e:
                got = [f"unreadable ({e.strerror or e})"] * (K + J + 1)
            checks = [x if isinstance(x, str) else _image_problem(self.view_format, x) for x in got[:K + J]]
            checks.append(got[-1] if isinstance(got[-1], str) else None)
            why = next((f"staged: {c}" for c in checks if c), None)
            if why is not None:
                damages.append(Damage("views" if K else "interp", p, i, i + 1, why))
        need = done.copy()  # done and not staged: what the Zarr files must hold
        need[[i - r.start for i in staged]] = False
        for name in self._used_meta():
            f = self._chunk_file(name, r.start)
            if f.exists():
                why = self._chunk_problem(name, f)
            elif need.any():
                why = "chunk file missing, though its sources are marked done"
            else:
                continue
            if why is not None:
                damages.append(Damage(name, f, r.start, r.stop, why))
        for name in _DATA_ARRAYS:
            if self._width(name):
                damages += self._shard_damages(name, shard_id, need)
        return damages

    def repair(self, damages: Sequence[Damage]) -> list[int]:
        """Make the sources of ``damages`` regenerable; returns them, sorted. A damaged ``done`` chunk
        is deleted first (its shard then counts as not done), the other sources' flags are cleared,
        then the files unusable as a whole are deleted, so a crash half-way leaves nothing marked done
        that is not whole. A shard file with a bad inner chunk is kept: its other sources stay
        readable, and sealing the regenerated sources rewrites it."""
        self._require_writable()
        for d in damages:
            if d.array == "done":
                d.chunk.unlink(missing_ok=True)
        sources = sorted({i for d in damages for i in d.sources()})
        lost_flags = {i for d in damages if d.array == "done" for i in d.sources()}
        self.invalidate([i for i in sources if i not in lost_flags])
        for d in damages:
            if d.array != "done" and d.whole_file:
                d.chunk.unlink(missing_ok=True)
        for d in {d.chunk.parent for d in damages}:
            _fsync_dir(d)
        self._staged_shards, self._indices, self._done_cache = None, {}, {}
        return sources


class ViewStoreReader:
    """Read side for the data path: ``len``, ``views(i)`` / ``encoded_views(i)``, ``interp(i)`` /
    ``encoded_interp(i)``, ``is_done(i)``, ``iter_shard(s)``, ``missing()``.

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
        s._staged_shards, s._indices = None, {}
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

    @property
    def view_format(self) -> str:
        return self.store.view_format

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

    def encoded_views(self, i: int) -> list[bytes]:
        return self.store.encoded_views(self._require_done(i))

    def noise_levels(self, i: int) -> np.ndarray:
        return self.store.noise_levels(self._require_done(i))

    def interp(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.store.interp(self._require_done(i))

    def encoded_interp(self, i: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        return self.store.encoded_interp(self._require_done(i))

    def iter_shard(self, shard_id: int) -> Iterator[SourceRecord]:
        """Yield the done sources of one shard, in order."""
        r = self.store.shard_range(shard_id)
        data = self.store.read_range(r.start, r.stop)
        for k, i in enumerate(r):
            if self._done[i]:
                yield SourceRecord(i, data["views"][k], data["noise_level"][k], data["interp"][k],
                                   data["interp_partner"][k], data["interp_alpha"][k])
