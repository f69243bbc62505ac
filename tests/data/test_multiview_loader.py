"""MultiViewLoader (StableRep batches) end to end through DALI (CPU); a crop's colour names its image.

Real image i is a flat colour (10 + 20 i, 0, 0), 32 x 32; its stored view k is (10 + 20 i, 60 + 40 k, 0)
at another size (24 x 40), lossless PNG. With colour jitter, grayscale, blur and solarize off, any crop
of a flat image is that flat colour, so each crop says which source and which view it was cut from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genssl.data.augment import MultiCropSpec
from genssl.data.dali_loader import SUBSTITUTED, VIEW_DAMAGED
from genssl.data.index import build_index
from genssl.data.multiview_loader import MultiViewBatch, MultiViewLoader
from genssl.data.viewstore import create_view_store, open_view_store

N, K, M, VH, VW = 12, 3, 2, 24, 40
PLAIN = MultiCropSpec(global_size=8, n_local=0, jitter_p=0, grayscale_p=0, blur_p_global=(0.0,), solarize_p_global=(0.0,))
DAMAGED = 5


def real_rgb(i):
    return (10 + 20 * i, 0, 0)


def view_rgb(i, k):
    return (10 + 20 * i, 60 + 40 * k, 0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(index, store): 12 flat-colour PNGs in an ImageFolder and a complete store of K=3 views each."""
    root = tmp_path_factory.mktemp("multiview")
    for i in range(N):
        d = root / "images" / ("a" if i < N // 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), real_rgb(i), np.uint8)).save(d / f"{i:02d}.png")
    index = build_index(root / "images", cache_dir=root / "cache")
    assert [int(Path(p).stem) for p in index.source_paths] == list(range(N))
    st = create_view_store(root / "views.zarr", N, K, 0, VH, VW, {"fingerprint": index.fingerprint, "generator_hash": "t"},
                           shard_size=4, view_format="png")
    for i in range(N):
        st.write_source(i, np.stack([np.full((VH, VW, 3), view_rgb(i, k), np.uint8) for k in range(K)]), np.zeros(K),
                        durable=False)
    return index, root / "views.zarr"


@pytest.fixture()
def damaged(world, tmp_path):
    """(index, a copy of the store whose source 5 views are bit-flipped)."""
    index, store = world
    copy = tmp_path / "views.zarr"
    shutil.copytree(store, copy)
    f, off, n = open_view_store(copy).chunk_location("views", DAMAGED)
    data = bytearray(f.read_bytes())
    data[off + n // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return index, copy


def _loader(pair, **kw) -> MultiViewLoader:
    index, store = pair
    args = dict(spec=PLAIN, batch_size=4, rank=0, world_size=1, seed=3, m=M, index=index)
    args.update(kw)
    return MultiViewLoader(store, **args)


def _colours(x: torch.Tensor) -> np.ndarray:
    """[B,3,h,w] normalised crops of flat images -> [B,3] RGB (asserting each crop is flat)."""
    mean = np.asarray(PLAIN.mean)[None, :, None, None] * 255
    std = np.asarray(PLAIN.std)[None, :, None, None] * 255
    px = x.numpy().astype(np.float64) * std + mean
    rgb = px.mean(axis=(2, 3))
    assert np.abs(px - rgb[:, :, None, None]).max() < 0.6, "crop of a flat image is not flat"
    return rgb


def _same_colour(x, expected):
    np.testing.assert_allclose(_colours(x), np.asarray(expected, np.float64), atol=0.6)


def _equal(a: MultiViewBatch, b: MultiViewBatch) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a.crops, b.crops)) and torch.equal(a.indices, b.indices)
            and torch.equal(a.real, b.real) and torch.equal(a.status, b.status))


def test_every_source_brings_all_its_m_views(world):
    loader = _loader(world)
    choices = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == N // 4
        np.testing.assert_array_equal(torch.stack([b.indices for b in batches]).numpy(), loader.batches())
        for b in batches:
            idx = b.indices.numpy()
            choice = loader.view_choice(idx)
            assert choice.shape == (4, M) and all(len(set(row)) == M for row in choice)  # m distinct views
            assert [tuple(c.shape) for c in b.crops] == [(4, 3, 8, 8)] * M
            for c, crop in enumerate(b.crops):
                _same_colour(crop, [view_rgb(i, choice[s, c]) for s, i in enumerate(idx)])
            assert not b.real.any() and not b.status.any()
            crops, indices = b  # unpacks like the other loaders' batches
            assert crops is b.crops and indices is b.indices
        choices.append(loader.view_choice(np.arange(N)))
    assert not np.array_equal(choices[0], choices[1])  # the m of K views change by epoch ...
    np.testing.assert_array_equal(loader.view_choice(np.arange(N), epoch=1), choices[1])  # ... as a function of it


