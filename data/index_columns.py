"""The dataset index on disk: memory-mapped columns that every rank opens without parsing.

One *generation* is a folder ``<index cache>/columns-<id>/`` holding a small ``header.json`` and one
``.npy`` file per column, opened with ``np.load(mmap_mode="r")``: a rank maps the files and touches
only the pages it reads, so opening 1.28 M entries costs milliseconds and no parsing (the JSON index
it replaces cost ~250 MB of Python objects per rank). Rows are every file found: the usable ones
first (``n_ok``, sorted by relative path), then the quarantined ones (sorted); the index a loader
sees is the first ``n_ok`` rows, so it needs no row map.

Columns (``n`` rows):

==================  ===============  ===========================================================
``rel``             uint8 [bytes]     the relative paths, UTF-8, concatenated (no separator)
``rel_offsets``     int64 [n + 1]     row ``i`` is ``rel[rel_offsets[i]:rel_offsets[i + 1]]``
``status``          uint8 [n]         OK, CONVERTED (read the copy in ``converted/``), BAD, TOO_LARGE
``labels``          int32 [n]         position in the header's ``classes`` (the folder's own); -1 none
``sizes``           int32 [n, 2]      (width, height) of the file the loaders decode; -1 unknown
``src_stats``       int64 [n, 2]      (bytes, mtime_ns) of the source file when validated
``read_stats``      int64 [n, 2]      (bytes, mtime_ns) of the file the loaders read (the copy if converted)
``sha256``          uint8 [n, 32]     content hash of the source file (fingerprint, racy-clean checks)
``ranges``          int64 [n, 3]      WebDataset only (absent for folders): (shard, offset, length) of a
                                      member read in place, ``shard`` numbering the header's ``shards``;
                                      (-1, -1, -1) for a converted member (read its copy)
==================  ===============  ===========================================================

For a WebDataset member ``src_stats`` and ``read_stats`` are its *shard's* (bytes, mtime_ns): a shard
that changes is re-validated member by member, and the loaders skip its members until then.

The header holds the schema version, layout kind, root, ``base`` (the folder ``rel`` is relative to:
the root, or the folder holding a single-shard root), ``shards`` (WebDataset: shard file names in
``base``), class names, counts, the fingerprint, the build time, problems found before decoding
(``pre_quarantine``) and one reason per quarantined row.

A generation is written into a temp folder, every file fsynced, renamed into place, and then
published by atomically replacing ``CURRENT`` (a one-line JSON naming it). Rename is the only
atomic step relied on, so this is safe on NFS/Lustre shared by nodes: a reader sees the old
generation or the new one. Old generations are kept (`KEEP_GENERATIONS`) because a rank of another
job may still map them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

SCHEMA = 3  # 2: no ranges (WebDataset shards were extracted into the cache); 1: one JSON document (index.json)
# Older generations a build may take as its previous one: a schema-2 folder index has the same rows
# (no ranges); its WebDataset rows describe extracted copies and are not reused (index.py, _Previous).
UPGRADABLE = (2,)
CURRENT = "CURRENT"
KEEP_GENERATIONS = 2
OK, CONVERTED, BAD, TOO_LARGE = 0, 1, 2, 3
CONVERTED_SUFFIX = ".rgb8.jpg"
COLUMNS = {"rel": np.uint8, "rel_offsets": np.int64, "status": np.uint8, "labels": np.int32, "sizes": np.int32,
           "src_stats": np.int64, "read_stats": np.int64, "sha256": np.uint8}
OPTIONAL_COLUMNS = {"ranges": np.int64}  # written only for WebDataset layouts


def unique_tmp(path: Path) -> Path:
    """A temp name beside ``path`` that no other process, on this node or another, can pick."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}.tmp")


