"""WebDataset shards read in place: indexed from their member headers (nothing extracted), validated,
read by the loaders from each member's byte range, and the same ranges DALI's own WebDataset reader sees.

Image i is a flat colour (10 + 20 i, 0, 0) PNG (the helpers of test_gensis_loader), so a crop's colour
names the member it was cut from. Shard s holds images 6 s .. 6 s + 5, each with a ``.cls`` label i % 3
and a ``.json`` member the index ignores.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genssl.data import index as index_mod
from genssl.data.dali_loader import DaliMultiCropLoader, epoch_batches
from genssl.data.index import build_index, index_cache_dir, read_sample_bytes
from genssl.tests.data.test_gensis_loader import PLAIN, _same_colour, real_rgb

N, PER_SHARD = 12, 6
HOUR_NS = 3600 * 10**9


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), real_rgb(i), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _age(path: Path) -> None:
    """Put the mtime an hour back, so the index trusts size + mtime (not "racily clean")."""
    then = path.stat().st_mtime_ns - HOUR_NS
    os.utime(path, ns=(then, then))


def _shards(root: Path, extra: dict[str, bytes] | None = None) -> Path:
    """Two shards of 6 flat-colour PNGs with labels; ``extra`` members are appended to the first."""
    root.mkdir(parents=True)
    for s in range(N // PER_SHARD):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tf:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                _add(tf, f"img{i:02d}.png", _png(i))
                _add(tf, f"img{i:02d}.cls", str(i % 3).encode())
                _add(tf, f"img{i:02d}.json", b"{}")
            for name, data in (extra or {}).items() if s == 0 else ():
                _add(tf, name, data)
        _age(root / f"shard-{s:04d}.tar")
    return root


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


@pytest.fixture()
def counted_reads(monkeypatch):
    """Every image read of validation (decoding or re-hashing), as (path, offset, length) arguments."""
    seen: list[tuple] = []
    real = index_mod._read_bytes
    monkeypatch.setattr(index_mod, "_read_bytes", lambda *a: (seen.append(a), real(*a))[1])
    return seen


def test_shards_are_indexed_in_place(tmp_path, counted_reads):
    root = _shards(tmp_path / "wds")
    ix = build_index(root, cache_dir=tmp_path / "c")
    work = index_cache_dir(root, tmp_path / "c")
    # nothing extracted, no file per member: the cache holds the index and its report only
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith("columns-")) == ["CURRENT", "quarantine.json"]
    assert len(counted_reads) == N and all(len(a) == 3 for a in counted_reads)  # each member read once, as a range
    assert len(ix) == N and ix.classes == ["0", "1", "2"] and ix.labels.tolist() == [i % 3 for i in range(N)]
    assert list(ix.source_paths) == [f"shard-{i // PER_SHARD:04d}.tar/img{i:02d}.png" for i in range(N)]
    assert list(ix.paths) == [f"{root}/{rel}" for rel in ix.source_paths]  # names for messages, not files
    assert ix.shards == [str(root / "shard-0000.tar"), str(root / "shard-0001.tar")]
    assert ix.ranges.shape == (N, 3) and ix.ranges[:, 0].tolist() == [i // PER_SHARD for i in range(N)]
    for i in range(N):  # the ranges are exactly the members, and file_stats their shard's
        shard = Path(ix.shards[ix.ranges[i, 0]])
        assert read_sample_bytes(ix, i) == _members(shard)[f"img{i:02d}.png"] == _png(i)
        assert tuple(ix.file_stats[i]) == (shard.stat().st_size, shard.stat().st_mtime_ns)
    part = ix.subset(np.array([7, 2]))  # a subset reads each member from its own range
    assert part.ranges.tolist() == ix.ranges[[7, 2]].tolist() and read_sample_bytes(part, 0) == _png(7)


def test_problems_are_quarantined_as_before(tmp_path):
    """A corrupt member, a key without an image, a label that is not an integer, an unsafe name: each
    quarantined and reported; a truncated shard keeps the members before the damage."""
    root = _shards(tmp_path / "wds", extra={"broken.png": b"\x89PNG\r\n\x1a\n" + bytes(range(200)),
                                            "lonely.cls": b"1", "badlabel.png": _png(3), "badlabel.cls": b"one",
                                            "../escape.png": _png(4)})
    shard = root / "shard-0001.tar"
    data = shard.read_bytes()
    cut = data.index(_png(9)) + 40  # inside image 9's bytes
    shard.write_bytes(data[:cut])
    ix = build_index(root, cache_dir=tmp_path / "c")
    assert [int(Path(p).stem[3:]) for p in ix.source_paths] == list(range(9))  # 6, 7, 8 kept; 9..11 lost
    reasons = dict(ix.quarantine)
    assert set(reasons) == {"shard-0000.tar/broken.png", "shard-0000.tar/lonely", "shard-0000.tar/badlabel.cls",
                            "shard-0000.tar/../escape.png", "shard-0001.tar"}
    assert "not an image" in reasons["shard-0000.tar/broken.png"] or "undecodable" in reasons["shard-0000.tar/broken.png"]
    assert "no image member" in reasons["shard-0000.tar/lonely"] and "not an integer" in reasons["shard-0000.tar/badlabel.cls"]
    assert "unsafe" in reasons["shard-0000.tar/../escape.png"]
    assert reasons["shard-0001.tar"].startswith("shard unreadable past some point (truncated: member img09.png")
    report = json.loads(ix.report.read_text())
    assert {f["path"] for f in report["files"]} == set(reasons)


def test_a_member_dali_cannot_decode_as_is_reads_its_converted_copy(tmp_path):
    deep = io.BytesIO()
    Image.fromarray(np.full((16, 24), 40000, np.uint16)).save(deep, "PNG")  # 16-bit gray
    palette, indexed = io.BytesIO(), Image.new("P", (24, 16), 0)
    indexed.putpalette([200, 30, 30] + [0] * 765)
    indexed.save(palette, "PNG")
    root = _shards(tmp_path / "wds", extra={"deep.png": deep.getvalue(), "palette.png": palette.getvalue()})
    ix = build_index(root, cache_dir=tmp_path / "c")
    work = index_cache_dir(root, tmp_path / "c")
    rows = {rel: i for i, rel in enumerate(ix.source_paths)}
    for rel, rgb in (("shard-0000.tar/deep.png", (156, 156, 156)), ("shard-0000.tar/palette.png", (200, 30, 30))):
        i = rows[rel]
        copy = work / "converted" / (rel + ".rgb8.jpg")
        assert ix.paths[i] == str(copy) and ix.ranges[i].tolist() == [-1, -1, -1]
        assert tuple(ix.file_stats[i]) == (copy.stat().st_size, copy.stat().st_mtime_ns)
        decoded = np.asarray(Image.open(io.BytesIO(read_sample_bytes(ix, i))))
        assert decoded.shape == (16, 24, 3) and np.abs(decoded.mean(axis=(0, 1)) - rgb).max() <= 3
    assert ix.ranges[rows["shard-0000.tar/img00.png"], 0] == 0  # the plain ones stay in place


def test_dali_training_loader_decodes_members_in_place(tmp_path):
    ix = build_index(_shards(tmp_path / "wds"), cache_dir=tmp_path / "c")
    loader = DaliMultiCropLoader(ix, PLAIN, batch_size=4, rank=0, world_size=1, seed=1)
    batches = list(loader)
    assert len(batches) == N // 4
    for (crops, idx), asked in zip(batches, loader.batches()):
        np.testing.assert_array_equal(idx.numpy(), asked)
        for crop in crops:
            _same_colour(crop, [real_rgb(i) for i in idx.numpy()])
    assert loader.read_problems()["files_skipped"] == 0


def test_a_member_overwritten_after_indexing_is_skipped_and_revalidated(tmp_path, counted_reads, caplog):
    """Bytes of image 2 overwritten in place (same shard size; its mtime changes): training goes on with
    stand-ins from the other shard, read_errors.json names the member, and the next build re-hashes the
    changed shard's members, quarantining only image 2."""
    root = _shards(tmp_path / "wds")
    ix = build_index(root, cache_dir=tmp_path / "c")
    shard = root / "shard-0000.tar"
    with open(shard, "r+b") as f:  # the PNG signature and header of image 2 become zeros
        f.seek(int(ix.ranges[2, 1]))
        f.write(bytes(24))
    assert shard.stat().st_size == ix.file_stats[2, 0]
    loader = DaliMultiCropLoader(ix, PLAIN, batch_size=4, rank=0, world_size=1, seed=1)
    with caplog.at_level(logging.WARNING, logger="genssl.data"):
        for (crops, idx), asked in zip(loader, loader.batches()):
            changed = asked < PER_SHARD  # every member of the changed shard is skipped until the next build
            assert (idx.numpy()[changed] >= PER_SHARD).all() and (idx.numpy()[~changed] == asked[~changed]).all()
            _same_colour(crops[0], [real_rgb(i) for i in idx.numpy()])
    report = json.loads(ix.report.with_name("read_errors.json").read_text())
    reasons = {f["path"]: f["reason"] for f in report["files"]}
    assert reasons[f"{root}/shard-0000.tar/img02.png"].startswith("its shard was modified since indexing")
    assert set(reasons) <= {ix.paths[i] for i in range(PER_SHARD)}
    assert loader.read_problems()["files_skipped"] == len(reasons) >= 1

    counted_reads.clear()
    again = build_index(root, cache_dir=tmp_path / "c")
    assert [rel for rel, _ in again.quarantine] == ["shard-0000.tar/img02.png"]
    assert len(again) == N - 1 and sorted(a[0] for a in counted_reads) == [str(shard)] * PER_SHARD  # shard 1 not read
    assert all(tuple(again.file_stats[i]) == (shard.stat().st_size, shard.stat().st_mtime_ns) for i in range(PER_SHARD - 1))


