"""Dataset index: find, validate once, convert or quarantine, cache.

Why this exists: a single corrupt JPEG fails a whole DALI batch (and with it the run), and DALI's
decoders only promise plain 8-bit RGB/gray JPEG and 8-bit RGB PNG. So every file is fully decoded
once with PIL (strictly: truncated data is an error, a JPEG must end with its EOI marker), odd but
valid images (gray/alpha/palette/CMYK/16-bit PNG, EXIF-rotated, BMP/WebP/TIFF...) are converted once
to an 8-bit RGB JPEG in the cache, and broken files are excluded and listed in ``quarantine.json``.
The result is cached as JSON keyed by the folder, so later calls only stat the files.

Layouts: ImageFolder (class subfolders -> labels by sorted class name), a flat folder (labels -1),
or WebDataset shards (``*.tar`` with ``<key>.jpg|jpeg|png`` and optional ``<key>.cls``), which are
extracted once into the cache and then indexed like files. An ImageFolder val split is labelled
with the train split's class list (``classes=``): labels are class *names*, so a val/ that lacks a
class keeps every other label right. WebDataset ``.cls`` integers are used as written.

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
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger("genssl.data")

INDEX_VERSION = 1
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png")  # preference order when a key has several
READ_ERRORS_FILE = "read_errors.json"  # files the loaders could not use at read time (FileReader)
RACY_NS = 2_000_000_000  # files modified this close to the last build are re-hashed (like git's racy-clean)
CONVERTED_SUFFIX = ".rgb8.jpg"
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
    converted copy in the cache), originally ``source_paths[i]`` (relative to ``root``; for
    WebDataset ``<shard>.tar/<member>``), of ``sizes[i] = (width, height)`` pixels, with
    ``labels[i]`` (-1 when unlabelled) indexing ``classes``."""

    root: Path
    paths: list[str]
    source_paths: list[str]
    sizes: np.ndarray  # [N, 2] int64 (width, height) of paths[i]
    labels: np.ndarray  # [N] int64
    classes: list[str]
    fingerprint: str
    quarantine: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    report: Path | None = None  # quarantine.json
    file_stats: np.ndarray | None = None  # [N, 2] int64 (bytes, mtime_ns) of paths[i] when indexed; None = unknown

    def __len__(self) -> int:
        return len(self.paths)


# ---------------------------------------------------------------------------------------------
# discovery


@dataclass
class _Candidate:
    rel: str  # relative to root, '/'-separated
    path: Path  # file on disk (for WebDataset: the extracted member)
    label: int


@dataclass
class _Found:
    kind: str
    candidates: list[_Candidate]
    classes: list[str]
    ignored: Counter  # extension -> count of files that are not images
    quarantine: list[tuple[str, str]] = field(default_factory=list)  # problems found before decoding


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


