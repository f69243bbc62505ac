"""View store: schema, done semantics, provenance checks, crc32c corruption detection, writers."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from genssl.data import viewstore as vs
from genssl.data.viewstore import (ViewStoreCorruptError, ViewStoreError, ViewStoreReader,
                                   create_view_store, open_view_store)

N, K, J, H, W = 10, 2, 1, 8, 6
ATTRS = {"fingerprint": "fp-data", "generator_hash": "gh-model", "sampler": {"steps": 3, "guidance": 2.0}}


def _source(i):
    rng = np.random.default_rng(i)
    views = rng.integers(0, 256, (K, H, W, 3), dtype=np.uint8)
    interp = rng.integers(0, 256, (J, H, W, 3), dtype=np.uint8)
    return views, np.array([0, 100 * (i % 5)]), interp, np.array([(i + 1) % N]), np.array([0.4])


def _make(tmp_path: Path, **kw):
    return create_view_store(tmp_path / "views.zarr", N, K, J, H, W, ATTRS, shard_size=4, **kw)


def test_schema_and_roundtrip(tmp_path):
    st = _make(tmp_path)
    assert st.n_shards == 3 and [list(st.shard_range(s)) for s in range(3)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert st.shards_for_rank(0, 2) == [0, 2] and st.shards_for_rank(1, 2) == [1]
    a = st._arrays
    assert a["views"].shape == (N, K, H, W, 3) and a["views"].dtype == np.uint8
    assert a["interp"].shape == (N, J, H, W, 3)
    assert a["interp_partner"].dtype == np.int64 and a["interp_alpha"].dtype == np.float32
    assert a["noise_level"].dtype == np.int16 and a["done"].dtype == bool
    assert a["views"].chunks[0] == 1 and a["done"].chunks == (4,)        # chunks hold whole sources
    assert st.attrs["schema_version"] == vs.SCHEMA_VERSION and st.attrs["sampler"]["steps"] == 3
    for name in vs.ARRAY_NAMES:
        assert any(type(c).__name__ == "Crc32cCodec" for c in a[name].compressors), name

    assert st.missing() == list(range(N)) and not st.is_done(3)
    for i in range(N):
        st.write_source(i, *_source(i))
    assert st.missing() == [] and st.n_done() == N
    r = ViewStoreReader(tmp_path / "views.zarr", expect_fingerprint="fp-data")
    assert len(r) == N
    for i in (0, 5, 9):
        views, levels, interp, partners, alphas = _source(i)
        np.testing.assert_array_equal(r.views(i), views)
        np.testing.assert_array_equal(r.noise_levels(i), levels)
        it, pa, al = r.interp(i)
        np.testing.assert_array_equal(it, interp)
        assert pa.tolist() == partners.tolist() and al.dtype == np.float32 and al.tolist() == [pytest.approx(0.4)]
    recs = list(r.iter_shard(1))
    assert [x.index for x in recs] == [4, 5, 6, 7]
    np.testing.assert_array_equal(recs[2].views, _source(6)[0])
    r2 = pickle.loads(pickle.dumps(r))                      # loader workers get a lazy copy
    np.testing.assert_array_equal(r2.views(8), _source(8)[0])


def test_done_semantics_and_validation(tmp_path):
    st = _make(tmp_path)
    st.write_source(2, *_source(2))
    assert st.is_done(2) and not st.is_done(1) and 2 not in st.missing()
    r = ViewStoreReader(st.path)
    with pytest.raises(ViewStoreError, match="not generated yet"):
        r.views(1)
    assert [x.index for x in r.iter_shard(0)] == [2]
    v, lv, it, pa, al = _source(3)
    with pytest.raises(ViewStoreError, match="views must be uint8"):
        st.write_source(3, v[:1], lv, it, pa, al)
    with pytest.raises(ViewStoreError, match="pass interp"):
        st.write_source(3, v, lv)
    with pytest.raises(IndexError):
        st.write_source(N, v, lv, it, pa, al)
    assert not st.is_done(3)
    # done is set only after the data chunks are durable: a failing fsync leaves the source not done
    orig = vs._fsync_file
    vs._fsync_file = lambda p: (_ for _ in ()).throw(OSError("disk gone"))
    try:
        with pytest.raises(OSError):
            st.write_source(3, v, lv, it, pa, al)
    finally:
        vs._fsync_file = orig
    assert not st.is_done(3)
    # read-only stores refuse writes; writers are confined to their shards
    with pytest.raises(ViewStoreError, match="read-only"):
        open_view_store(st.path, "r").write_source(3, v, lv, it, pa, al)
    st.set_writer(1, 2)
    with pytest.raises(ViewStoreError, match="belongs to rank 0"):
        st.write_source(3, v, lv, it, pa, al)
    st.write_source(5, *_source(5))
    st.invalidate([5])
    assert not st.is_done(5)


def test_provenance_mismatch_refused(tmp_path):
    st = _make(tmp_path)
    with pytest.raises(ValueError) as e:
        open_view_store(st.path, expect_fingerprint="fp-other")
    assert "'fp-data'" in str(e.value) and "'fp-other'" in str(e.value) and "out=" in str(e.value)
    with pytest.raises(ValueError) as e:
        ViewStoreReader(st.path, expect_fingerprint="fp-data", expect_generator_hash="gh-other")
    assert "'gh-model'" in str(e.value) and "'gh-other'" in str(e.value) and "out=" in str(e.value)
    with pytest.raises(ValueError, match="fingerprint"):
        create_view_store(st.path, N, K, J, H, W, {**ATTRS, "fingerprint": "x"}, shard_size=4)
    with pytest.raises(ValueError, match="generator"):
        create_view_store(st.path, N, K, J, H, W, {**ATTRS, "generator_hash": "y"}, shard_size=4)
    with pytest.raises(ValueError, match="layout"):
        create_view_store(st.path, N, K + 1, J, H, W, ATTRS, shard_size=4)
    with pytest.raises(ValueError, match="sampler settings"):
        create_view_store(st.path, N, K, J, H, W, {**ATTRS, "sampler": {"steps": 50}}, shard_size=4)
    # identical request: idempotent
    again = create_view_store(st.path, N, K, J, H, W, dict(ATTRS), shard_size=4)
    assert again.fingerprint == "fp-data"
    with pytest.raises(FileNotFoundError):
        open_view_store(tmp_path / "nope.zarr")


def test_concurrent_create_is_safe(tmp_path):
    errors, stores = [], []

    def make():
        try:
            stores.append(create_view_store(tmp_path / "v.zarr", N, K, J, H, W, ATTRS, shard_size=4))
        except Exception as e:  # pragma: no cover - failure path
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(stores) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".v.zarr.tmp")]


def _flip(path: Path, at: int = 7):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_chunk_detected(tmp_path):
    st = _make(tmp_path)
    for i in range(N):
        st.write_source(i, *_source(i))
    _flip(st._chunk_file("views", 6))
    r = ViewStoreReader(st.path)
    np.testing.assert_array_equal(r.views(5), _source(5)[0])         # neighbours unaffected
    with pytest.raises(ViewStoreCorruptError) as e:
        r.views(6)
    msg = str(e.value)
    assert "'views'" in msg and "source 6" in msg and "checksum" in msg and "invalidate" in msg
    _flip(st._chunk_file("interp_alpha", 9))
    with pytest.raises(ViewStoreCorruptError, match="'interp_alpha'.*source 9"):
        r.interp(9)
    _flip(st._chunk_file("done", 4))
    with pytest.raises(ViewStoreCorruptError, match="'done'.*sources 4..7"):
        ViewStoreReader(st.path)


def test_compressed_store_and_grouped_chunks(tmp_path):
    st = create_view_store(tmp_path / "z.zarr", 6, 1, 0, 4, 4, ATTRS, shard_size=4, sources_per_chunk=2,
                           compression="zstd")
    img = np.zeros((1, 4, 4, 3), np.uint8)
    st.write_source(1, img + 7, [300])
    assert st._arrays["views"].chunks[0] == 2 and st.interp_per_image == 0
    np.testing.assert_array_equal(ViewStoreReader(st.path).views(1), img + 7)
    with pytest.raises(ViewStoreError, match="multiple"):
        create_view_store(tmp_path / "bad.zarr", 6, 1, 0, 4, 4, ATTRS, shard_size=3, sources_per_chunk=2)