def test_an_unchanged_shard_is_reused_without_reading_a_member(tmp_path, counted_reads, monkeypatch):
    root = _shards(tmp_path / "wds")
    first = build_index(root, cache_dir=tmp_path / "c")
    counted_reads.clear()
    monkeypatch.setattr(index_mod, "_inspect_strict", lambda *a: pytest.fail("an unchanged member was decoded"))
    again = build_index(root, cache_dir=tmp_path / "c")
    assert counted_reads == [] and again.fingerprint == first.fingerprint
    assert again.ranges.tolist() == first.ranges.tolist()
    touched = root / "shard-0001.tar"  # same bytes, new mtime: its members are re-hashed, not decoded
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = build_index(root, cache_dir=tmp_path / "c")
    assert sorted(a[1] for a in counted_reads) == sorted(first.ranges[PER_SHARD:, 1].tolist())
    assert third.fingerprint == first.fingerprint and third.file_stats[PER_SHARD, 1] == st.st_mtime_ns + 10**9


def test_ranks_validate_member_slices_together(tmp_path, counted_reads):
    """Two ranks (threads here) share the members to validate through todo.json and agree with one process."""
    root = _shards(tmp_path / "wds")
    got: dict[int, object] = {}

    def rank(r: int) -> None:
        got[r] = build_index(root, cache_dir=tmp_path / "c", num_workers=1, rank=r, world_size=2, run_id="t")

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = build_index(root, cache_dir=tmp_path / "alone")
    assert len(counted_reads) == 2 * N  # N by the two ranks together, N by the single build
    for r in range(2):
        assert got[r].fingerprint == alone.fingerprint and got[r].ranges.tolist() == alone.ranges.tolist()


