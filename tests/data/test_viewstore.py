"""View store: schema, done semantics, provenance checks, crc32c corruption detection, writers, and the
scale targets of the encoded, sharded layout (files per source, bytes per view, kill -9 then rerun).

Most stores here hold lossless PNG views, so a round trip is exact; the JPEG default is checked for its
size and closeness."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
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
    kw.setdefault("view_format", "png")
    return create_view_store(tmp_path / "views.zarr", N, K, J, H, W, ATTRS, shard_size=4, **kw)


def _data_files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_schema_and_roundtrip(tmp_path):
    st = _make(tmp_path)
    assert st.n_shards == 3 and [list(st.shard_range(s)) for s in range(3)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert st.shards_for_rank(0, 2) == [0, 2] and st.shards_for_rank(1, 2) == [1]
    a = st._arrays
    assert a["views"].shape == (N, K) and a["interp"].shape == (N, J)     # one encoded image per element
    assert a["views"].shards == (4, K) and a["views"].chunks == (1, K)    # a shard file per 4 sources
    assert a["interp_partner"].dtype == np.int64 and a["interp_alpha"].dtype == np.float32
    assert a["noise_level"].dtype == np.int16 and a["done"].dtype == bool
    assert a["done"].chunks == (4,)                                       # chunks hold whole shards
    assert st.attrs["schema_version"] == vs.SCHEMA_VERSION == 2 and st.attrs["sampler"]["steps"] == 3
    assert st.layout["view_format"] == "png" and st.layout["view_quality"] is None
    for name in vs.ARRAY_NAMES:
        assert any(type(c).__name__ == "Crc32cCodec" for c in a[name].compressors), name
    # every file a source touches lies in its shard: writers of different shards share no file
    files = {i: {st._chunk_file(n, i) for n in vs.ARRAY_NAMES} | {st._staging_file(i)} for i in range(N)}
    assert all(not (files[i] & files[j]) for i in range(N) for j in range(N) if i // 4 != j // 4)

    assert st.missing() == list(range(N)) and not st.is_done(3)
    for i in range(N):
        st.write_source(i, *_source(i))
        staged = sorted(p.name for p in (st.path / vs.STAGING).rglob("*") if p.is_file())
        sealed = i in (3, 7, 9)                    # the last source of a shard seals it
        assert staged == ([] if sealed else [str(j) for j in range(i - i % 4, i + 1)])
        assert st.chunk_location("views", i)[0] == (st._chunk_file("views", i) if sealed else st._staging_file(i))
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
        create_view_store(st.path, N, K, J, H, W, {**ATTRS, "fingerprint": "x"}, shard_size=4, view_format="png")
    with pytest.raises(ValueError, match="generator"):
        create_view_store(st.path, N, K, J, H, W, {**ATTRS, "generator_hash": "y"}, shard_size=4, view_format="png")
    with pytest.raises(ValueError, match="layout"):
        create_view_store(st.path, N, K + 1, J, H, W, ATTRS, shard_size=4, view_format="png")
    with pytest.raises(ValueError, match="sampler settings"):
        create_view_store(st.path, N, K, J, H, W, {**ATTRS, "sampler": {"steps": 50}}, shard_size=4, view_format="png")
    with pytest.raises(ValueError, match="layout.*view_format"):
        create_view_store(st.path, N, K, J, H, W, ATTRS, shard_size=4)      # the JPEG default
    # identical request: idempotent
    again = create_view_store(st.path, N, K, J, H, W, dict(ATTRS), shard_size=4, view_format="png")
    assert again.fingerprint == "fp-data"
    with pytest.raises(FileNotFoundError):
        open_view_store(tmp_path / "nope.zarr")


def test_concurrent_create_is_safe(tmp_path):
    errors, stores = [], []

    def make():
        try:
            stores.append(create_view_store(tmp_path / "v.zarr", N, K, J, H, W, ATTRS, shard_size=4, view_format="png"))
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
    shard, off, length = st.chunk_location("views", 6)          # source 6's inner chunk in shard 1's file
    assert shard == st._chunk_file("views", 4) and length > 4
    _flip(shard, off + length // 2)
    r = ViewStoreReader(st.path)
    np.testing.assert_array_equal(r.views(5), _source(5)[0])         # neighbours in the shard unaffected
    for read in (r.views, r.encoded_views):
        with pytest.raises(ViewStoreCorruptError) as e:
            read(6)
        msg = str(e.value)
        assert "'views'" in msg and "source 6" in msg and "checksum" in msg and "invalidate" in msg
    assert [(d.array, d.start, d.stop, d.whole_file) for d in st.verify_shard(1)] == [("views", 6, 7, False)]
    _flip(shard, os.path.getsize(shard) - 10)                   # the shard index: the whole shard
    with pytest.raises(ViewStoreCorruptError, match="'views'.*source 5.*shard index"):
        r.views(5)
    assert [(d.array, d.start, d.stop, d.whole_file) for d in st.verify_shard(1)] == [("views", 4, 8, True)]
    _flip(st._chunk_file("interp_alpha", 9))
    with pytest.raises(ViewStoreCorruptError, match="'interp_alpha'.*source 9"):
        r.interp(9)
    _flip(st._chunk_file("done", 4))
    with pytest.raises(ViewStoreCorruptError, match="'done'.*sources 4..7"):
        ViewStoreReader(st.path)


def test_compressed_store_and_grouped_chunks(tmp_path):
    st = create_view_store(tmp_path / "z.zarr", 6, 1, 0, 4, 4, ATTRS, shard_size=4, sources_per_chunk=2,
                           compression="zstd", view_format="webp")
    img = np.zeros((1, 4, 4, 3), np.uint8)
    st.write_source(1, img + 7, [300])
    assert st._arrays["views"].chunks[0] == 2 and st.interp_per_image == 0
    np.testing.assert_array_equal(ViewStoreReader(st.path).views(1), img + 7)
    st.write_sources([0, 2, 3], np.stack([img + 1, img + 2, img + 3]), [[0], [0], [5]])  # seals shard 0
    assert st.noise_levels(3).tolist() == [5] and st.noise_levels(1).tolist() == [300]
    np.testing.assert_array_equal(ViewStoreReader(st.path).views(2), img + 2)
    assert st.verify_shard(0) == [] and not (st.path / vs.STAGING / "0").exists()
    with pytest.raises(ViewStoreError, match="multiple"):
        create_view_store(tmp_path / "bad.zarr", 6, 1, 0, 4, 4, ATTRS, shard_size=3, sources_per_chunk=2)


def test_a_shard_left_complete_but_unsealed_is_sealed_by_its_writer(tmp_path):
    """A writer killed between the last done flag and the seal: the store reads fine from staging, and
    the next writer of that shard seals it (set_writer)."""
    st = _make(tmp_path)
    for i in range(3):
        st.write_source(i, *_source(i))

    def killed(self, s, durable):
        raise KeyboardInterrupt("killed before sealing")

    orig = vs.ViewStore._seal
    vs.ViewStore._seal = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            st.write_source(3, *_source(3))
    finally:
        vs.ViewStore._seal = orig
    assert st.is_done(3) and not st._chunk_file("views", 0).exists()
    np.testing.assert_array_equal(ViewStoreReader(st.path).views(3), _source(3)[0])  # staged, readable
    again = open_view_store(st.path, "r+")
    again.set_writer(1, 2)                                   # shard 0 is not rank 1's: left alone
    assert not st._chunk_file("views", 0).exists()
    again.set_writer(0, 2)
    assert st._chunk_file("views", 0).exists() and not (st.path / vs.STAGING / "0").exists()
    np.testing.assert_array_equal(ViewStoreReader(st.path).views(3), _source(3)[0])
    assert again.verify_shard(0) == []


def test_at_most_one_file_per_1000_sources_per_array(tmp_path):
    """Shards of 1024 sources: each array of a complete 1024-source store is one data file."""
    n, side = 1024, 4
    st = create_view_store(tmp_path / "big.zarr", n, 1, 1, side, side, ATTRS)   # the default shard_size
    assert st.shard_size == 1024
    rng = np.random.default_rng(0)
    for g0 in range(0, n, 128):
        idx = list(range(g0, g0 + 128))
        st.write_sources(idx, rng.integers(0, 256, (128, 1, side, side, 3), dtype=np.uint8), np.zeros((128, 1)),
                         rng.integers(0, 256, (128, 1, side, side, 3), dtype=np.uint8), [[(i + 1) % n] for i in idx],
                         np.full((128, 1), 0.5), durable=False)
    per_array = {name: [p for p in (st.path / name).iterdir() if p.name != "zarr.json"] for name in vs.ARRAY_NAMES}
    assert {name: len(files) for name, files in per_array.items()} == dict.fromkeys(vs.ARRAY_NAMES, 1)
    assert max(1000 * len(files) / n for files in per_array.values()) <= 1.0
    assert not [p for p in (st.path / vs.STAGING).rglob("*") if p.is_file()]       # nothing left staged
    assert st.verify_shard(0) == [] and st.views(1000).shape == (1, side, side, 3)


def test_jpeg_q95_views_are_5x_smaller_than_raw_on_natural_looking_images(tmp_path):
    """The default format on 64 x 64 natural-looking (synthetic: smooth noise, bench/scale_views.py)
    views: at least 5x fewer bytes per view than raw uint8, and close to the written pixels."""
    from genssl.bench.scale_views import ViewBank

    n, side = 32, 64
    bank = ViewBank(side, seed=3, n_bank=8)
    st = create_view_store(tmp_path / "jpeg.zarr", n, 1, 0, side, side, ATTRS, shard_size=32)
    assert (st.view_format, st.view_quality) == ("jpeg", 95)
    st.write_sources(range(n), np.stack([bank(i)[None] for i in range(n)]), np.zeros((n, 1)), durable=False)
    stored = os.path.getsize(st._chunk_file("views", 0)) / n
    assert side * side * 3 / stored >= 5.0, stored
    err = np.mean([np.abs(st.views(i)[0].astype(int) - bank(i)).mean() for i in range(n)])
    assert err < 2.0, err


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from genssl.data.viewstore import create_view_store
    N, K, J, H, W = {N}, {K}, {J}, {H}, {W}
    path, pause = sys.argv[1], float(sys.argv[2])
    st = create_view_store(path, N, K, J, H, W, {ATTRS!r}, shard_size=4)
    st.set_writer(0, 1)
    for i in st.missing():
        rng = np.random.default_rng(i)
        views = (rng.integers(0, 64, (K, H, W, 3)) + 3 * i).astype(np.uint8)
        interp = (rng.integers(0, 64, (J, H, W, 3)) + 5 * i).astype(np.uint8)
        st.write_source(i, views, [0, i], interp, [(i + 1) % N], [0.4])
        time.sleep(pause)
""").format(N=N, K=K, J=J, H=H, W=W, ATTRS=ATTRS)


@pytest.mark.slow
def test_kill_9_while_writing_then_rerun_equals_an_uninterrupted_store(tmp_path):
    """SIGKILL lands anywhere (staging, done flags, a seal); the rerun writes only what is missing and
    the store is byte for byte the uninterrupted one (JPEG views: the encoder is deterministic)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(path, pause):
        return subprocess.Popen([sys.executable, str(script), str(path), str(pause)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    ref = tmp_path / "ref.zarr"
    assert run(ref, 0.0).wait(timeout=120) == 0
    store = tmp_path / "views.zarr"
    p = run(store, 0.15)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if (store / "zarr.json").exists() and open_view_store(store).n_done() >= 5:
            break
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()[1][-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    missing = open_view_store(store).missing()
    assert 0 < len(missing) < N
    assert run(store, 0.0).wait(timeout=120) == 0
    got = {k: v for k, v in _data_files(store).items() if ".partial" not in k}  # a killed Zarr write's temp file
    assert got == _data_files(ref)
    st = open_view_store(store)
    assert st.missing() == [] and all(st.verify_shard(s) == [] for s in range(st.n_shards))
