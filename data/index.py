"""Dataset index: find, validate once, convert or quarantine, cache.

Why this exists: a single corrupt JPEG fails a whole DALI batch (and with it the run), and DALI's
decoders only promise plain 8-bit RGB/gray JPEG and 8-bit RGB PNG. So every file is fully decoded
once with PIL (strictly: truncated data is an error, a JPEG must end with its EOI marker), odd but
valid images (gray/alpha/palette/CMYK/16-bit PNG, EXIF-rotated, BMP/WebP/TIFF...) are converted once
to an 8-bit RGB JPEG in the cache, and broken files are excluded and listed in ``quarantine.json``.
The result is published in the cache, keyed by the folder, as memory-mapped columns that every rank
opens without parsing (`genssl.data.index_columns`); later calls stat the files and read again only
those whose size or mtime changed. Validation runs in a process pool over this rank's cores; ranks
built together (``rank``/``world_size``/``run_id``: rank 0 finds the files, each rank validates a
slice, rank 0 merges and publishes) coordinate through atomically renamed marker files with a
progress timeout, never ``flock``, so the cache may sit on NFS/Lustre shared by nodes (docs/DATA.md).

Layouts: ImageFolder (class subfolders -> labels by sorted class name), a flat folder (labels -1),
or WebDataset shards (uncompressed ``*.tar`` with ``<key>.jpg|jpeg|png`` and optional ``<key>.cls``).
An ImageFolder val split is labelled with the train split's class list (``classes=``): labels are
class *names*, so a val/ that lacks a class keeps every other label right. WebDataset ``.cls``
integers are used as written.

WebDataset shards are read in place, never extracted. Listing a shard reads only its member
headers (and the small ``.cls`` members): each image member's byte range in the shard (``ranges``:
shard, offset, length) is recorded, validation reads those bytes, and so do the loaders. A member's
``paths[i]`` is ``<folder of the shards>/<shard>.tar/<member>``, like a file's ``<root>/<rel>``: a
name for messages and ``read_errors.json``, not a file; `sample_location` says where its bytes are, and
`read_sample_bytes` reads them. A member's ``file_stats`` are its shard's (size, mtime). A member
DALI cannot decode as is gets a converted copy like a file (its range is then (-1, -1, -1) and
``paths[i]`` the copy). The ``extracted/`` folder of an older cache is deleted by the next build.

Images over ``max_pixels`` (default `MAX_PIXELS`, PIL's decompression-bomb threshold) are quarantined
from their header alone, before anything is decoded.

Symbolic links are followed only while they stay inside the data root (``data_root``, default the
folder; resolved, so the root itself may be a link): a link to a file or folder elsewhere on the
machine is quarantined with its target named, because a dataset someone hands over must not make a
run read (and later train on, generate from, or cache copies of) files outside it. ``external_links=True``
(or ``GENSSL_FOLLOW_EXTERNAL_LINKS=1`` in the environment, which reaches every recipe) follows them. A
folder link back to one of its own parents (a loop) and a folder that cannot be listed are
quarantined too, never walked forever or skipped in silence.

Files that change after indexing. The index records each file's size and mtime (``file_stats``); the
training loaders check them and a cheap header/trailer test before handing bytes to DALI, and skip a
file that was deleted, truncated or replaced (`genssl.data.dali_loader.FileReader`), listing it in
``read_errors.json`` next to ``quarantine.json``. The next ``build_index`` re-validates every changed
file (its size or mtime differ from the cache) and every file listed there (even one whose size and
mtime were restored), quarantines those now broken, and renames the list to ``read_errors.checked.json``.

Fingerprint: sha256 over (relative path, label, sha256 of the file's bytes) of every indexed sample,
plus the class names. Content hashes (not mtimes) so a copied dataset keeps its fingerprint and the
view store still matches it; the hash is computed while the file is read for validation anyway and
cached, so it costs nothing on later calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from genssl.data.index_columns import (BAD, CONVERTED, CONVERTED_SUFFIX, OK, SCHEMA, TOO_LARGE, UPGRADABLE, Generation,
                                       PathColumn, RankFailed, RunDir, atomic_write, current_generation, encode_rel,
                                       prune_runs, write_generation)

log = logging.getLogger("genssl.data")

INDEX_VERSION = SCHEMA  # 3: memory-mapped columns with WebDataset ranges (index_columns.py); 1 was index.json
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png")  # preference order when a key has several
# Shards whose members cannot be read in place: name suffix -> (compression, the command that undoes it)
COMPRESSED_SHARDS = {".tar.gz": ("gzip", "gunzip"), ".tgz": ("gzip", "gunzip"), ".tar.bz2": ("bzip2", "bunzip2"),
                     ".tar.xz": ("xz", "unxz"), ".tar.zst": ("zstd", "unzstd")}
# the first bytes of a file compressed that way (a mis-named .tar)
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
READ_ERRORS_FILE = "read_errors.json"  # files the loaders could not use at read time (FileReader)
RACY_NS = 2_000_000_000  # files modified this close to the last build are re-hashed (like git's racy-clean)
# Largest image (width x height) the index accepts: PIL's default decompression-bomb threshold
# (about 9459 x 9459). A bigger file is quarantined from its header alone, never decoded: a small
# PNG can expand to gigabytes, and no SSL crop needs that many pixels.
MAX_PIXELS = 89_478_485
# Set to 1 to follow symbolic links that leave the data root (build_index(external_links=...) default).
EXTERNAL_LINKS_ENV = "GENSSL_FOLLOW_EXTERNAL_LINKS"


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$GENSSL_CACHE``, else ``~/.cache/genssl``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GENSSL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "genssl"


@dataclass
class DatasetIndex:
    """A validated dataset. Sample ``i`` is ``paths[i]`` (the file to decode: the original, or its
    converted copy in the cache; for a WebDataset member read in place ``<shard>.tar/<member>``
    below the shards' folder, its bytes being ``ranges[i]`` of ``shards[ranges[i, 0]]``: read them
    with `read_sample_bytes`), originally ``source_paths[i]`` (relative to ``root``; for WebDataset
    ``<shard>.tar/<member>``), of ``sizes[i] = (width, height)`` pixels, with ``labels[i]`` (-1 when
    unlabelled) indexing ``classes``. From `build_index` the sequences are memory-mapped and
    read-only (``paths``/``source_paths`` are `PathColumn` s, decoded per access); lists and plain
    arrays work too (`subset`)."""

    root: Path
    paths: Sequence[str]
    source_paths: Sequence[str]
    sizes: np.ndarray  # [N, 2] int32 (width, height) of paths[i]
    labels: np.ndarray  # [N] int32
    classes: list[str]
    fingerprint: str
    quarantine: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    report: Path | None = None  # quarantine.json
    # [N, 2] int64 (bytes, mtime_ns) of the file read for sample i (a member's: its shard's) when indexed; None = unknown
    file_stats: np.ndarray | None = None
    # [N, 3] int64 (shard, offset, length) of a WebDataset member read in place, (-1, -1, -1) for a file;
    # None = every sample is a file (folders)
    ranges: np.ndarray | None = None
    shards: list[str] = field(default_factory=list)  # the shard files that ranges[:, 0] numbers

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: np.ndarray, **changes) -> "DatasetIndex":
        """Samples ``rows`` (in that order) as an index of their own: every per-sample column follows
        ``rows`` (``file_stats`` and ``ranges`` too: the read checks compare each file with its own
        record, and read each member from its own range); ``changes`` replace other fields (e.g.
        ``fingerprint``)."""
        rows = np.asarray(rows, dtype=np.int64)
        stats = None if self.file_stats is None else self.file_stats[rows]
        ranges = None if self.ranges is None else self.ranges[rows]
        return dataclasses.replace(self, paths=[self.paths[i] for i in rows], source_paths=[self.source_paths[i] for i in rows],
                                   sizes=self.sizes[rows], labels=self.labels[rows], file_stats=stats, ranges=ranges,
                                   **changes)


def sample_location(paths: Sequence, ranges: np.ndarray | None, shards: Sequence[str],
                    i: int) -> tuple[str | bytes, int, int]:
    """Where sample ``i``'s encoded image is: ``(file, offset, length)``, length -1 = the whole file
    (``paths[i]``); a WebDataset member read in place is ``length`` bytes at ``offset`` of its shard."""
    if ranges is not None:
        shard, offset, length = (int(v) for v in ranges[i])
        if shard >= 0:
            return shards[shard], offset, length
    return paths[i], 0, -1


def read_sample_bytes(index: DatasetIndex, i: int) -> bytes:
    """The encoded image of sample ``i`` (file or WebDataset member), unchecked: for readers that decode
    with PIL (the torch baseline loader, image-variation embeddings). The DALI loaders read through
    `genssl.data.dali_loader.FileReader`, which checks the bytes first."""
    return _read_bytes(*sample_location(index.paths, index.ranges, index.shards, i))


# ---------------------------------------------------------------------------------------------
# discovery


@dataclass(slots=True)
class _Candidate:
    rel: str  # relative to the layout's base folder (_Found.base), '/'-separated
    path: str  # file on disk (for a WebDataset member: its shard)
    label: int
    shard: int = -1  # a WebDataset member: its shard's number in _Found.shards, its bytes' offset and length
    offset: int = -1
    length: int = -1

    @property
    def span(self) -> tuple[int, ...]:
        """`_read_bytes` arguments after the path: () for a whole file, (offset, length) for a member."""
        return () if self.shard < 0 else (self.offset, self.length)


@dataclass
class _Found:
    kind: str
    candidates: list[_Candidate]
    classes: list[str]
    ignored: Counter  # extension -> count of files that are not images
    base: Path  # the folder candidates' rel are relative to (the root, or a single shard's folder)
    quarantine: list[tuple[str, str]] = field(default_factory=list)  # problems found before decoding
    shards: list[str] = field(default_factory=list)  # WebDataset: shard file names in base
    shard_stats: list[tuple[int, int]] = field(default_factory=list)  # their (bytes, mtime_ns) when listed


def _visible(name: str) -> bool:
    return not name.startswith(".")


@dataclass
class _Guard:
    """What discovery may follow: links that resolve inside ``allowed`` (the data root, resolved), or
    anywhere when ``external``. What it refuses goes to ``quarantine`` as (path relative to ``root``,
    the indexed folder, reason)."""

    root: Path
    allowed: Path
    external: bool
    quarantine: list[tuple[str, str]] = field(default_factory=list)
    _refused: set[str] = field(default_factory=set, repr=False)  # a top-level link is met twice (layout, walk)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def refuses_link(self, path: Path) -> bool:
        """True (quarantined) when ``path``, a symbolic link, resolves outside the data root."""
        target = Path(os.path.realpath(path))
        if self.external or target == self.allowed or self.allowed in target.parents:
            return False
        if self._rel(path) in self._refused:
            return True
        self._refused.add(self._rel(path))
        self.quarantine.append((self._rel(path), (
            f"symbolic link to {target}, outside the data root {self.allowed}: not followed (a dataset must not make "
            f"a run read files elsewhere); copy the files into the data folder, or set {EXTERNAL_LINKS_ENV}=1 to "
            "follow links out of it")))
        return True

    def loop(self, path: Path, target: str) -> None:
        self.quarantine.append((self._rel(path), f"symbolic link to {target}, one of its own parent folders (a loop): "
                                                 "not followed; remove the link"))

    def unreadable(self, path: Path, exc: OSError) -> None:
        self.quarantine.append((self._rel(path), (
            f"folder cannot be listed ({exc.strerror or exc}): its files are left out; make it readable "
            "(chmod -R a+rX) or remove it")))


def _walk_files(top: Path, guard: _Guard | None = None) -> Iterator[str]:
    """Paths (str: a Path per file costs more than the stat) of the files below ``top`` in sorted
    order, hidden names skipped, folder links followed. With a ``guard``, links that leave its root,
    link loops and unlistable folders are quarantined there."""

    def walk(folder: Path, real: str, ancestors: frozenset[str]) -> Iterator[str]:
        try:
            entries = sorted((e for e in os.scandir(folder) if _visible(e.name)), key=lambda e: e.name)
        except OSError as exc:
            if guard is not None:
                guard.unreadable(folder, exc)
            return
        subdirs = []
        for e in entries:
            link = e.is_symlink()
            if link and guard is not None and guard.refuses_link(Path(e.path)):
                continue
            if e.is_dir():  # follows links
                subdirs.append((Path(e.path), os.path.realpath(e.path) if link else os.path.join(real, e.name)))
            else:
                yield e.path
        for path, sub_real in subdirs:
            if sub_real in ancestors:
                if guard is not None:
                    guard.loop(path, sub_real)
                continue
            yield from walk(path, sub_real, ancestors | {sub_real})

    real_top = os.path.realpath(top)
    # a class folder's walk starts below the indexed folder, which is its ancestor too
    ancestors = frozenset([real_top] + ([os.path.realpath(guard.root)] if guard is not None else []))
    yield from walk(top, real_top, ancestors)


def _suffix(path: str | Path) -> str:
    return os.path.splitext(path)[1].lower()


def _is_image(path: str | Path) -> bool:
    return _suffix(path) in IMAGE_EXTS


def _discover(root: Path, guard: _Guard) -> _Found:
    if root.is_file():
        if root.name.lower().endswith(tuple(COMPRESSED_SHARDS)):
            raise ValueError(_compressed_shards_message(root.parent, [root.name]))
        if root.suffix.lower() != ".tar":
            raise ValueError(f"{root} is a file; pass a folder of images (ImageFolder or flat) or a WebDataset .tar shard")
        return _discover_webdataset(root.parent, [root])
    try:
        listing = list(os.scandir(root))
    except OSError as exc:
        raise ValueError(f"dataset folder {root} cannot be listed ({exc.strerror or exc}); make it readable by this "
                         "user (chmod -R a+rX), or pass another data=") from None
    entries = sorted((e for e in listing if _visible(e.name) and not (e.is_symlink() and guard.refuses_link(Path(e.path)))),
                     key=lambda e: e.name)
    top_images = [Path(e.path) for e in entries if e.is_file() and _is_image(Path(e.name))]
    shards = [Path(e.path) for e in entries if e.is_file() and e.name.lower().endswith(".tar")]
    packed = [e.name for e in entries if e.is_file() and e.name.lower().endswith(tuple(COMPRESSED_SHARDS))]
    subdirs = [Path(e.path) for e in entries if e.is_dir()]
    ignored: Counter = Counter()
    if not top_images and not subdirs and packed:  # never leave part of the shards out in silence
        raise ValueError(_compressed_shards_message(root, packed))
    if not top_images and not subdirs and shards:
        found = _discover_webdataset(root, shards)
        return dataclasses.replace(found, quarantine=guard.quarantine + found.quarantine)
    cut = len(os.path.join(root, ""))  # the walk's paths start with the root and a separator
    if top_images:  # flat folder (recursive), unlabelled
        cands = []
        for p in _walk_files(root, guard):
            if _is_image(p):
                cands.append(_Candidate(p[cut:], p, -1))
            else:
                ignored[_suffix(p) or "(no extension)"] += 1
        return _Found("flat", cands, [], ignored, root, guard.quarantine)
    classes, cands = [], []
    for d in subdirs:
        files = list(_walk_files(d, guard))
        imgs = [p for p in files if _is_image(p)]
        for p in files:
            if not _is_image(p):
                ignored[_suffix(p) or "(no extension)"] += 1
        if imgs:
            label = len(classes)
            classes.append(d.name)
            cands += [_Candidate(p[cut:], p, label) for p in imgs]
    for e in entries:
        if e.is_file():
            ignored[Path(e.name).suffix.lower() or "(no extension)"] += 1
    return _Found("imagefolder", cands, classes, ignored, root, guard.quarantine)


_SAFE_MEMBER = re.compile(r"^[^/\\][^\\]*$")


def _split_key(member: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    head, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _compressed_shards_message(folder: Path, names: list[str]) -> str:
    tools = sorted({tool for name in names for suffix, (_, tool) in COMPRESSED_SHARDS.items()
                    if name.lower().endswith(suffix)})
    shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
    return (f"WebDataset shards in {folder} are compressed ({shown}): genssl reads each image in place from its "
            f"shard, which needs uncompressed .tar shards (what WebDataset's writers produce by default). "
            f"Decompress them ({' / '.join(tools)}: x.tar.gz becomes x.tar) and remove the compressed files")


@dataclass
class _Shard:
    """One shard's listing: image and ``.cls`` member headers grouped by key (no image byte read), the
    ``.cls`` contents, the shard's (bytes, mtime_ns) as listed, and problems (quarantine entries)."""

    members: dict[str, dict[str, tarfile.TarInfo]] = field(default_factory=dict)
    labels: dict[str, bytes] = field(default_factory=dict)
    stat: tuple[int, int] = (-1, -1)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _list_shard(shard: Path) -> _Shard:
    """Walk a shard's member headers (tarfile seeks over the data); read only the small ``.cls`` members.

    A member whose data runs past the end of the file, or any tar error, ends the listing: the shard
    is reported as truncated and the members before the damage are kept. A compressed shard is
    reported with the command that makes it readable in place."""
    out = _Shard()
    keep = set(WDS_IMAGE_EXTS) | {e[1:] for e in IMAGE_EXTS}
    try:
        with open(shard, "rb") as f:
            st = os.fstat(f.fileno())
            out.stat = (st.st_size, st.st_mtime_ns)
            try:
                tf = tarfile.open(fileobj=f, mode="r:")
            except tarfile.ReadError:
                f.seek(0)
                head = f.read(8)
                packed = next((name for magic, name in COMPRESSION_MAGIC.items() if head.startswith(magic)), None)
                if packed is None:
                    raise
                tool = next(t for c, t in COMPRESSED_SHARDS.values() if c == packed)
                out.problems.append((shard.name, f"{packed}-compressed, although named .tar: its images cannot be read "
                                                 f"in place; decompress it ({tool}) into a plain .tar shard"))
                return out
            with tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    if not _SAFE_MEMBER.match(m.name) or ".." in m.name.split("/"):
                        out.problems.append((f"{shard.name}/{m.name}", "unsafe member path (absolute or '..'), skipped"))
                        continue
                    if m.offset_data + m.size > out.stat[0]:
                        out.problems.append((shard.name, (
                            f"shard unreadable past some point (truncated: member {m.name} ends at byte "
                            f"{m.offset_data + m.size}, the file at {out.stat[0]}); members before it kept")))
                        break
                    if not _visible(m.name.rpartition("/")[2]):
                        continue  # as a folder walk, and DALI's WebDataset reader, skip hidden names
                    key, ext = _split_key(m.name)
                    if ext == "cls":
                        src = tf.extractfile(m)
                        assert src is not None
                        out.labels[key] = src.read()
                    elif ext in keep:
                        out.members.setdefault(key, {})[ext] = m
    except (tarfile.TarError, EOFError, OSError) as exc:
        out.problems.append((shard.name, f"shard unreadable past some point ({type(exc).__name__}: {exc}); members before it kept"))
    return out