def test_dali_webdataset_reader_sees_the_members_the_ranges_give(tmp_path):
    """DALI's own WebDataset reader, over the same shards, yields for every image member exactly the
    bytes of genssl's range, at the same offset of the same shard."""
    import nvidia.dali.fn as fn
    from nvidia.dali.pipeline import Pipeline

    deep = io.BytesIO()
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(deep, "PNG")  # converted: genssl reads its copy
    root = _shards(tmp_path / "wds", extra={"photo.jpg": _jpeg(), "other.jpeg": _jpeg(), "deep.png": deep.getvalue()})
    ix = build_index(root, cache_dir=tmp_path / "c")
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None)
    with pipe:
        pipe.set_outputs(fn.readers.webdataset(paths=ix.shards, ext=["jpg;jpeg;png"], missing_component_behavior="skip",
                                               name="wds"))
    pipe.build()
    dali: dict[tuple[str, int], bytes] = {}
    for _ in range(pipe.epoch_size("wds")):
        (out,) = pipe.run()
        shard, offset, _member = out[0].source_info().rsplit(":", 2)
        dali[(shard, int(offset))] = np.asarray(out[0]).tobytes()
    ours = {(ix.shards[s], int(o)): read_sample_bytes(ix, i) for i, (s, o, _) in enumerate(ix.ranges.tolist()) if s >= 0}
    assert len(ours) == N + 2 and ours == {k: v for k, v in dali.items() if k in ours}
    assert len(dali) == len(ours) + 1  # and the one DALI sees besides: the 16-bit PNG genssl converted
    assert ix.paths[list(ix.source_paths).index("shard-0000.tar/deep.png")].endswith(".rgb8.jpg")


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_torch_baseline_reads_members(tmp_path):
    from genssl.data.torch_loader import TorchMultiCropLoader

    ix = build_index(_shards(tmp_path / "wds"), cache_dir=tmp_path / "c")
    loader = TorchMultiCropLoader(ix, PLAIN, batch_size=4, rank=0, world_size=1, seed=0, num_workers=0)
    batches = list(loader)
    assert len(batches) == N // 4
    for (crops, idx), asked in zip(batches, epoch_batches(N, 4, 0, 1, seed=0, epoch=0)):
        assert [tuple(c.shape) for c in crops] == [(4, 3, plan.size, plan.size) for plan in PLAIN.plans()]
        np.testing.assert_array_equal(idx.numpy(), asked)


