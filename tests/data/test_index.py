"""Index: validation, conversion, quarantine report, caching, fingerprint, layouts."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genssl.data import index as index_mod
from genssl.data.index import build_index, index_cache_dir, read_sample_bytes


def test_quarantine_and_conversion(corpus, tmp_path, caplog):
    root, expect = corpus
    with caplog.at_level(logging.WARNING, logger="genssl.data"):
        ix = build_index(root, cache_dir=tmp_path / "c")
    bad = {rel for rel, s in expect.items() if s == "bad"}
    assert {rel for rel, _ in ix.quarantine} == bad
    assert all(reason for _, reason in ix.quarantine)
    assert sorted(ix.source_paths) == sorted(rel for rel, s in expect.items() if s != "bad")
    assert ix.classes == ["a", "b"] and len(ix) == len(ix.paths) == len(ix.labels) == len(ix.sizes)
    assert list(ix.labels) == [0 if p.startswith("a/") else 1 for p in ix.source_paths]
    # report beside the cached index, one warning line naming count and report
    report = json.loads(ix.report.read_text())
    assert ix.report.parent == index_cache_dir(root, tmp_path / "c")
    assert report["count"] == len(bad) and {f["path"] for f in report["files"]} == bad
    assert any(f"quarantined {len(bad)} " in r.getMessage() and str(ix.report) in r.getMessage() for r in caplog.records)
    reasons = dict(ix.quarantine)
    assert "empty" in reasons["b/empty.jpg"] and "not an image" in reasons["b/text.jpg"]
    assert "truncated" in reasons["b/truncated.jpg"] and "truncated" in reasons["b/no_eoi.jpg"]
    for rel, path, (w, h) in zip(ix.source_paths, ix.paths, ix.sizes):
        with Image.open(path) as img:  # every file the loader reads is plain 8-bit RGB/gray JPEG or RGB PNG
            assert img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L") and img.size == (w, h)
        if expect[rel] == "ok":
            assert path == str(root / rel)
        else:
            assert Path(path).is_relative_to(ix.report.parent) and path.endswith(".jpg")


def test_converted_values(tmp_path):
    """16-bit is scaled (not clipped), transparent pixels become white, CMYK comes back to RGB."""
    root = tmp_path / "flat"
    root.mkdir()
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(root / "deep.png")
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[:, :32] = (200, 30, 30, 255)  # left opaque red, right fully transparent (stored black)
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    Image.new("RGB", (64, 32), (20, 120, 220)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    ix = build_index(root, cache_dir=tmp_path / "c")
    got = {rel: np.asarray(Image.open(p).convert("RGB"), np.float32) for rel, p in zip(ix.source_paths, ix.paths)}
    assert np.abs(got["deep.png"][..., 0] - ramp / 257.0).max() < 6
    assert np.abs(got["alpha.png"][:, 40:] - 255).max() < 6 and np.abs(got["alpha.png"][:, :24] - (200, 30, 30)).max() < 12
    assert np.abs(got["cmyk.jpg"] - (20, 120, 220)).max() < 12


def test_cache_reused_without_decoding(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    first = build_index(root, cache_dir=tmp_path / "c")
    current = index_cache_dir(root, tmp_path / "c") / "CURRENT"
    stamp = current.read_text(), current.stat().st_mtime_ns

    def no_decode(*_):
        raise AssertionError("an unchanged file was decoded again")

    monkeypatch.setattr(index_mod, "_inspect_strict", no_decode)
    second = build_index(root, cache_dir=tmp_path / "c")
    assert (current.read_text(), current.stat().st_mtime_ns) == stamp  # no new generation written
    assert second.paths == first.paths and second.fingerprint == first.fingerprint
    assert second.quarantine == first.quarantine
    np.testing.assert_array_equal(second.sizes, first.sizes)


def test_fingerprint_tracks_content(corpus, tmp_path, make_image):
    root, _ = corpus
    cache = tmp_path / "c"
    target = root / "a" / "same_size.jpg"
    pixels = Image.fromarray(np.full((16, 16, 3), 90, np.uint8))
    pixels.save(target, quality=90, comment=b"version-1")
    st = target.stat()
    before = build_index(root, cache_dir=cache).fingerprint
    pixels.save(target, quality=90, comment=b"version-2")  # same size, same pixels, other bytes
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime restored
    assert target.stat().st_size == st.st_size
    after = build_index(root, cache_dir=cache)
    assert after.fingerprint != before
    fixed = root / "b" / "empty.jpg"  # a quarantined file that gets fixed joins the dataset
    fixed.write_bytes(make_image(7))
    again = build_index(root, cache_dir=cache)
    assert "b/empty.jpg" in again.source_paths and again.fingerprint != after.fingerprint
    assert "b/empty.jpg" not in dict(again.quarantine)


def test_fingerprint_independent_of_location(tmp_path, make_image):
    for name in ("one", "two"):
        (tmp_path / name / "cls").mkdir(parents=True)
        for i in range(3):
            (tmp_path / name / "cls" / f"{i}.jpg").write_bytes(make_image(i))
    a = build_index(tmp_path / "one", cache_dir=tmp_path / "c")
    b = build_index(tmp_path / "two", cache_dir=tmp_path / "c")
    assert a.fingerprint == b.fingerprint and a.report != b.report


def test_flat_folder_unlabelled(tmp_path, make_image):
    root = tmp_path / "flat"
    (root / "nested").mkdir(parents=True)
    (root / "x.jpg").write_bytes(make_image(0))
    (root / "nested" / "y.png").write_bytes(make_image(1, "PNG"))
    ix = build_index(root, cache_dir=tmp_path / "c")
    assert ix.source_paths == ["nested/y.png", "x.jpg"] and ix.classes == []
    assert ix.labels.dtype == np.int32 and list(ix.labels) == [-1, -1]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path, make_image):
    root = tmp_path / "wds"
    root.mkdir()
    for s in range(2):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tf:
            for k in range(3):
                key = f"s{s}k{k}"
                _add(tf, f"{key}.jpg" if k != 1 else f"{key}.png", make_image(10 * s + k, "JPEG" if k != 1 else "PNG"))
                _add(tf, f"{key}.cls", str((s + k) % 2).encode())
                _add(tf, f"{key}.json", b"{}")
            _add(tf, "broken.jpg", b"not a jpeg")
            _add(tf, "broken.cls", b"0")
    ix = build_index(root, cache_dir=tmp_path / "c")
    assert len(ix) == 6 and ix.classes == ["0", "1"]
    assert ix.source_paths[0] == "shard-0000.tar/s0k0.jpg"
    assert list(ix.labels) == [(s + k) % 2 for s in range(2) for k in range(3)]
    assert {rel for rel, _ in ix.quarantine} == {"shard-0000.tar/broken.jpg", "shard-0001.tar/broken.jpg"}
    # read in place (tests/data/test_webdataset_in_place.py): paths name the members, nothing is extracted
    assert list(ix.paths) == [f"{root}/{rel}" for rel in ix.source_paths] and (ix.ranges[:, 0] >= 0).all()
    assert not (index_cache_dir(root, tmp_path / "c") / "extracted").exists()
    again = build_index(root / "shard-0001.tar", cache_dir=tmp_path / "c2")  # a single shard works too
    assert len(again) == 3 and again.paths[0] == f"{root}/shard-0001.tar/s1k0.jpg"
    assert read_sample_bytes(again, 0) == make_image(10)


def test_truncated_shard_keeps_members_before_the_damage(tmp_path, make_image):
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tf:
        for k in range(4):
            _add(tf, f"k{k}.jpg", make_image(k, h=64, w=64))
    data = (root / "a.tar").read_bytes()
    (root / "a.tar").write_bytes(data[: len(data) * 2 // 3])
    ix = build_index(root, cache_dir=tmp_path / "c")
    assert 1 <= len(ix) < 4 and ix.quarantine and list(ix.labels) == [-1] * len(ix)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    (tmp_path / "junk" / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no usable images in .*junk.*1 quarantined.*\.txt"):
        build_index(tmp_path / "junk", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="does not exist"):
        build_index(tmp_path / "nope", cache_dir=tmp_path / "c")


def test_strict_even_when_pil_is_lenient(tmp_path, make_image, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    root = tmp_path / "flat"
    root.mkdir()
    good = make_image(0)
    (root / "ok.jpg").write_bytes(good)
    (root / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])
    ix = build_index(root, cache_dir=tmp_path / "c")
    assert ix.source_paths == ["ok.jpg"] and [q[0] for q in ix.quarantine] == ["cut.jpg"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_image_over_the_default_pixel_limit_is_quarantined_undecoded(tmp_path, make_image, monkeypatch):
    """A real 12,000 x 12,000 PNG (144 M pixels; 1-bit black, so about 20 MB in memory and a tiny
    file) is over PIL's 89.5 M default, under PIL's own hard error: before the guard it was decoded
    in full and kept with only a warning."""
    from PIL import ImageFile

    root = tmp_path / "flat"
    root.mkdir()
    Image.new("1", (12_000, 12_000)).save(root / "bomb.png")
    (root / "ok.jpg").write_bytes(make_image(0))
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: (decoded.append(img.size), real_load(img))[1])
    ix = build_index(root, cache_dir=tmp_path / "c")
    assert ix.source_paths == ["ok.jpg"] and decoded == [(48, 40)]
    assert dict(ix.quarantine) == {"bomb.png": (
        "image of 12000 x 12000 pixels exceeds the limit of 89,478,485 pixels (decompression-bomb guard); "
        "downscale it, or raise the limit (build_index(max_pixels=...), default genssl.data.index.MAX_PIXELS)")}
    assert json.loads(ix.report.read_text())["files"] == [{"path": "bomb.png", "reason": dict(ix.quarantine)["bomb.png"]}]
    assert Image.MAX_IMAGE_PIXELS == index_mod.MAX_PIXELS  # PIL's process-wide check is given back


def test_pixel_limit_option_and_cache(tmp_path, make_image):
    """``max_pixels`` moves the limit; a cached verdict made under another limit is redone."""
    root = tmp_path / "flat"
    root.mkdir()
    (root / "small.jpg").write_bytes(make_image(0, h=10, w=10))  # 100 pixels
    (root / "big.png").write_bytes(make_image(1, "PNG", h=20, w=30))  # 600 pixels
    low = build_index(root, cache_dir=tmp_path / "c", max_pixels=599)
    assert low.source_paths == ["small.jpg"]
    assert dict(low.quarantine)["big.png"].startswith("image of 30 x 20 pixels exceeds the limit of 599 pixels")
    high = build_index(root, cache_dir=tmp_path / "c", max_pixels=600)
    assert high.source_paths == ["big.png", "small.jpg"] and high.quarantine == []
    lower = build_index(root, cache_dir=tmp_path / "c", max_pixels=100)
    assert lower.source_paths == ["small.jpg"] and [q[0] for q in lower.quarantine] == ["big.png"]
    with pytest.raises(ValueError, match="max_pixels must be a positive pixel count"):
        build_index(root, cache_dir=tmp_path / "c", max_pixels=0)


def _as_schema2(work: Path) -> None:
    """Turn the published generation into what the previous release wrote (schema 2: no ranges column)."""
    current = json.loads((work / "CURRENT").read_text())
    gen = work / current["generation"]
    header = json.loads((gen / "header.json").read_text())
    (gen / "header.json").write_text(json.dumps({k: v for k, v in header.items() if k not in ("base", "shards")}
                                                | {"schema": 2}))
    (gen / "ranges.npy").unlink(missing_ok=True)
    (work / "CURRENT").write_text(json.dumps(current | {"schema": 2}))


def test_schema2_folder_index_is_upgraded_without_reading_files(corpus, tmp_path, monkeypatch, caplog):
    root, _ = corpus
    for f in root.rglob("*"):  # an hour old: size + mtime are trusted
        if f.is_file():
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 3600 * 10**9))
    first = build_index(root, cache_dir=tmp_path / "c")
    work = index_cache_dir(root, tmp_path / "c")
    _as_schema2(work)
    monkeypatch.setattr(index_mod, "_read_bytes", lambda *a: pytest.fail("an unchanged file was read again"))
    with caplog.at_level(logging.WARNING, logger="genssl.data"):
        again = build_index(root, cache_dir=tmp_path / "c")
    assert any("upgrading the index" in r.getMessage() and "schema 3" in r.getMessage() for r in caplog.records)
    assert json.loads((work / "CURRENT").read_text())["schema"] == 3 and again.ranges is None
    assert again.fingerprint == first.fingerprint and again.paths == first.paths and again.quarantine == first.quarantine


def test_schema2_webdataset_index_is_rebuilt_and_its_extracted_copies_deleted(tmp_path, make_image, caplog):
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tf:
        for k in range(3):
            _add(tf, f"k{k}.jpg", make_image(k))
    first = build_index(root, cache_dir=tmp_path / "c")
    work = index_cache_dir(root, tmp_path / "c")
    _as_schema2(work)
    (work / "extracted" / "a.tar").mkdir(parents=True)  # the copies the previous release made
    (work / "extracted" / "a.tar" / "k0.jpg").write_bytes(make_image(0))
    with caplog.at_level(logging.WARNING, logger="genssl.data"):
        again = build_index(root, cache_dir=tmp_path / "c")
    assert any("now read in place" in r.getMessage() for r in caplog.records)
    assert not (work / "extracted").exists() and again.fingerprint == first.fingerprint
    assert again.ranges.tolist() == first.ranges.tolist()