def _discover_webdataset(base: Path, shards: list[Path]) -> _Found:
    """Every image member of ``shards`` (files in ``base``) as a candidate read in place: its shard, offset and length."""
    cands: list[_Candidate] = []
    problems: list[tuple[str, str]] = []
    stats: list[tuple[int, int]] = []
    labelled = False
    for number, shard in enumerate(shards):
        listing = _list_shard(shard)
        problems += listing.problems
        stats.append(listing.stat)
        for key in sorted(set(listing.members) | set(listing.labels)):
            group = listing.members.get(key, {})
            exts = [e for e in WDS_IMAGE_EXTS if e in group] + sorted(e for e in group if e not in WDS_IMAGE_EXTS)
            if not exts:
                problems.append((f"{shard.name}/{key}", "no image member (.jpg/.jpeg/.png) for this key"))
                continue
            label = -1
            if key in listing.labels:
                try:
                    label = int(listing.labels[key].decode().strip())
                    labelled = True
                except ValueError:
                    problems.append((f"{shard.name}/{key}.cls", "label is not an integer"))
                    continue
            m = group[exts[0]]
            cands.append(_Candidate(f"{shard.name}/{key}.{exts[0]}", str(shard), label, number, m.offset_data, m.size))
    if any(c.label < -1 for c in cands):
        raise ValueError(f"WebDataset shards in {base} have negative .cls labels; labels must be 0..K-1")
    n_classes = max((c.label for c in cands), default=-1) + 1
    classes = [str(i) for i in range(n_classes)] if labelled else []
    return _Found("webdataset", cands, classes, Counter(), base, problems, [s.name for s in shards], stats)