def _walk_files(top: Path, guard: _Guard | None = None) -> Iterator[Path]:
    """Files below ``top`` in sorted order, hidden names skipped, folder links followed. With a
    ``guard``, links that leave its root, link loops and unlistable folders are quarantined there."""

    def walk(folder: Path, real: str, ancestors: frozenset[str]) -> Iterator[Path]:
        try:
            entries = sorted((e for e in os.scandir(folder) if _visible(e.name)), key=lambda e: e.name)
        except OSError as exc:
            if guard is not None:
                guard.unreadable(folder, exc)
            return
        subdirs = []
        for e in entries:
            path, link = Path(e.path), e.is_symlink()
            if link and guard is not None and guard.refuses_link(path):
                continue
            if e.is_dir():  # follows links
                subdirs.append((path, os.path.realpath(path) if link else os.path.join(real, e.name)))
            else:
                yield path
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


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def _discover(root: Path, work: Path, guard: _Guard) -> _Found:
    if root.is_file():
        if root.suffix.lower() != ".tar":
            raise ValueError(f"{root} is a file; pass a folder of images (ImageFolder or flat) or a WebDataset .tar shard")
        return _discover_webdataset(root.parent, [root], work)
    try:
        listing = list(os.scandir(root))
    except OSError as exc:
        raise ValueError(f"dataset folder {root} cannot be listed ({exc.strerror or exc}); make it readable by this "
                         "user (chmod -R a+rX), or pass another data=") from None
    entries = sorted((e for e in listing if _visible(e.name) and not (e.is_symlink() and guard.refuses_link(Path(e.path)))),
                     key=lambda e: e.name)
    top_images = [Path(e.path) for e in entries if e.is_file() and _is_image(Path(e.name))]
    shards = [Path(e.path) for e in entries if e.is_file() and e.name.lower().endswith(".tar")]
    subdirs = [Path(e.path) for e in entries if e.is_dir()]
    ignored: Counter = Counter()
    if not top_images and not subdirs and shards:
        found = _discover_webdataset(root, shards, work)
        return dataclasses.replace(found, quarantine=guard.quarantine + found.quarantine)
    if top_images:  # flat folder (recursive), unlabelled
        cands = []
        for p in _walk_files(root, guard):
            if _is_image(p):
                cands.append(_Candidate(p.relative_to(root).as_posix(), p, -1))
            else:
                ignored[p.suffix.lower() or "(no extension)"] += 1
        return _Found("flat", cands, [], ignored, guard.quarantine)
    classes, cands = [], []
    for d in subdirs:
        files = list(_walk_files(d, guard))
        imgs = [p for p in files if _is_image(p)]
        for p in files:
            if not _is_image(p):
                ignored[p.suffix.lower() or "(no extension)"] += 1
        if imgs:
            label = len(classes)
            classes.append(d.name)
            cands += [_Candidate(p.relative_to(root).as_posix(), p, label) for p in imgs]
    for e in entries:
        if e.is_file():
            ignored[Path(e.name).suffix.lower() or "(no extension)"] += 1
    return _Found("imagefolder", cands, classes, ignored, guard.quarantine)


def _label_by_name(found: _Found, classes: list[str], root: Path) -> _Found:
    """Relabel an ImageFolder split with another split's class list (val with train's): a sample's
    label is its class folder's *name*'s position in ``classes``, never its position among this
    split's own folders, so a val/ lacking a class keeps every other label right. A class that
    ``classes`` lacks cannot be scored and is an error; a class of ``classes`` absent here is fine.
    Flat folders stay unlabelled and WebDataset ``.cls`` integers stay as written."""
    if found.kind != "imagefolder":
        return found
    position = {name: i for i, name in enumerate(classes)}
    assert len(position) == len(classes), f"duplicate class names in {classes}"
    unknown = [name for name in found.classes if name not in position]
    if unknown:
        shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
        raise ValueError(
            f"{root} has class folder(s) {unknown} that the train split does not have (train classes: "
            f"{shown or 'none'}); val labels are looked up by class name in train's classes, so every val "
            f"class folder must also be a train class folder: rename or remove {unknown} in {root}, or add "
            "them to train/")
    candidates = [dataclasses.replace(c, label=position[found.classes[c.label]]) for c in found.candidates]
    return dataclasses.replace(found, candidates=candidates, classes=list(classes))


_SAFE_MEMBER = re.compile(r"^[^/\\][^\\]*$")


