"""bench/scale.py's synthetic index opens like a built one, and opening stays O(1) in memory and time."""

from __future__ import annotations

import os

import numpy as np
import pytest

from genssl.bench import scale
from genssl.data import index as index_mod
from genssl.data.index import build_index, open_index


def test_listing_index_matches_a_built_one_and_is_trusted_on_rerun(tmp_path, monkeypatch):
    rels = scale.layout(30, per_class=10)
    scale.make_files(tmp_path / "data", rels, scale._jpeg(16, 16))
    for rel in rels:  # an hour old: size + mtime are trusted (not "racily clean")
        st = (tmp_path / "data" / rel).stat()
        os.utime(tmp_path / "data" / rel, ns=(st.st_atime_ns, st.st_mtime_ns - 3600 * 10**9))
    built = build_index(tmp_path / "data", tmp_path / "built")
    scale.index_from_listing(tmp_path / "data", tmp_path / "listed", rels, stat_files=True)
    listed = open_index(tmp_path / "data", tmp_path / "listed")
    assert list(listed.source_paths) == list(built.source_paths) and listed.paths == built.paths
    assert listed.classes == built.classes and listed.labels.tolist() == built.labels.tolist()
    np.testing.assert_array_equal(listed.sizes, built.sizes)
    np.testing.assert_array_equal(listed.file_stats, built.file_stats)
    reads = []
    real = index_mod._read_bytes
    monkeypatch.setattr(index_mod, "_read_bytes", lambda p: (reads.append(p), real(p))[1])
    again = build_index(tmp_path / "data", tmp_path / "listed")  # the bench's rerun measurement
    assert reads == [] and again.fingerprint == listed.fingerprint


@pytest.mark.slow
def test_opening_200k_entries_parses_nothing(tmp_path):
    """A fresh process opens a 200,000-entry index in well under a second and a few MB; a parse of
    the paths into Python strings alone would add ~20 MB."""
    n = 200_000
    scale.index_from_listing(tmp_path / "data", tmp_path / "cache", scale.layout(n), stat_files=False)
    got = scale.child("load", folder=str(tmp_path / "data"), cache=str(tmp_path / "cache"))
    assert got["n"] == n and got["last_path_chars"] == len(str((tmp_path / "data").resolve() / scale.layout(n)[-1]))
    assert got["open_s"] < 1.0 and got["rss_open_mb"] < 5, got
    assert got["rss_touched_mb"] < 12, got  # labels 0.8 + sizes 1.6 + file sizes 1.6 MB, and page granularity