# ---------------------------------------------------------------------------------------------
# validation


def _read_bytes(path: str, offset: int = 0, length: int = -1) -> bytes:
    """A file's bytes, or the ``length`` bytes at ``offset`` of it (a WebDataset member in its shard):
    the one place this module reads an image, for validation and `read_sample_bytes` (tests count the
    calls; validation reads a whole file with the path alone, ``_read_bytes(c.path, *c.span)``). A
    range past the end of the file is an OSError."""
    with open(path, "rb") as f:
        if length < 0:
            return f.read()
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path} ends inside the member at bytes {offset}..{offset + length} (truncated since it was listed)")
    return data


def _jpeg_has_eoi(data: bytes) -> bool:
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def _png_is_rgb8(data: bytes) -> bool:
    # IHDR is the first chunk: bytes 24 = bit depth, 25 = colour type (2 = truecolour), 28 = interlace
    return len(data) > 28 and data[24] == 8 and data[25] == 2


def _orientation(img: Image.Image) -> int:
    with contextlib.suppress(Exception):
        return int(img.getexif().get(0x0112, 1) or 1)
    return 1


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. Alpha is composited over white (transparent regions of icons
    and cut-outs are usually meant as background; PIL's plain convert would expose whatever colour
    the transparent pixels happen to store). 16/32-bit and float grays are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        peak = float(a.max()) if a.size else 0.0
        scale = 255.0 / 65535.0 if peak > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _too_large_reason(w: int, h: int, max_pixels: int) -> str:
    return (f"image of {w} x {h} pixels exceeds the limit of {max_pixels:,} pixels (decompression-bomb guard); "
            "downscale it, or raise the limit (build_index(max_pixels=...), default genssl.data.index.MAX_PIXELS)")


