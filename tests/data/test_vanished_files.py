"""Files that vanish or change after indexing: skipped at read time (another sample of the batch stands
in), reported once in the log and in read_errors.json, counted; the next index re-validates them.

Image i is a flat colour (10 + 20 i, 0, 0) PNG, so a crop's colour names the file it was cut from
(the helpers of test_gensis_loader). Files 2 (deleted), 5 (truncated), 7 (replaced by garbage of the
same size, its mtime put back) and 10 (touched: content intact, mtime changed) are damaged after
indexing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genssl.data.dali_loader import INTERP_DAMAGED, SUBSTITUTED, DaliMultiCropLoader, image_bytes_problem
from genssl.data.gensis_loader import GenSISLoader
from genssl.data.index import build_index
from genssl.tests.data.test_gensis_loader import (PARTNERS, PLAIN, _same_colour, _write_store, interp_rgb, real_rgb,
                                                  synthetic_rgb)

N = 12
DELETED, TRUNCATED, REPLACED, TOUCHED = 2, 5, 7, 10
BAD = (DELETED, TRUNCATED, REPLACED, TOUCHED)
HOUR_NS = 3600 * 10**9


def _make(root: Path) -> Path:
    """12 flat-colour PNGs whose mtimes lie an hour back (so the index trusts size + mtime)."""
    then = os.stat(root).st_mtime_ns - HOUR_NS if root.exists() else None
    for i in range(N):
        d = root / "images" / ("a" if i < N // 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"{i:02d}.png"
        Image.fromarray(np.full((32, 32, 3), real_rgb(i), np.uint8)).save(f)
        then = then or f.stat().st_mtime_ns - HOUR_NS
        os.utime(f, ns=(then, then))
    return root / "images"


def _damage(index) -> None:
    paths = [Path(p) for p in index.paths]
    paths[DELETED].unlink()
    data = paths[TRUNCATED].read_bytes()
    paths[TRUNCATED].write_bytes(data[: len(data) // 2])
    st = paths[REPLACED].stat()
    paths[REPLACED].write_bytes(b"\0" * st.st_size)
    os.utime(paths[REPLACED], ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as indexed
    st = paths[TOUCHED].stat()
    os.utime(paths[TOUCHED], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.fixture()
def damaged(tmp_path):
    folder = _make(tmp_path)
    index = build_index(folder, cache_dir=tmp_path / "cache")
    assert [int(Path(p).stem) for p in index.source_paths] == list(range(N))
    store = _write_store(tmp_path / "views.zarr", index.fingerprint)
    _damage(index)
    return index, store


def _stand_in(asked: np.ndarray) -> np.ndarray:
    """What each position holds: itself, or the next usable sample of its batch (cyclically)."""
    good = [b for b, i in enumerate(asked) if i not in BAD]
    return np.array([i if i not in BAD else asked[next((g for g in good if g > b), good[0])]
                     for b, i in enumerate(asked)])


def test_changed_files_are_skipped_reported_once_and_counted(damaged, caplog):
    index, _ = damaged
    loader = DaliMultiCropLoader(index, PLAIN, batch_size=4, rank=0, world_size=1, seed=1)
    with caplog.at_level(logging.WARNING, logger="genssl.data"):
        for epoch in range(3):
            loader.set_epoch(epoch)
            for (crops, idx), asked in zip(loader, loader.batches()):
                expected = _stand_in(asked)
                np.testing.assert_array_equal(idx.numpy(), expected)
                for crop in crops:
                    _same_colour(crop, [real_rgb(i) for i in expected])
    assert loader.read_problems() == {"files_skipped": 4, "views_damaged": 0}
    warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warned) == 4, warned  # once per file, not once per epoch
    report = json.loads(index.report.with_name("read_errors.json").read_text())
    reasons = {int(Path(f["path"]).stem): f["reason"] for f in report["files"]}
    assert report["count"] == 4 and sorted(reasons) == sorted(BAD)
    assert "deleted" in reasons[DELETED] and "size changed" in reasons[TRUNCATED]
    assert "neither a JPEG nor a PNG" in reasons[REPLACED] and "modified" in reasons[TOUCHED]

    # Deterministic given the same damage: a fresh loader, started mid-epoch, gives the same batches.
    loader.set_epoch(1)
    again = DaliMultiCropLoader(index, PLAIN, batch_size=4, rank=0, world_size=1, seed=1)
    again.set_epoch(1)
    for (c1, i1), (c2, i2) in zip(list(loader)[1:], list(again.iter_from(1))):
        assert (i1 == i2).all() and all((x == y).all() for x, y in zip(c1, c2))


def test_gensis_sample_is_replaced_whole_and_a_lost_partner_means_alpha_one(damaged):
    """A skipped real file takes its stand-in's views too (never image j's crop with image i's view);
    a partner whose file is gone turns the interpolated view into image i itself (alpha 1)."""
    loader = GenSISLoader(damaged[0], damaged[1], PLAIN, 4, 0, 1, seed=2, p_gen=1.0, py_workers=0)
    ks, js = loader.view_choice()
    for b, asked in zip(loader, loader.batches()):
        idx = b.indices.numpy()
        np.testing.assert_array_equal(idx, _stand_in(asked))
        partners = PARTNERS[idx, js[idx]]
        lost = np.isin(partners, BAD)
        np.testing.assert_array_equal(b.status.numpy(), np.where(np.isin(asked, BAD), SUBSTITUTED, 0)
                                      | np.where(lost, INTERP_DAMAGED, 0))
        _same_colour(b.crops[0], [real_rgb(i) for i in idx])
        _same_colour(b.crops[1], [synthetic_rgb(i, ks[i]) for i in idx])
        _same_colour(b.interp, [real_rgb(i) if x else interp_rgb(i, js[i]) for i, x in zip(idx, lost)])
        np.testing.assert_array_equal(b.partner_indices.numpy(), np.where(lost, idx, partners))
        np.testing.assert_array_equal(b.alpha.numpy()[lost], np.ones(lost.sum(), np.float32))
    assert loader.read_problems()["files_skipped"] == 4


def test_the_next_index_revalidates_and_quarantines_them(damaged, tmp_path):
    index, _ = damaged
    list(DaliMultiCropLoader(index, PLAIN, batch_size=4, rank=0, world_size=1, seed=1))  # writes read_errors.json
    again = build_index(tmp_path / "images", cache_dir=tmp_path / "cache")
    names = [int(Path(p).stem) for p in again.source_paths]
    assert names == [i for i in range(N) if i not in (DELETED, TRUNCATED, REPLACED)]  # touched: still a fine image
    quarantined = {int(Path(rel).stem): why for rel, why in again.quarantine}
    # REPLACED kept its size and mtime: only read_errors.json made the index look at it again
    assert sorted(quarantined) == [TRUNCATED, REPLACED]
    assert not index.report.with_name("read_errors.json").exists()
    assert index.report.with_name("read_errors.checked.json").is_file()
    for (crops, idx) in DaliMultiCropLoader(again, PLAIN, batch_size=4, rank=0, world_size=1, seed=1):
        _same_colour(crops[0], [real_rgb(names[i]) for i in idx.numpy()])  # nothing skipped now


def test_a_batch_with_no_readable_file_stops_with_a_clear_error(damaged):
    index, _ = damaged
    for p in index.paths:
        Path(p).unlink(missing_ok=True)
    loader = DaliMultiCropLoader(index, PLAIN, batch_size=4, rank=0, world_size=1, seed=1)
    with pytest.raises(Exception, match="none of the 4 files of this batch can be read.*deleted"):
        list(loader)


def test_header_check():
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, "JPEG")
    jpg = np.frombuffer(buf.getvalue(), np.uint8)
    assert image_bytes_problem(jpg) is None
    assert image_bytes_problem(np.concatenate([jpg, np.zeros(5, np.uint8)])) is None  # zero padding after EOI
    assert "end-of-image" in image_bytes_problem(jpg[:-10])
    assert "empty" in image_bytes_problem(jpg[:0])


def test_evaluation_and_dataset_caches_skip_them_too(damaged, tmp_path):
    """The eval loader (k-NN / linear features, latent and embedding caches) reads through the same
    checks: an unreadable file's row holds another sample of its batch under that sample's index, so
    features keyed by index cover exactly the readable files; a dataset cache keeps a row for every
    index (the stand-in's), as training substitutes it."""
    from genssl.data.dali_loader import DaliEvalLoader
    from genssl.engine.distributed import DistInfo
    from genssl.engine.knn import extract_features
    from genssl.generators.autoencoder import LatentCache
    from genssl.generators.training import cached_dataset_tensor

    index, _ = damaged
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # images in [0, 1]: a flat image's mean is its colour / 255
    loader = DaliEvalLoader(index, 16, 4, 0, 1, num_threads=1, mean=mean, std=std)
    colour = MeanColour()
    for images, labels, idx in loader:
        np.testing.assert_allclose(colour(images).numpy(), [rgb01(int(i)) for i in idx], atol=0.003)
        np.testing.assert_array_equal(labels.numpy(), np.asarray(index.labels)[idx.numpy()])
    asked = np.arange(N)
    assert loader.substitutions == {int(a): int(s) for a, s in zip(asked, _stand_in_batches(asked, 4)) if a in BAD}

    feats, _ = extract_features(colour, loader, "cpu", normalize=False)
    np.testing.assert_allclose(feats.numpy(), [rgb01(i) for i in range(N) if i not in BAD], atol=0.003)

    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cache = LatentCache(tmp_path / "cache_run", fingerprint=index.fingerprint, model_hash="colour")
    rows = cached_dataset_tensor(cache, "colour", index, dist, colour, size=16, mean=mean, std=std, batch_size=4,
                                 num_threads=1, log=None)
    np.testing.assert_allclose(rows, [rgb01(int(s)) for s in _stand_in_batches(asked, 4)], atol=0.003)


def rgb01(i: int) -> np.ndarray:
    return np.asarray(real_rgb(i), dtype=np.float64) / 255


def _stand_in_batches(order: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([_stand_in(order[k:k + batch_size]) for k in range(0, len(order), batch_size)])


class MeanColour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, h, w] -> [B, 3]
        return x.mean(dim=(2, 3))


def test_a_subset_keeps_each_files_own_record(damaged):
    """`DatasetIndex.subset` (evaluation splits, foreground samples, previews) carries ``file_stats``
    along with the paths: before, a reordered subset compared each file with another's record and
    skipped intact files as "changed"."""
    from genssl.data.dali_loader import DaliEvalLoader

    index, _ = damaged
    rows = np.array([i for i in range(N) if i not in BAD][::-1])
    part = index.subset(rows)
    loader = DaliEvalLoader(part, 16, 4, 0, 1, num_threads=1, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    seen = np.concatenate([idx.numpy() for _, _, idx in loader])
    assert loader.substitutions == {} and sorted(seen) == list(range(len(rows)))
    np.testing.assert_array_equal(part.file_stats, index.file_stats[rows])