def test_real_plus_synthetic_puts_the_real_image_in_slot_0(world):
    loader = _loader(world, mode="real+synthetic")
    for b in loader:
        idx = b.indices.numpy()
        assert len(b.crops) == M + 1 and b.real[:, 0].all() and not b.real[:, 1:].any()
        _same_colour(b.crops[0], [real_rgb(i) for i in idx])
        choice = loader.view_choice(idx)
        for c in range(M):
            _same_colour(b.crops[1 + c], [view_rgb(i, choice[s, c]) for s, i in enumerate(idx)])


def test_ranks_split_each_global_batch_by_source(world):
    one = _loader(world, batch_size=4)
    ranks = [_loader(world, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for x in [one, *ranks]:
            x.set_epoch(epoch)
        per_rank = [list(r) for r in ranks]
        for k, b in enumerate(one):
            parts = [per_rank[r][k] for r in range(2)]
            got = np.concatenate([p.indices.numpy() for p in parts])
            assert len(set(got)) == 4 and set(got) == set(b.indices.numpy())  # disjoint, and the 1-rank batch
            for p in parts:  # every view of a source is on the rank that has the source
                choice = one.view_choice(p.indices.numpy())
                for c in range(M):
                    _same_colour(p.crops[c], [view_rgb(i, choice[s, c]) for s, i in enumerate(p.indices.numpy())])


def test_deterministic_and_resumes_at_any_step(world):
    a, b = _loader(world, batch_size=2), _loader(world, batch_size=2)
    for x in (a, b):
        x.set_epoch(4)
    full = list(a)
    assert all(_equal(x, y) for x, y in zip(full, b))
    assert all(_equal(x, y) for x, y in zip(full[3:], b.iter_from(3)))
    assert list(b.iter_from(len(b))) == []
    with pytest.raises(ValueError, match="step must be in"):
        b.iter_from(len(b) + 1)
    c = _loader(world, batch_size=2, seed=4)
    c.set_epoch(4)
    assert not all(_equal(x, y) for x, y in zip(full, c))  # another seed, other batches


def test_damaged_views_fall_back_to_the_real_image_and_are_reported(damaged):
    index, store = damaged
    for mode in ("synthetic", "real+synthetic"):
        loader = _loader(damaged, mode=mode, batch_size=N)  # one step: every source
        (b,) = list(loader)
        idx = b.indices.numpy()
        s = int(np.flatnonzero(idx == DAMAGED)[0])
        assert b.status[s] == VIEW_DAMAGED and b.real[s].all()
        assert (b.status[np.arange(N) != s] == 0).all()
        first = 1 if mode == "real+synthetic" else 0
        choice = loader.view_choice(idx)
        for c in range(M):  # the damaged source's view slots are crops of its real image, the rest untouched
            _same_colour(b.crops[first + c], [real_rgb(i) if i == DAMAGED else view_rgb(i, choice[r, c])
                                              for r, i in enumerate(idx)])
        assert loader.read_problems()["views_damaged"] == 1
    report = json.loads(Path(str(store) + ".damage.json").read_text())
    assert [r["source"] for r in report["sources"]] == [DAMAGED]


def test_damaged_views_without_real_images_borrow_another_source(damaged):
    index, store = damaged
    loader = _loader(damaged, index=None, expect_fingerprint=index.fingerprint, batch_size=N)
    (b,) = list(loader)
    asked = loader.batches()[0]
    s = int(np.flatnonzero(asked == DAMAGED)[0])
    sub = asked[(s + 1) % N]
    assert b.indices[s] == sub and b.status[s] == SUBSTITUTED and not b.real.any()  # the stand-in is whole
    choice = loader.view_choice([sub])[0]
    for c in range(M):  # both rows hold the stand-in's views, under its label
        _same_colour(b.crops[c][[s]], [view_rgb(sub, choice[c])])


def test_errors_name_the_fix(world):
    index, store = world
    with pytest.raises(ValueError, match="fewer than m=4"):
        _loader(world, m=4)
    with pytest.raises(ValueError, match="needs the real images"):
        _loader(world, index=None, mode="real+synthetic", expect_fingerprint=index.fingerprint)
    with pytest.raises(ValueError, match="crops.n_local=0"):
        _loader(world, spec=MultiCropSpec(global_size=8, n_local=2))
    with pytest.raises(ValueError, match="do not belong"):
        _loader(world, index=None, expect_fingerprint="other")