def _inspect(path: str, converted: str, max_pixels: int, member: Sequence[int] = ()) -> dict:
    """Read, hash and strictly decode one file, or one WebDataset member (``member`` = its offset,
    length, and its shard's bytes and mtime_ns when listed); convert it into ``converted`` when DALI
    would not read it as is. Returns the cache entry (``status`` ok | converted | bad). An image over
    ``max_pixels`` is rejected from its header (``too_large``, with its size), before decoding."""
    st = os.stat(path)
    entry: dict = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if member:
        # the entry keeps the shard's stat of the listing that gave the offset: a shard rewritten since
        # no longer matches it, so the next build lists it again instead of trusting stale offsets
        entry = {"size": member[2], "mtime_ns": member[3]}
        if (st.st_size, st.st_mtime_ns) != tuple(member[2:]):
            return entry | {"status": "bad", "reason": "its shard changed while the index was built; build it again",
                            "sha256": ""}
    try:
        data = _read_bytes(path, *member[:2])
    except OSError as exc:
        return entry | {"status": "bad", "reason": f"unreadable: {exc}", "sha256": ""}
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        return entry | {"status": "bad", "reason": "empty file (0 bytes)"}
    fmt = ""
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or ""
        if img.width * img.height > max_pixels:
            return entry | {"status": "bad", "reason": _too_large_reason(img.width, img.height, max_pixels),
                            "w": img.width, "h": img.height, "too_large": True}
        img.load()
    except UnidentifiedImageError:
        return entry | {"status": "bad", "reason": "not an image (PIL cannot identify the format)"}
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        return entry | {"status": "bad", "reason": f"undecodable or truncated {fmt or 'image'}: {exc}"}
    if fmt == "JPEG" and not _jpeg_has_eoi(data):
        return entry | {"status": "bad", "reason": "truncated JPEG (no end-of-image marker)"}
    orientation = _orientation(img)
    plain = (fmt == "JPEG" and img.mode in ("RGB", "L")) or (fmt == "PNG" and img.mode == "RGB" and _png_is_rgb8(data)
                                                             and "transparency" not in img.info)
    if plain and orientation == 1:
        return entry | {"status": "ok", "w": img.width, "h": img.height}
    why = f"{fmt} {img.mode}" + (f", EXIF orientation {orientation}" if orientation != 1 else "")
    try:
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb8(img)
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=95, subsampling=0)
    except (OSError, ValueError, TypeError) as exc:
        return entry | {"status": "bad", "reason": f"could not convert {why} to RGB: {exc}"}
    atomic_write(Path(converted), buf.getvalue(), fsync=False)
    return entry | {"status": "converted", "reason": f"converted from {why}", "w": rgb.width, "h": rgb.height}


def _inspect_strict(path: str, converted: str, max_pixels: int, member: Sequence[int] = ()) -> dict:
    """`_inspect` with PIL's truncated-image leniency forced off and PIL's own size check off (both
    process-wide flags): `_inspect` applies ``max_pixels`` itself, so the limit is ours alone and a
    rejected file gets its size in the reason (PIL's check only warns, or raises before the size is known)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = None
    return _inspect(path, converted, max_pixels, member)


# ---------------------------------------------------------------------------------------------
# validation over cores: a process pool (decoding holds the GIL for much of its time)

POOL_MIN_FILES = 64  # fewer files than this are validated in this process (a pool costs ~1 s to start)


def _inspect_chunk(args: list[tuple]) -> list[dict]:
    lenient, pil_limit = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    try:
        return [_inspect_strict(*a) for a in args]
    finally:  # PIL's flags are process-wide: give them back
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = lenient, pil_limit


def default_workers() -> int:
    """This process's share of the cores it may run on: ranks of one node split them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, min(cpus // max(1, per_node), 16))