def test_compressed_shards_are_refused_with_the_fix(tmp_path):
    root = _shards(tmp_path / "wds")
    (root / "shard-0002.tar.gz").write_bytes(gzip.compress((root / "shard-0000.tar").read_bytes()))
    with pytest.raises(ValueError, match=r"compressed \(shard-0002.tar.gz\).*uncompressed \.tar.*gunzip"):
        build_index(root, cache_dir=tmp_path / "c")
    os.replace(root / "shard-0002.tar.gz", root / "shard-0002.tar")  # gzip data under a .tar name
    ix = build_index(root, cache_dir=tmp_path / "c")
    assert len(ix) == N and dict(ix.quarantine)["shard-0002.tar"].startswith("gzip-compressed, although named .tar")


@pytest.mark.slow  # about 10 s of CPU, most of it importing diffusers and transformers
def test_image_variation_embeds_members(tmp_path):
    """`ImageVariationSampler.embed_sources` reads the sources through `read_sample_bytes`: members too."""
    pytest.importorskip("transformers")
    from genssl.generators.image_variation import ImageVariationSampler
    from genssl.tests.generators.test_image_variation import build_tiny_pipeline

    ix = build_index(_shards(tmp_path / "wds"), cache_dir=tmp_path / "c")
    sampler = ImageVariationSampler(build_tiny_pipeline(tmp_path / "pipeline"), steps=1, guidance=1.0)
    rows = np.array([7, 0, 11])
    expected = sampler.embed([np.full((32, 32, 3), real_rgb(i), np.uint8) for i in rows]).numpy()
    np.testing.assert_allclose(sampler.embed_sources(ix)(rows), expected, rtol=1e-5, atol=1e-6)
