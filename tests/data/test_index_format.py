"""The memory-mapped index: opened without parsing, re-read incrementally, converted from schema 1, validated in a pool."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genssl.data import index as index_mod
from genssl.data.index import build_index, index_cache_dir, open_index
from genssl.data.index_columns import CURRENT, PathColumn

from .conftest import encode, rgb_array

HOUR_NS = 3600 * 10**9


def _folder(root: Path, n: int = 6) -> Path:
    """ImageFolder a/ b/ of n small JPEGs whose mtimes lie an hour back (so size + mtime are trusted)."""
    for i in range(n):
        f = root / ("a" if i % 2 else "b") / f"{i}.jpg"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(encode(Image.fromarray(rgb_array(i, h=24 + i, w=32)), "JPEG", quality=90))
        then = f.stat().st_mtime_ns - HOUR_NS
        os.utime(f, ns=(then, then))
    return root


@pytest.fixture()
def reads(monkeypatch):
    """Every file validation reads (decoding or re-hashing), in order."""
    seen: list[str] = []
    real = index_mod._read_bytes
    monkeypatch.setattr(index_mod, "_read_bytes", lambda p: (seen.append(os.path.basename(p)), real(p))[1])
    return seen


def test_index_is_memory_mapped_and_opens_without_rebuilding(corpus, tmp_path, monkeypatch):
    root, expect = corpus
    built = build_index(root, cache_dir=tmp_path / "c")
    for column in (built.labels, built.sizes, built.file_stats):
        assert isinstance(column, np.memmap)
        assert not column.flags.writeable
    assert built.labels.dtype == np.int32 and built.sizes.dtype == np.int32 and built.sizes.shape == (len(built), 2)
    assert isinstance(built.paths, PathColumn) and isinstance(built.source_paths, PathColumn)

    monkeypatch.setattr(index_mod, "_discover", lambda *a: pytest.fail("open_index must not look at the folder"))
    opened = open_index(root, tmp_path / "c")
    assert opened.paths == built.paths and list(opened.source_paths) == list(built.source_paths)
    assert opened.fingerprint == built.fingerprint and opened.quarantine == built.quarantine
    np.testing.assert_array_equal(opened.labels, built.labels)
    # converted files are read from the cache copy, the rest in place
    for rel, path in zip(opened.source_paths, opened.paths):
        assert path == (str(root / rel) if expect[rel] == "ok" else
                        str(index_cache_dir(root, tmp_path / "c") / "converted" / rel) + ".rgb8.jpg")
    # a worker process receives a reference, not a copy of the paths
    again = pickle.loads(pickle.dumps(opened.paths))
    assert again == opened.paths and len(pickle.dumps(opened.paths)) < 1000
    assert opened.paths[-1] == list(opened.paths)[-1] and opened.paths[1:3] == list(opened.paths)[1:3]
    with pytest.raises(IndexError):
        opened.paths[len(opened)]


def test_rerun_reads_only_changed_files(tmp_path, reads):
    root = _folder(tmp_path / "data")
    first = build_index(root, cache_dir=tmp_path / "c")
    assert sorted(reads) == sorted(f"{i}.jpg" for i in range(6))  # the first build reads everything once
    reads.clear()
    assert build_index(root, cache_dir=tmp_path / "c").fingerprint == first.fingerprint
    assert reads == []  # nothing changed: not one file read

    changed = root / "a" / "1.jpg"
    changed.write_bytes(encode(Image.fromarray(rgb_array(50, h=40, w=20)), "JPEG", quality=80))
    touched = root / "b" / "2.jpg"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    again = build_index(root, cache_dir=tmp_path / "c")
    assert sorted(reads) == ["1.jpg", "2.jpg"]  # the changed one decoded, the touched one re-hashed
    row = list(again.source_paths).index("a/1.jpg")
    assert tuple(again.sizes[row]) == (20, 40) and again.fingerprint != first.fingerprint
    assert tuple(again.file_stats[row]) == (changed.stat().st_size, changed.stat().st_mtime_ns)


def _schema1(root: Path, work: Path, built_ns: int) -> None:
    """An index.json as the previous release wrote it (version 1)."""
    entries = {}
    for f in sorted(root.rglob("*.jpg")):
        data = f.read_bytes()
        with Image.open(f) as img:
            w, h = img.size
        st = f.stat()
        entries[f.relative_to(root).as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "status": "ok",
                                                   "sha256": hashlib.sha256(data).hexdigest(), "w": w, "h": h}
    doc = {"version": 1, "root": str(root.resolve()), "kind": "imagefolder", "classes": ["a", "b"],
           "built_ns": built_ns, "pre_quarantine": [], "entries": entries}
    work.mkdir(parents=True)
    (work / "index.json").write_text(json.dumps(doc))
    (work / ".lock").write_text("")


def test_old_json_index_is_converted_once_without_reading_files(tmp_path, reads, caplog):
    root = _folder(tmp_path / "data")
    expected = build_index(root, cache_dir=tmp_path / "fresh")
    reads.clear()
    work = index_cache_dir(root, tmp_path / "c")
    _schema1(root, work, built_ns=int(expected.file_stats[:, 1].max()) + HOUR_NS)
    with caplog.at_level(logging.WARNING, logger="genssl.data"):
        ix = build_index(root, cache_dir=tmp_path / "c")
    assert reads == []  # every entry came from the JSON
    lines = [r.getMessage() for r in caplog.records if "index.json" in r.getMessage()]
    assert len(lines) == 1 and "converting the JSON index" in lines[0] and "once" in lines[0]
    assert not (work / "index.json").exists() and not (work / ".lock").exists() and (work / CURRENT).is_file()
    assert ix.fingerprint == expected.fingerprint and list(ix.source_paths) == list(expected.source_paths)
    np.testing.assert_array_equal(ix.sizes, expected.sizes)


def test_unreadable_old_index_is_rebuilt_with_a_message(tmp_path, reads, caplog):
    root = _folder(tmp_path / "data", n=2)
    work = index_cache_dir(root, tmp_path / "c")
    work.mkdir(parents=True)
    (work / "index.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="genssl.data"):
        ix = build_index(root, cache_dir=tmp_path / "c")
    assert len(ix) == 2 and sorted(reads) == ["0.jpg", "1.jpg"]
    assert any("cannot be read; rebuilding" in r.getMessage() for r in caplog.records)
    assert not (work / "index.json").exists()


@pytest.mark.slow
def test_process_pool_gives_the_same_index(corpus, tmp_path, monkeypatch, reads):
    """Validation in 2 spawned processes equals validation in this one (statuses, conversions, reasons)."""
    root, expect = corpus
    alone = build_index(root, cache_dir=tmp_path / "one", num_workers=1)
    assert len(reads) == len(expect)
    reads.clear()
    monkeypatch.setattr(index_mod, "POOL_MIN_FILES", 2)
    pooled = build_index(root, cache_dir=tmp_path / "two", num_workers=2)
    assert reads == []  # read in the pool's processes, where this process's counter does not reach
    assert pooled.fingerprint == alone.fingerprint and pooled.quarantine == alone.quarantine
    assert list(pooled.source_paths) == list(alone.source_paths)
    np.testing.assert_array_equal(pooled.sizes, alone.sizes)