def _split_key(member: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    head, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _extract_shard(shard: Path, dest: Path) -> list[tuple[str, str]]:
    """Extract a shard's image and .cls members into ``dest`` (atomically: temp dir + rename).

    Returns shard-level problems (truncated shard, unsafe member names) as quarantine entries; they
    are stored in the marker file so cached runs still report them.
    """
    marker = dest / ".extracted.json"
    st = shard.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if marker.exists():
        with contextlib.suppress(ValueError, OSError):
            info = json.loads(marker.read_text())
            if info.get("stamp") == stamp:
                return [tuple(q) for q in info.get("quarantine", [])]
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    problems: list[tuple[str, str]] = []
    keep = set(WDS_IMAGE_EXTS) | {"cls"} | {e[1:] for e in IMAGE_EXTS}
    try:
        with tarfile.open(shard, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if not _SAFE_MEMBER.match(m.name) or ".." in m.name.split("/"):
                    problems.append((f"{shard.name}/{m.name}", "unsafe member path (absolute or '..'), skipped"))
                    continue
                if _split_key(m.name)[1] not in keep:
                    continue
                target = tmp / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                assert src is not None
                target.write_bytes(src.read())
    except (tarfile.TarError, EOFError, OSError) as exc:
        problems.append((shard.name, f"shard unreadable past some point ({type(exc).__name__}: {exc}); members before it kept"))
    (tmp / ".extracted.json").write_text(json.dumps({"stamp": stamp, "quarantine": problems}))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return problems


def _discover_webdataset(root: Path, shards: list[Path], work: Path) -> _Found:
    cands: list[_Candidate] = []
    problems: list[tuple[str, str]] = []
    ignored: Counter = Counter()
    labelled = False
    for shard in shards:
        dest = work / "extracted" / shard.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        problems += _extract_shard(shard, dest)
        members: dict[str, dict[str, Path]] = {}
        for p in _walk_files(dest):
            key, ext = _split_key(p.relative_to(dest).as_posix())
            members.setdefault(key, {})[ext] = p
        for key in sorted(members):
            group = members[key]
            exts = [e for e in WDS_IMAGE_EXTS if e in group] + sorted(e for e in group if e not in WDS_IMAGE_EXTS and e != "cls")
            if not exts:
                problems.append((f"{shard.name}/{key}", "no image member (.jpg/.jpeg/.png) for this key"))
                continue
            label = -1
            if "cls" in group:
                try:
                    label = int(group["cls"].read_text().strip())
                    labelled = True
                except ValueError:
                    problems.append((f"{shard.name}/{key}.cls", "label is not an integer"))
                    continue
            cands.append(_Candidate(f"{shard.name}/{key}.{exts[0]}", group[exts[0]], label))
    if any(c.label < -1 for c in cands):
        raise ValueError(f"WebDataset shards in {root} have negative .cls labels; labels must be 0..K-1")
    n_classes = max((c.label for c in cands), default=-1) + 1
    classes = [str(i) for i in range(n_classes)] if labelled else []
    return _Found("webdataset", cands, classes, ignored, problems)


# ---------------------------------------------------------------------------------------------
# validation


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


def _inspect(path: str, converted: str, max_pixels: int) -> dict:
    """Read, hash and strictly decode one file; convert it into ``converted`` when DALI would not
    read it as is. Returns the cache entry (``status`` ok | converted | bad). An image over
    ``max_pixels`` is rejected from its header (``too_large``, with its size), before decoding."""
    st = os.stat(path)
    entry: dict = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        with open(path, "rb") as f:
            data = f.read()
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
    _atomic_write(Path(converted), buf.getvalue())
    return entry | {"status": "converted", "reason": f"converted from {why}", "w": rgb.width, "h": rgb.height}


def _inspect_strict(path: str, converted: str, max_pixels: int) -> dict:
    """`_inspect` with PIL's truncated-image leniency forced off and PIL's own size check off (both
    process-wide flags): `_inspect` applies ``max_pixels`` itself, so the limit is ours alone and a
    rejected file gets its size in the reason (PIL's check only warns, or raises before the size is known)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = None
    return _inspect(path, converted, max_pixels)


# ---------------------------------------------------------------------------------------------
# cache files


def _atomic_write(path: Path, data: bytes, fsync: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def index_cache_dir(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``build_index`` keeps the index, report, converted copies and extracted shards."""
    root = Path(folder).expanduser().resolve()
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(root.parts[-2:]))[-60:]
    return default_cache_dir(cache_dir) / "index" / f"{slug}-{key}"


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """Serialise builds of one folder across processes (all ranks call build_index at start)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_cache(path: Path, root: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(path.read_text())
        if cached.get("version") == INDEX_VERSION and cached.get("root") == str(root):
            return cached
    return {"entries": {}, "built_ns": 0}


def _reusable(old: dict | None, st: os.stat_result, path: Path, converted: Path, built_ns: int) -> dict | None:
    """The cached entry if the file is unchanged, else None. Files modified within RACY_NS of the
    last build could have changed without a visible mtime change, so their bytes are re-hashed."""
    if not old or old.get("status") == "converted" and not converted.exists():
        return None
    if old["size"] != st.st_size:
        return None
    if old["mtime_ns"] == st.st_mtime_ns and st.st_mtime_ns < built_ns - RACY_NS:
        return old
    with contextlib.suppress(OSError):
        if hashlib.sha256(path.read_bytes()).hexdigest() == old["sha256"]:
            return old | {"mtime_ns": st.st_mtime_ns}
    return None


def _limit_changed(entry: dict, max_pixels: int) -> bool:
    """True when a cached entry was judged against another pixel limit than ``max_pixels`` would give
    (accepted but now too large, or rejected as too large but now within it): it is inspected again."""
    over = "w" in entry and entry["w"] * entry["h"] > max_pixels
    return over != entry.get("too_large", False)


def _fingerprint(classes: list[str], rows: list[tuple[str, int, str]]) -> str:
    h = hashlib.sha256(json.dumps(classes).encode())
    for rel, label, sha in rows:
        h.update(f"{rel}\0{label}\0{sha}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# public entry point


def build_index(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                num_workers: int | None = None, classes: list[str] | None = None,
                max_pixels: int = MAX_PIXELS, external_links: bool | None = None,
                data_root: str | os.PathLike | None = None) -> DatasetIndex:
    """Validate ``folder`` (once; later calls reuse the cache) and return its index.

    ``num_workers`` threads decode in parallel (PIL releases the GIL while decoding); default
    ``min(os.cpu_count(), 16)``. ``classes`` (a val split: the train index's ``classes``) labels an
    ImageFolder by class name -> position in ``classes`` instead of by its own folders, and becomes
    the index's ``classes``; a class folder not in ``classes`` is a ValueError. Images over
    ``max_pixels`` pixels are quarantined without being decoded. Quarantined files are summarised
    in one warning and listed in ``<index cache>/quarantine.json``. Symbolic links are followed while
    they resolve inside ``data_root`` (default ``folder``; pass the dataset folder holding train/ and
    val/ to let a val split link into train/); links out of it are quarantined unless
    ``external_links`` (default: ``$GENSSL_FOLLOW_EXTERNAL_LINKS`` is 1). Raises ValueError if the
    folder is missing or unreadable, or nothing usable is left.
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
    work = index_cache_dir(root, cache_dir)
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive pixel count (default {MAX_PIXELS:,}); got {max_pixels}")
    with _locked(work):
        return _build_locked(root, work, num_workers, classes, max_pixels, _Guard(root, link_root, external_links))


def _build_locked(root: Path, work: Path, num_workers: int | None, classes: list[str] | None,
                  max_pixels: int, guard: _Guard) -> DatasetIndex:
    # The cache holds per-file validation only (labels are derived from the folders on every call),
    # so one cache serves a folder whatever class list labels it.
    index_path, report_path = work / "index.json", work / "quarantine.json"
    cached = _load_cache(index_path, root)
    found = _discover(root, work, guard)
    if classes is not None:
        found = _label_by_name(found, classes, root)
    old_entries: dict = cached["entries"]
    entries: dict[str, dict] = {}
    todo: list[_Candidate] = []
    newest_ns = 0
    failed_reads = _failed_reads(work / READ_ERRORS_FILE)
    for c in found.candidates:
        conv = work / "converted" / (c.rel + CONVERTED_SUFFIX)
        try:
            st = c.path.stat()
        except OSError as exc:
            entries[c.rel] = {"status": "bad", "reason": f"cannot stat: {exc}", "size": -1, "mtime_ns": -1, "sha256": ""}
            continue
        listed = str(c.path) in failed_reads or str(conv) in failed_reads
        hit = None if listed else _reusable(old_entries.get(c.rel), st, c.path, conv, cached["built_ns"])
        if hit is not None and not _limit_changed(hit, max_pixels):
            entries[c.rel] = hit
            newest_ns = max(newest_ns, st.st_mtime_ns)
        else:
            todo.append(c)
    if todo:
        workers = max(1, num_workers if num_workers is not None else min(os.cpu_count() or 1, 16))
        args = [(str(c.path), str(work / "converted" / (c.rel + CONVERTED_SUFFIX)), max_pixels) for c in todo]
        lenient, pil_limit = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
        try:
            if workers == 1 or len(todo) < 32:
                results = [_inspect_strict(*a) for a in args]
            else:
                with ThreadPoolExecutor(workers) as pool:
                    results = list(pool.map(lambda a: _inspect_strict(*a), args))
        finally:  # PIL's flags are process-wide: give them back
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = lenient, pil_limit
        for c, r in zip(todo, results):
            entries[c.rel] = r
    pre = [list(q) for q in found.quarantine]
    changed = entries != old_entries or pre != cached.get("pre_quarantine", [])
    # entries verified by re-hashing (racy mtimes) become trusted once old enough: restamp the cache
    settled = newest_ns >= cached["built_ns"] - RACY_NS and newest_ns < time.time_ns() - RACY_NS
    if changed or settled or not index_path.exists() or not report_path.exists():
        _write_cache(root, found, entries, index_path, report_path)

    if failed_reads:  # every file listed there was validated again above
        log.warning("genssl.data: re-validated %d file(s) that could not be read during training (%s)",
                    len(failed_reads), work / READ_ERRORS_FILE)
        with contextlib.suppress(OSError):
            os.replace(work / READ_ERRORS_FILE, work / "read_errors.checked.json")

    rows, paths, sizes, labels, stats = [], [], [], [], []
    quarantine = list(found.quarantine)
    for c in sorted(found.candidates, key=lambda c: c.rel):
        e = entries[c.rel]
        if e["status"] == "bad":
            quarantine.append((c.rel, e["reason"]))
            continue
        read = work / "converted" / (c.rel + CONVERTED_SUFFIX) if e["status"] == "converted" else c.path
        paths.append(str(read))
        sizes.append((e["w"], e["h"]))
        labels.append(c.label)
        rows.append((c.rel, c.label, e["sha256"]))
        stats.append(_file_stat(read) if e["status"] == "converted" else (e["size"], e["mtime_ns"]))
    if quarantine:
        log.warning("genssl.data: quarantined %d of %d files in %s (excluded); reasons in %s",
                    len(quarantine), len(found.candidates), root, report_path)
    if not paths:
        other = ", ".join(f"{n} {ext}" for ext, n in found.ignored.most_common(5)) or "none"
        raise ValueError(
            f"no usable images in {root} (layout: {found.kind}): {len(found.candidates)} image files found, "
            f"{len(quarantine)} quarantined (see {report_path}); other files: {other}. Expected class "
            f"subfolders of .jpg/.png (ImageFolder), a flat folder of images, or WebDataset .tar shards.")
    return DatasetIndex(root=root, paths=paths, source_paths=[r[0] for r in rows],
                        sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
                        labels=np.asarray(labels, dtype=np.int64), classes=list(found.classes),
                        fingerprint=_fingerprint(found.classes, rows), quarantine=quarantine,
                        report=report_path, file_stats=np.asarray(stats, dtype=np.int64).reshape(-1, 2))


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


def _write_cache(root: Path, found: _Found, entries: dict, index_path: Path, report_path: Path) -> None:
    doc = {"version": INDEX_VERSION, "root": str(root), "kind": found.kind, "classes": found.classes,
           "built_ns": time.time_ns(), "pre_quarantine": [list(q) for q in found.quarantine], "entries": entries}
    _atomic_write(index_path, json.dumps(doc).encode(), fsync=True)
    bad = list(found.quarantine) + [(rel, e["reason"]) for rel, e in sorted(entries.items()) if e["status"] == "bad"]
    report = {"root": str(root), "count": len(bad), "files": [{"path": p, "reason": r} for p, r in bad]}
    _atomic_write(report_path, json.dumps(report, indent=1).encode(), fsync=True)
