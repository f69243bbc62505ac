"""Schema-1 view stores: readers say how to convert, and the converter rewrites one atomically.

`_old_store` writes the schema-1 layout exactly as genssl did before schema 2 (raw uint8 views, one
chunk per source, bytes → crc32c), with plain Zarr, so the test does not depend on the old code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from genssl.data.convert_views import convert_view_store, main
from genssl.data.viewstore import SCHEMA_VERSION, ViewStoreReader, ViewStoreSchemaError, create_view_store, open_view_store

N, K, J, H, W, S = 10, 2, 1, 12, 10, 4
ATTRS = {"fingerprint": "fp-old", "generator_hash": "gh-old", "sampler": {"steps": 3}, "eldm_hash": "e1"}


def _views(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    return (rng.integers(0, 256, (K, H, W, 3), dtype=np.uint8), rng.integers(0, 256, (J, H, W, 3), dtype=np.uint8))


def _old_store(path: Path, done=range(N)) -> Path:
    import zarr
    import zarr.codecs as zc
    from zarr.storage import LocalStore

    g = zarr.open_group(store=LocalStore(path), mode="w", zarr_format=3)
    common = dict(serializer=zc.BytesCodec(), compressors=[zc.Crc32cCodec()], config={"write_empty_chunks": True},
                  chunk_key_encoding={"name": "default", "separator": "."})
    a = {"views": g.create_array("views", shape=(N, K, H, W, 3), chunks=(1, K, H, W, 3), dtype="uint8", fill_value=0, **common),
         "interp": g.create_array("interp", shape=(N, J, H, W, 3), chunks=(1, J, H, W, 3), dtype="uint8", fill_value=0, **common),
         "interp_partner": g.create_array("interp_partner", shape=(N, J), chunks=(S, J), dtype="int64", fill_value=-1, **common),
         "interp_alpha": g.create_array("interp_alpha", shape=(N, J), chunks=(S, J), dtype="float32", fill_value=0.0, **common),
         "noise_level": g.create_array("noise_level", shape=(N, K), chunks=(S, K), dtype="int16", fill_value=0, **common),
         "done": g.create_array("done", shape=(N,), chunks=(S,), dtype="bool", fill_value=False, **common)}
    g.attrs.update({**ATTRS, "schema_version": 1, "layout": {
        "n_sources": N, "views_per_image": K, "interp_per_image": J, "height": H, "width": W, "shard_size": S,
        "sources_per_chunk": 1, "compression": None}})
    for i in done:
        views, interp = _views(i)
        a["views"][i], a["interp"][i] = views, interp
        a["noise_level"][i] = [i, 2 * i]
        a["interp_partner"][i], a["interp_alpha"][i] = [(i + 1) % N], [0.25 * (i % 4)]
        a["done"][i] = True
    return path


def test_readers_of_an_old_store_are_told_how_to_convert(tmp_path):
    old = _old_store(tmp_path / "views.zarr", done=[0])
    for opener in (lambda: open_view_store(old), lambda: ViewStoreReader(old),
                   lambda: create_view_store(old, N, K, J, H, W, ATTRS, shard_size=S)):
        with pytest.raises(ViewStoreSchemaError) as e:
            opener()
        msg = str(e.value)
        assert "schema 1" in msg and f"python -m genssl.data.convert_views {old} {old}.v{SCHEMA_VERSION}" in msg
        assert "in place" in msg


def test_convert_round_trip_lossless_and_in_place_jpeg(tmp_path, capsys):
    old = _old_store(tmp_path / "views.zarr", done=[0, 1, 2, 3, 5, 6, 7, 8, 9])  # source 4 never generated
    new = tmp_path / "new.zarr"
    rep = convert_view_store(old, new, view_format="png", log=lambda *_: None)
    assert rep["converted"] == 9 and rep["damaged"] == {} and rep["files_after"] < rep["files_before"]
    st = open_view_store(new, expect_fingerprint="fp-old", expect_generator_hash="gh-old")
    assert st.attrs["eldm_hash"] == "e1" and st.sampler_settings == {"steps": 3} and st.view_format == "png"
    assert st.missing() == [4] and st.shard_size == S
    for i in (0, 5, 9):
        views, interp = _views(i)
        np.testing.assert_array_equal(st.views(i), views)       # lossless: exact
        it, pa, al = st.interp(i)
        np.testing.assert_array_equal(it, interp)
        assert st.noise_levels(i).tolist() == [i, 2 * i] and pa.tolist() == [(i + 1) % N] and al[0] == 0.25 * (i % 4)
    assert all(st.verify_shard(s) == [] for s in range(st.n_shards))
    assert not [p for p in tmp_path.iterdir() if ".convert-" in p.name]  # no temporary folder left
    with pytest.raises(ValueError, match="exists"):
        convert_view_store(old, new, log=lambda *_: None)
    with pytest.raises(ValueError, match="already a view store of schema"):
        convert_view_store(new, tmp_path / "again.zarr", log=lambda *_: None)
    assert main([str(new), str(tmp_path / "again.zarr")]) == 2 and "already" in capsys.readouterr().err

    # in place, through the command line (python -m genssl.data.convert_views), JPEG: the old store is kept
    assert main([str(old), str(old), "--quality", "90"]) == 0
    assert "old store kept as" in capsys.readouterr().out and (tmp_path / "views.zarr.schema1").is_dir()
    st = open_view_store(old)
    assert st.view_format == "jpeg" and st.view_quality == 90 and st.missing() == [4]
    assert np.abs(st.views(3).astype(int) - _views(3)[0]).mean() < 60  # noise images: lossy, but the same images


def test_damaged_old_chunks_are_found_and_left_not_done(tmp_path):
    """Every chunk is verified on the way: a flipped byte and a deleted chunk file become not-done
    sources (listed), never silently wrong or zero views."""
    old = _old_store(tmp_path / "views.zarr")
    f = old / "views" / "c.3.0.0.0.0"
    data = bytearray(f.read_bytes())
    data[5] ^= 0xFF
    f.write_bytes(bytes(data))
    (old / "interp" / "c.7.0.0.0.0").unlink()
    rep = convert_view_store(old, tmp_path / "new.zarr", log=lambda *_: None)
    assert sorted(rep["damaged"]) == [3, 7] and rep["converted"] == N - 2
    assert "checksum" in rep["damaged"][3] and "missing" in rep["damaged"][7]
    assert open_view_store(tmp_path / "new.zarr").missing() == [3, 7]