def atomic_write(path: Path, data: bytes, fsync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_rel(rels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Relative paths -> (UTF-8 blob uint8, offsets int64 [n + 1])."""
    encoded = [r.encode("utf-8", "surrogateescape") for r in rels]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def write_generation(work: Path, columns: dict[str, np.ndarray], header: dict) -> str:
    """Write one generation into ``work`` and publish it as CURRENT; returns its folder name."""
    assert set(COLUMNS) <= set(columns) <= set(COLUMNS) | set(OPTIONAL_COLUMNS), sorted(set(columns) ^ set(COLUMNS))
    dtypes = COLUMNS | OPTIONAL_COLUMNS
    name = f"columns-{time.time_ns()}-{os.urandom(3).hex()}"
    tmp = work / f".tmp-{name}"
    tmp.mkdir(parents=True)
    for key, array in columns.items():
        with open(tmp / f"{key}.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=dtypes[key]))
            f.flush()
            os.fsync(f.fileno())
    atomic_write(tmp / "header.json", json.dumps(header | {"schema": SCHEMA}).encode())
    _fsync_dir(tmp)
    os.rename(tmp, work / name)
    _fsync_dir(work)
    atomic_write(work / CURRENT, json.dumps({"schema": SCHEMA, "generation": name}).encode())
    _prune(work, keep={name})
    return name


def _prune(work: Path, keep: set[str]) -> None:
    """Remove generations beyond the newest `KEEP_GENERATIONS` that are over 10 minutes old (a
    process that built one alone may not have mapped it yet), and temp folders of dead writers."""
    born = lambda p: int(p.name.split("-")[1])  # noqa: E731  (time_ns in the name)
    gens = sorted((p for p in work.glob("columns-*") if p.is_dir()), key=born)
    recent = time.time_ns() - 600 * 10**9
    for p in gens[:-KEEP_GENERATIONS]:
        if p.name not in keep and born(p) < recent:
            shutil.rmtree(p, ignore_errors=True)
    day_ago = time.time() - 86400
    for p in work.glob(".tmp-columns-*"):
        try:
            if p.stat().st_mtime < day_ago:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def current_generation(work: Path, schemas: Sequence[int] = (SCHEMA,)) -> str | None:
    """The published generation's folder name, or None (no columnar index of one of ``schemas`` here yet)."""
    try:
        doc = json.loads((work / CURRENT).read_text())
    except (OSError, ValueError):
        return None
    name = doc.get("generation") if isinstance(doc, dict) and doc.get("schema") in schemas else None
    return name if isinstance(name, str) and (work / name / "header.json").is_file() else None


class Generation:
    """One generation opened read-only: ``header`` (dict), the columns as memory maps, and ``ranges``
    (the optional column: None when absent, i.e. every row is a file)."""

    def __init__(self, folder: Path, schemas: Sequence[int] = (SCHEMA,)) -> None:
        self.folder = Path(folder)
        self.header = json.loads((self.folder / "header.json").read_text())
        self.schema = self.header.get("schema")
        if self.schema not in schemas:
            raise ValueError(f"{self.folder} has index schema {self.schema}, expected {SCHEMA}")
        self.columns = {k: np.load(self.folder / f"{k}.npy", mmap_mode="r") for k in COLUMNS}
        ranges = self.folder / "ranges.npy"
        self.ranges = np.load(ranges, mmap_mode="r") if ranges.is_file() else None
        self.n, self.n_ok = int(self.header["n"]), int(self.header["n_ok"])
        assert len(self.columns["rel_offsets"]) == self.n + 1 and len(self.columns["status"]) == self.n
        assert self.ranges is None or self.ranges.shape == (self.n, 3)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.columns[key]

    def rel_list(self) -> list[str]:
        """Every row's relative path as a Python list (for the builder; loaders use `PathColumn`)."""
        return list(PathColumn(self.columns["rel"], self.columns["rel_offsets"]))


class PathColumn(Sequence[str]):
    """Paths decoded on access from a UTF-8 blob: ``prefix + rel[i]`` (+ the converted copy's
    prefix and suffix where ``status[i]`` is CONVERTED). Holds no Python string per row, so 1.28 M
    paths cost their mmapped bytes instead of ~150 MB of ``str`` objects per rank. Compares equal
    to any sequence of the same strings; pickles as a reference to its generation folder."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, n: int | None = None, prefix: str = "",
                 status: np.ndarray | None = None, converted_prefix: str = "", folder: Path | None = None) -> None:
        self.blob, self.offsets = blob, offsets
        self.n = len(offsets) - 1 if n is None else n
        self.prefix, self.status, self.converted_prefix, self.folder = prefix, status, converted_prefix, folder

    def __len__(self) -> int:
        return self.n

    def _one(self, i: int) -> str:
        rel = self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")
        if self.status is not None and self.status[i] == CONVERTED:
            return self.converted_prefix + rel + CONVERTED_SUFFIX
        return self.prefix + rel

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(self.n))]
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"path index {i} out of range for {self.n} paths")
        return self._one(i)

    def __iter__(self) -> Iterator[str]:
        # one bulk copy of the blob, then slicing: ~10x faster than n separate mmap reads
        blob, off = self.blob[: self.offsets[self.n]].tobytes() if self.n else b"", self.offsets[: self.n + 1].tolist()
        conv = np.flatnonzero(np.asarray(self.status[: self.n]) == CONVERTED) if self.status is not None else ()
        conv = set(conv.tolist()) if len(conv) else set()
        for i in range(self.n):
            rel = blob[off[i]:off[i + 1]].decode("utf-8", "surrogateescape")
            yield self.converted_prefix + rel + CONVERTED_SUFFIX if i in conv else self.prefix + rel

    def __eq__(self, other) -> bool:
        if not isinstance(other, (Sequence, PathColumn)) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(p) for p in self[:3])
        return f"PathColumn([{head}{', ...' if self.n > 3 else ''}], n={self.n})"

    def __reduce__(self):
        if self.folder is None:
            return (PathColumn, (np.asarray(self.blob), np.asarray(self.offsets), self.n, self.prefix,
                                 None if self.status is None else np.asarray(self.status), self.converted_prefix))
        return (_reopen, (str(self.folder), self.n, self.prefix, self.status is not None, self.converted_prefix))


def _reopen(folder: str, n: int, prefix: str, with_status: bool, converted_prefix: str) -> PathColumn:
    """Unpickle a `PathColumn` by mapping its generation again (a spawned worker gets no copy)."""
    load = lambda k: np.load(Path(folder) / f"{k}.npy", mmap_mode="r")  # noqa: E731
    return PathColumn(load("rel"), load("rel_offsets"), n, prefix, load("status") if with_status else None,
                      converted_prefix, Path(folder))


# ---------------------------------------------------------------------------------------------
# coordination between ranks, through files only

TIMEOUT_ENV = "GENSSL_INDEX_TIMEOUT"  # seconds a rank waits for another without any sign of progress
DEFAULT_TIMEOUT_S = 600.0


class RankFailed(RuntimeError):
    """Another rank stopped with an error while building the index (its message is included)."""


class RunDir:
    """The files through which the ranks of one run build one index: ``<index cache>/runs/<run_id>/``.

    Every marker is written by one rank only, in full, then renamed into place (the one operation
    NFS and Lustre make atomic across nodes; no flock, no O_EXCL). A rank that waits polls for the
    marker and gives up after ``timeout_s`` without *progress*: each working rank rewrites its
    ``alive-<rank>`` file every few seconds, so a long validation never times out while a crashed
    rank (or a cache folder that other nodes cannot see) is reported within ``timeout_s``.
    """

    def __init__(self, folder: Path, rank: int, world_size: int, timeout_s: float | None, what: str) -> None:
        self.folder, self.rank, self.world_size, self.what = Path(folder), rank, world_size, what
        env = os.environ.get(TIMEOUT_ENV)
        self.timeout_s = float(timeout_s if timeout_s is not None else env if env else DEFAULT_TIMEOUT_S)
        self.period_s = min(5.0, max(0.2, self.timeout_s / 10))
        self.folder.mkdir(parents=True, exist_ok=True)

    def publish(self, name: str, obj) -> None:
        atomic_write(self.folder / name, json.dumps(obj).encode())

    def fail(self, message: str) -> None:
        """Tell the waiting ranks to stop now (instead of timing out) and why."""
        try:
            self.publish(f"failed-{self.rank}", {"rank": self.rank, "error": message})
        except OSError:
            pass

    def heartbeat(self) -> "_Heartbeat":
        return _Heartbeat(self.folder / f"alive-{self.rank}", self.period_s)

    def _alive(self, ranks: Sequence[int]) -> tuple[str, ...]:
        out = []
        for r in ranks:
            try:
                out.append((self.folder / f"alive-{r}").read_text())
            except OSError:
                out.append("")
        return tuple(out)

    def wait(self, name: str, ranks: Sequence[int], doing: str):
        """The JSON in marker ``name`` once it exists; ``ranks`` are the ones that must progress meanwhile."""
        path, seen, last_change, polls = self.folder / name, None, time.monotonic(), 0
        while True:
            failed = sorted(self.folder.glob("failed-*"))
            if failed:
                info = json.loads(failed[0].read_text())
                raise RankFailed(f"rank {info['rank']} failed while building the dataset index of {self.what} "
                                 f"(see its error in the log): {info['error']}")
            try:
                return json.loads(path.read_text())
            except FileNotFoundError:
                pass
            alive = self._alive(ranks)
            if alive != seen:
                seen, last_change = alive, time.monotonic()
            elif time.monotonic() - last_change > self.timeout_s:
                raise TimeoutError(self._timeout_message(ranks, doing))
            polls += 1
            time.sleep(min(0.5, self.period_s / 2, 0.02 * 1.5**polls))  # quick at first, then gentle on the server

    def _timeout_message(self, ranks: Sequence[int], doing: str) -> str:
        who = "rank " + ", ".join(map(str, ranks)) if ranks else "the other ranks"
        return (f"rank {self.rank} waited {self.timeout_s:g} s for {who} to {doing} the dataset index of {self.what}, "
                f"with no sign of progress (no change of {self.folder}/alive-<rank>). Either that rank stopped (look "
                f"for its error in its log) or the index cache {self.folder.parent.parent} is not on a file system "
                f"that every node sees: set cache_dir= (or $GENSSL_CACHE) to a shared folder. On a slow file system "
                f"raise ${TIMEOUT_ENV} (seconds; now {self.timeout_s:g}), or build the index once beforehand with "
                f"one process: python -m genssl.data.index {self.what} --cache <cache_dir>")


class _Heartbeat:
    """Rewrite ``path`` with a counter every ``period_s`` seconds in a background thread, while in use."""

    def __init__(self, path: Path, period_s: float) -> None:
        import threading

        self.path, self.period_s, self._stop = path, period_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="genssl-index-heartbeat")

    def _run(self) -> None:
        beat = 0
        while not self._stop.is_set():
            beat += 1
            try:
                atomic_write(self.path, f"{os.getpid()} {beat}".encode(), fsync=False)
            except OSError:
                pass
            self._stop.wait(self.period_s)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def prune_runs(runs: Path, max_age_s: float = 86400) -> None:
    """Remove run folders older than a day (a run's own folder is removed by `RunDir` users)."""
    now = time.time()
    for p in runs.glob("*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