def _validate(args: list[tuple], num_workers: int | None) -> list[dict]:
    workers = max(1, num_workers if num_workers is not None else default_workers())
    if workers == 1 or len(args) < POOL_MIN_FILES:
        return _inspect_chunk(args)
    chunk = max(8, min(256, len(args) // (workers * 8)))  # big enough to amortise IPC, small enough to balance
    # spawn, not fork: the caller may hold CUDA, NCCL or DALI threads, which a forked child inherits broken
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return [r for part in pool.map(_inspect_chunk, [args[i:i + chunk] for i in range(0, len(args), chunk)])
                    for r in part]
    except BrokenProcessPool as exc:
        # typically a script without `if __name__ == "__main__":`, which every spawned process runs again
        log.warning("genssl.data: the validation processes failed to start (%s); validating %d files in this "
                    "process instead. From a script, call build_index under `if __name__ == \"__main__\":`",
                    exc, len(args))
        return _inspect_chunk(args)


# ---------------------------------------------------------------------------------------------
# what the last build knew


def index_cache_dir(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``build_index`` keeps the index, report and converted copies."""
    root = Path(folder).expanduser().resolve()
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(root.parts[-2:]))[-60:]
    return default_cache_dir(cache_dir) / "index" / f"{slug}-{key}"


_STATUS_NAME = {OK: "ok", CONVERTED: "converted", BAD: "bad", TOO_LARGE: "bad"}


class _Previous:
    """What the last build knew: its generation (``gen``, columns read in bulk), or once the entries
    of a schema-1 ``index.json`` being converted (``entries``: relative path -> dict). `get` gives
    one file's entry as a dict (``status`` ok | converted | bad, ``size``, ``mtime_ns``, ``sha256``,
    ``w``/``h``, ``reason``, ``too_large``) for the few files that are not reused in bulk."""

    def __init__(self, work: Path, root: Path) -> None:
        self.gen: Generation | None = None
        self.entries: dict[str, dict] = {}
        self.rows: dict[str, int] = {}
        self.built_ns, self.legacy = 0, None
        name = current_generation(work, (SCHEMA, *UPGRADABLE))
        if name is not None:
            with contextlib.suppress(OSError, ValueError, KeyError, AssertionError):
                gen = Generation(work / name, (SCHEMA, *UPGRADABLE))
                if gen.schema != SCHEMA and gen.header.get("kind") == "webdataset":
                    # its rows describe copies extracted into the cache: every member is validated again
                    log.warning("genssl.data: WebDataset shards are now read in place; validating the members of "
                                "%s again once (the extracted copies in %s are deleted)", root, work / "extracted")
                elif gen.header.get("root") == str(root):
                    if gen.schema != SCHEMA:
                        log.warning("genssl.data: upgrading the index of %s to schema %d once; unchanged files are "
                                    "not read again", root, SCHEMA)
                    self.gen, self.built_ns = gen, int(gen.header["built_ns"])
                    self.rows = {rel: i for i, rel in enumerate(gen.rel_list())}
            return
        legacy = work / "index.json"
        if legacy.exists():
            self.legacy = legacy
            try:
                doc = json.loads(legacy.read_text())
                assert doc.get("version") == 1 and doc.get("root") == str(root)
                self.entries, self.built_ns = dict(doc["entries"]), int(doc["built_ns"])
                log.warning("genssl.data: converting the JSON index %s (schema 1) to the memory-mapped format "
                            "once; unchanged files are not read again", legacy)
            except (OSError, ValueError, KeyError, TypeError, AssertionError):
                log.warning("genssl.data: the old index %s cannot be read; rebuilding %s from scratch", legacy, root)

    def get(self, rel: str) -> dict | None:
        if self.gen is None:
            return self.entries.get(rel)
        i = self.rows.get(rel)
        if i is None:
            return None
        g, status = self.gen, int(self.gen["status"][i])
        (size, mtime), (w, h), sha = g["src_stats"][i].tolist(), g["sizes"][i].tolist(), g["sha256"][i].tobytes()
        e = {"status": _STATUS_NAME[status], "size": size, "mtime_ns": mtime, "sha256": sha.hex() if any(sha) else ""}
        if w >= 0:
            e |= {"w": w, "h": h}
        if status in (BAD, TOO_LARGE):
            e |= {"reason": self.reason(i), "too_large": status == TOO_LARGE}
        return e

    def reason(self, row: int) -> str:
        return self.gen.header["reasons"][row - self.gen.n_ok]

    def trusted(self, rels: list[str], size: np.ndarray, mtime: np.ndarray, max_pixels: int) -> np.ndarray:
        """Per file (int64 [n]): the previous row to reuse as is, or -1 — the file's size and mtime are
        as recorded, its mtime older than the last build by `RACY_NS`, and its pixel count on the same
        side of ``max_pixels`` (`_reusable` and `_limit_changed`, vectorised: one pass over N)."""
        row = np.fromiter((self.rows.get(r, -1) for r in rels), dtype=np.int64, count=len(rels))
        if self.gen is None or not len(rels):
            return np.full(len(rels), -1, np.int64)
        g, at = self.gen, np.maximum(row, 0)
        src, wh, status = np.asarray(g["src_stats"])[at], np.asarray(g["sizes"])[at].astype(np.int64), np.asarray(g["status"])[at]
        over = (wh[:, 0] >= 0) & (wh[:, 0] * wh[:, 1] > max_pixels)
        ok = ((row >= 0) & (src[:, 0] == size) & (src[:, 1] == mtime) & (mtime < self.built_ns - RACY_NS)
              & (over == (status == TOO_LARGE)))
        return np.where(ok, row, -1)


def _reusable(old: dict | None, size: int, mtime_ns: int, c: _Candidate, converted: Path, built_ns: int) -> dict | None:
    """The cached entry if the file (or member) is unchanged, else None. Files modified within RACY_NS
    of the last build could have changed without a visible mtime change, so their bytes are re-hashed;
    so are the members of a shard whose mtime changed but not its size (each member on its own)."""
    if not old or old.get("status") == "converted" and not converted.exists():
        return None
    if old["size"] != size:
        return None
    if old["mtime_ns"] == mtime_ns and mtime_ns < built_ns - RACY_NS:
        return old
    with contextlib.suppress(OSError):
        if hashlib.sha256(_read_bytes(c.path, *c.span)).hexdigest() == old["sha256"]:
            return old | {"mtime_ns": mtime_ns}
    return None


def _limit_changed(entry: dict, max_pixels: int) -> bool:
    """True when a cached entry was judged against another pixel limit than ``max_pixels`` would give
    (accepted but now too large, or rejected as too large but now within it): it is inspected again."""
    over = "w" in entry and entry["w"] * entry["h"] > max_pixels
    return over != entry.get("too_large", False)


def _fingerprint(classes: list[str], rows) -> str:
    h = hashlib.sha256(json.dumps(classes).encode())
    for rel, label, sha in rows:
        h.update(f"{rel}\0{label}\0{sha}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# one build: plan (rank 0), validate (every rank, a slice each), merge and publish (rank 0)


@dataclass
class _Plan:
    found: _Found
    cands: list[_Candidate]  # every file found, sorted by relative path
    reuse: np.ndarray  # [n] int64: the previous generation's row reused as is, or -1 (see entries)
    entries: dict[str, dict]  # relative path -> entry for the rest: validated now, re-hashed, unstat-able, schema 1
    todo: list[_Candidate]  # files to validate
    previous: _Previous
    newest_ns: int  # newest mtime among reused entries (racy-clean restamp)
    failed_reads: set[str]


def _converted(work: Path, rel: str) -> Path:
    return work / "converted" / (rel + CONVERTED_SUFFIX)


def _plan(root: Path, work: Path, guard: _Guard, max_pixels: int) -> _Plan:
    previous = _Previous(work, root)
    found = _discover(root, guard)
    cands = sorted(found.candidates, key=lambda c: c.rel)
    entries: dict[str, dict] = {}
    stats = []
    for c in cands:
        if c.shard >= 0:  # a member: its shard's stat, taken when its offsets were listed
            stats.append(found.shard_stats[c.shard])
            continue
        try:
            st = os.stat(c.path)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError as exc:
            entries[c.rel] = {"status": "bad", "reason": f"cannot stat: {exc}", "size": -1, "mtime_ns": -1, "sha256": ""}
            stats.append((-1, -1))
    stat = np.array(stats, np.int64).reshape(-1, 2)
    rels = [c.rel for c in cands]
    reuse = previous.trusted(rels, stat[:, 0], stat[:, 1], max_pixels)
    failed_reads = _failed_reads(work / READ_ERRORS_FILE)
    prefix = f"{found.base}/"  # + rel: the sample's paths[i] (open_index), as FileReader reports it

    def listed(c: _Candidate) -> bool:
        return bool(failed_reads) and (prefix + c.rel in failed_reads or str(_converted(work, c.rel)) in failed_reads)

    if previous.gen is not None:  # a converted entry needs its copy; a file training could not read is redone
        status = np.asarray(previous.gen["status"])
        for i in np.flatnonzero(reuse >= 0):
            c = cands[i]
            if status[reuse[i]] == CONVERTED and not _converted(work, c.rel).exists() or listed(c):
                reuse[i] = -1
    todo: list[_Candidate] = []
    newest_ns = int(stat[reuse >= 0, 1].max()) if (reuse >= 0).any() else 0
    for i in np.flatnonzero(reuse < 0):
        c, (size, mtime) = cands[i], stat[i].tolist()
        if c.rel in entries:  # cannot stat
            continue
        conv = _converted(work, c.rel)
        hit = None if listed(c) else _reusable(previous.get(c.rel), size, mtime, c, conv, previous.built_ns)
        if hit is not None and not _limit_changed(hit, max_pixels):
            entries[c.rel] = hit
            newest_ns = max(newest_ns, mtime)
        else:
            todo.append(c)
    return _Plan(found, cands, reuse, entries, todo, previous, newest_ns, failed_reads)


def _columns(plan: _Plan, work: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every file found as the rows of one generation (usable first, each part sorted by path) and
    its header (fingerprint left to `_publish`). Reused rows are copied from the previous columns
    in bulk; only the others are filled one by one."""
    cands, reuse, n = plan.cands, plan.reuse, len(plan.cands)
    status = np.empty(n, np.uint8)
    sizes, src = np.full((n, 2), -1, np.int32), np.empty((n, 2), np.int64)
    sha = np.zeros((n, 32), np.uint8)
    reasons: dict[int, str] = {}
    kept = np.flatnonzero(reuse >= 0)
    if len(kept):
        g, rows = plan.previous.gen, reuse[kept]
        status[kept], sizes[kept] = np.asarray(g["status"])[rows], np.asarray(g["sizes"])[rows]
        src[kept], sha[kept] = np.asarray(g["src_stats"])[rows], np.asarray(g["sha256"])[rows]
        for i, r in zip(kept.tolist(), rows.tolist()):
            if r >= g.n_ok:
                reasons[i] = plan.previous.reason(r)
    for i in np.flatnonzero(reuse < 0).tolist():
        e = plan.entries[cands[i].rel]
        code = {"ok": OK, "converted": CONVERTED}.get(e["status"], TOO_LARGE if e.get("too_large") else BAD)
        status[i], src[i] = code, (e["size"], e["mtime_ns"])
        if "w" in e:
            sizes[i] = (e["w"], e["h"])
        if e["sha256"]:
            sha[i] = np.frombuffer(bytes.fromhex(e["sha256"]), np.uint8)
        if code in (BAD, TOO_LARGE):
            reasons[i] = e["reason"]
    read = src.copy()
    for i in np.flatnonzero(status == CONVERTED).tolist():  # the loaders read the copy
        read[i] = _file_stat(_converted(work, cands[i].rel))
    order = np.argsort((status == BAD) | (status == TOO_LARGE), kind="stable")
    rows = [cands[i] for i in order.tolist()]
    n_ok = n - len(reasons)
    rel, offsets = encode_rel([c.rel for c in rows])
    columns = {"rel": rel, "rel_offsets": offsets, "status": status[order],
               "labels": np.fromiter((c.label for c in rows), np.int32, count=n),
               "sizes": sizes[order], "src_stats": src[order], "read_stats": read[order], "sha256": sha[order]}
    found = plan.found
    if found.kind == "webdataset":  # where each member's bytes are (from this listing, never an older one)
        ranges = np.array([(c.shard, c.offset, c.length) for c in rows], np.int64).reshape(n, 3)
        ranges[columns["status"] == CONVERTED] = -1  # the loaders read the copy
        columns["ranges"] = ranges
    header = {"root": "", "kind": found.kind, "base": str(found.base), "shards": found.shards, "classes": found.classes,
              "n": n, "n_ok": n_ok, "pre_quarantine": [list(q) for q in found.quarantine],
              "reasons": [reasons[i] for i in order[n_ok:].tolist()], "ignored": dict(found.ignored.most_common(5))}
    return columns, header


def _same(previous: _Previous, columns: dict[str, np.ndarray], header: dict) -> bool:
    g = previous.gen
    if g is None:
        return False
    keys = ("root", "kind", "base", "shards", "classes", "n", "n_ok", "pre_quarantine", "reasons")
    old_columns = g.columns | ({} if g.ranges is None else {"ranges": g.ranges})
    return (g.schema == SCHEMA and all(g.header.get(k) == header[k] for k in keys) and set(old_columns) == set(columns)
            and all(np.array_equal(np.asarray(old_columns[k]), v) for k, v in columns.items()))


def _publish(root: Path, work: Path, plan: _Plan) -> str:
    """Write a new generation when something changed (else keep the current one); returns its name."""
    columns, header = _columns(plan, work)
    header["root"] = str(root)
    prev = plan.previous
    # entries verified by re-hashing (racy mtimes) become trusted once old enough: restamp the build time
    settled = plan.newest_ns >= prev.built_ns - RACY_NS and plan.newest_ns < time.time_ns() - RACY_NS
    report_path = work / "quarantine.json"
    same = _same(prev, columns, header)
    if same and not settled and report_path.exists():
        name = prev.gen.folder.name
    else:
        n_ok, paths = header["n_ok"], PathColumn(columns["rel"], columns["rel_offsets"])
        header["fingerprint"] = prev.gen.header["fingerprint"] if same else _fingerprint(header["classes"], (
            (rel, label, digest.tobytes().hex()) for rel, label, digest in
            zip(paths[:n_ok], columns["labels"][:n_ok].tolist(), columns["sha256"][:n_ok])))
        name = write_generation(work, columns, header | {"built_ns": time.time_ns()})
        bad = [tuple(q) for q in plan.found.quarantine] + list(zip(paths[n_ok:], header["reasons"]))
        report = {"root": str(root), "count": len(bad), "files": [{"path": p, "reason": r} for p, r in bad]}
        atomic_write(report_path, json.dumps(report, indent=1).encode())
        if prev.legacy is not None:  # converted: the JSON index is no longer read
            for old in (prev.legacy, work / ".lock"):
                old.unlink(missing_ok=True)
        # shards were extracted here before they were read in place (schema 2): nothing reads the copies now
        shutil.rmtree(work / "extracted", ignore_errors=True)
    if plan.failed_reads:  # every file listed there was validated again
        log.warning("genssl.data: re-validated %d file(s) that could not be read during training (%s)",
                    len(plan.failed_reads), work / READ_ERRORS_FILE)
        with contextlib.suppress(OSError):
            os.replace(work / READ_ERRORS_FILE, work / "read_errors.checked.json")
    n_bad = len(header["pre_quarantine"]) + len(header["reasons"])
    if n_bad:
        log.warning("genssl.data: quarantined %d of %d files in %s (excluded); reasons in %s",
                    n_bad, header["n"], root, report_path)
    return name


def _todo(plan: _Plan) -> dict[str, list]:
    """What is left to validate, as JSON (``todo.json`` for the other ranks): per file its relative
    path, the file to read, and for a WebDataset member (offset, length, shard bytes, shard mtime_ns)."""
    stats = plan.found.shard_stats
    return {"rels": [c.rel for c in plan.todo], "paths": [c.path for c in plan.todo],
            "members": [[*c.span, *stats[c.shard]] if c.shard >= 0 else [] for c in plan.todo]}


def _todo_args(work: Path, todo: dict[str, list], lo: int, hi: int, max_pixels: int) -> list[tuple]:
    """`_inspect` arguments of entries ``lo:hi`` of `_todo`."""
    return [(p, str(_converted(work, rel)), max_pixels, member)
            for rel, p, member in zip(todo["rels"][lo:hi], todo["paths"][lo:hi], todo["members"][lo:hi])]


def _build_alone(root: Path, work: Path, guard: _Guard, max_pixels: int, num_workers: int | None) -> str:
    plan = _plan(root, work, guard, max_pixels)
    todo = _todo(plan)
    for rel, result in zip(todo["rels"], _validate(_todo_args(work, todo, 0, len(plan.todo), max_pixels), num_workers)):
        plan.entries[rel] = result
    return _publish(root, work, plan)


def _build_together(root: Path, work: Path, guard: _Guard, max_pixels: int, num_workers: int | None,
                    rank: int, world_size: int, run_id: str, timeout_s: float | None) -> str:
    """Rank 0 finds the files and what changed, every rank validates a slice of that, rank 0 merges
    and publishes; the others wait for its ``done`` marker (index_columns.RunDir)."""
    run = RunDir(work / "runs" / run_id, rank, world_size, timeout_s, str(root))
    others = list(range(1, world_size))
    with run.heartbeat():
        try:
            if rank == 0:
                prune_runs(work / "runs")
                plan = _plan(root, work, guard, max_pixels)
                todo = _todo(plan)
                run.publish("todo.json", todo)
            else:
                todo = run.wait("todo.json", [0], "find the files of")
            n = len(todo["rels"])
            lo, hi = rank * n // world_size, (rank + 1) * n // world_size
            mine = _validate(_todo_args(work, todo, lo, hi, max_pixels), num_workers)
            if rank != 0:
                run.publish(f"part-{rank}.json", mine)
                return run.wait("done.json", [0], "merge")["generation"]
            results = mine
            for r in others:
                results += run.wait(f"part-{r}.json", [r], "validate its slice of")
            plan.entries.update(zip(todo["rels"], results))
            name = _publish(root, work, plan)
            run.publish("done.json", {"generation": name})
            for big in ["todo.json"] + [f"part-{r}.json" for r in others]:  # read by now; the markers stay
                (run.folder / big).unlink(missing_ok=True)
            return name
        except RankFailed:  # another rank's failure: it has told everyone already
            raise
        except BaseException as exc:  # tell the others now rather than let them time out
            run.fail(f"{type(exc).__name__}: {exc}")
            raise


# ---------------------------------------------------------------------------------------------
# opening a generation: what every rank does, without parsing


def open_index(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None, classes: list[str] | None = None,
               generation: str | None = None) -> DatasetIndex:
    """The published index of ``root`` (memory-mapped). ``classes``: label an ImageFolder by class
    name -> position in ``classes`` (`build_index`). Raises ValueError when nothing usable is there."""
    root = Path(root).expanduser().resolve()
    work = index_cache_dir(root, cache_dir)
    name = generation or current_generation(work)
    if name is None:
        raise ValueError(f"no dataset index of {root} in {work}; build it with build_index({str(root)!r})")
    g = Generation(work / name)
    h, n_ok = g.header, g.n_ok
    report = work / "quarantine.json"
    rel, offsets = g["rel"], g["rel_offsets"]
    quarantine = [tuple(q) for q in h["pre_quarantine"]] + list(zip(PathColumn(rel, offsets)[n_ok:], h["reasons"]))
    if n_ok == 0:
        other = ", ".join(f"{k} {ext}" for ext, k in h["ignored"].items()) or "none"
        raise ValueError(
            f"no usable images in {root} (layout: {h['kind']}): {h['n']} image files found, "
            f"{len(quarantine)} quarantined (see {report}); other files: {other}. Expected class "
            f"subfolders of .jpg/.png (ImageFolder), a flat folder of images, or WebDataset .tar shards.")
    labels, own = g["labels"][:n_ok], list(h["classes"])
    names, fingerprint = own, h["fingerprint"]
    if classes is not None and h["kind"] == "imagefolder":
        names = list(classes)
        labels = _label_by_name(own, names, root)[labels]
        if names != own:  # the fingerprint covers the labels and class names
            sha = g["sha256"]
            fingerprint = _fingerprint(names, ((r, int(y), sha[i].tobytes().hex()) for i, (r, y) in
                                               enumerate(zip(PathColumn(rel, offsets, n_ok), labels))))
    base = h.get("base", str(root))  # bench/scale.py's listing index names no base: the root
    return DatasetIndex(
        root=root, paths=PathColumn(rel, offsets, n_ok, base + "/", g["status"], str(work / "converted") + "/", g.folder),
        source_paths=PathColumn(rel, offsets, n_ok, folder=g.folder), sizes=g["sizes"][:n_ok], labels=labels,
        classes=names, fingerprint=fingerprint, quarantine=quarantine, report=report,
        file_stats=g["read_stats"][:n_ok], ranges=None if g.ranges is None else g.ranges[:n_ok],
        shards=[os.path.join(base, name) for name in h.get("shards", [])])


def _label_by_name(own: list[str], classes: list[str], root: Path) -> np.ndarray:
    """The map (int32 [len(own)]) from an ImageFolder split's own class positions to positions in
    another split's class list (val labelled with train's): a sample's label is its class folder's
    *name*'s position in ``classes``, so a val/ lacking a class keeps every other label right. A
    class that ``classes`` lacks cannot be scored and is an error; a class of ``classes`` absent here is fine."""
    position = {name: i for i, name in enumerate(classes)}
    assert len(position) == len(classes), f"duplicate class names in {classes}"
    unknown = [name for name in own if name not in position]
    if unknown:
        shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
        raise ValueError(
            f"{root} has class folder(s) {unknown} that the train split does not have (train classes: "
            f"{shown or 'none'}); val labels are looked up by class name in train's classes, so every val "
            f"class folder must also be a train class folder: rename or remove {unknown} in {root}, or add "
            "them to train/")
    return np.array([position[name] for name in own], dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# public entry point


def build_index(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                num_workers: int | None = None, classes: list[str] | None = None,
                max_pixels: int = MAX_PIXELS, external_links: bool | None = None,
                data_root: str | os.PathLike | None = None, *, rank: int = 0, world_size: int = 1,
                run_id: str | None = None, timeout_s: float | None = None) -> DatasetIndex:
    """Validate ``folder`` (once; later calls re-read only changed files) and return its index.

    ``num_workers`` processes decode in parallel; default: this process's share of the cores
    (`default_workers`). ``classes`` (a val split: the train index's ``classes``) labels an
    ImageFolder by class name -> position in ``classes`` instead of by its own folders, and becomes
    the index's ``classes``; a class folder not in ``classes`` is a ValueError. Images over
    ``max_pixels`` pixels are quarantined without being decoded. Quarantined files are summarised
    in one warning and listed in ``<index cache>/quarantine.json``. Symbolic links are followed while
    they resolve inside ``data_root`` (default ``folder``; pass the dataset folder holding train/ and
    val/ to let a val split link into train/); links out of it are quarantined unless
    ``external_links`` (default: ``$GENSSL_FOLLOW_EXTERNAL_LINKS`` is 1). Raises ValueError if the
    folder is missing or unreadable, or nothing usable is left.

    Several ranks (``world_size`` > 1) call it together with one ``run_id`` (the same string on
    every rank, new for each run): rank 0 finds the files, each rank validates a slice of the changed
    ones, rank 0 publishes, and each rank then maps the result. A rank waiting on another with no
    sign of progress for ``timeout_s`` (default ``$GENSSL_INDEX_TIMEOUT`` or 600 s) raises TimeoutError.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise ValueError(f"dataset folder {root} does not exist; pass an existing folder (ImageFolder, flat, or WebDataset .tar shards) or builtin:shapes")
    root = root.resolve()
    link_root = Path(data_root).expanduser().resolve() if data_root is not None else root
    if link_root != root and link_root not in root.parents:
        raise ValueError(f"data_root {link_root} does not contain the dataset folder {root}; pass the folder that holds it")
    if external_links is None:
        external_links = os.environ.get(EXTERNAL_LINKS_ENV, "") == "1"
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive pixel count (default {MAX_PIXELS:,}); got {max_pixels}")
    if world_size > 1 and not run_id:
        raise ValueError("build_index on several ranks needs run_id=, one string shared by all ranks of this run "
                         "(engine.setup.load_data broadcasts one from rank 0)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    work = index_cache_dir(root, cache_dir)
    work.mkdir(parents=True, exist_ok=True)
    guard = _Guard(root, link_root, external_links)
    if world_size == 1:
        name = _build_alone(root, work, guard, max_pixels, num_workers)
    else:
        name = _build_together(root, work, guard, max_pixels, num_workers, rank, world_size, str(run_id), timeout_s)
    return open_index(root, cache_dir, classes, name)


def _file_stat(path: Path) -> tuple[int, int]:
    """(bytes, mtime_ns) of a converted copy; (-1, -1) = not checked (vanished since: the reader reports it)."""
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _failed_reads(path: Path) -> set[str]:
    """The file paths listed in ``read_errors.json`` (written by the loaders' `FileReader`)."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
        return {str(f["path"]) for f in json.loads(path.read_text()).get("files", [])}
    return set()


if __name__ == "__main__":  # python -m genssl.data.index FOLDER [--cache DIR]: build once, before a multi-node run
    import argparse

    parser = argparse.ArgumentParser(description="Validate a dataset folder and publish its index in the cache.")
    parser.add_argument("folder")
    parser.add_argument("--cache", default=None, help="cache folder (default $GENSSL_CACHE or ~/.cache/genssl)")
    parser.add_argument("--workers", type=int, default=None, help="validating processes (default: every core)")
    cli = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from genssl.data import index as module  # the importable module, so pool workers find its functions

    ix = module.build_index(cli.folder, cli.cache, num_workers=cli.workers)
    print(f"{len(ix)} images, {len(ix.classes)} classes, {len(ix.quarantine)} quarantined; "
          f"index in {module.index_cache_dir(cli.folder, cli.cache)}")
