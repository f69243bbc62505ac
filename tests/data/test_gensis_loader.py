"""GenSISLoader end to end through DALI (CPU): every crop is traced back to its source by colour.

Real image i is a flat colour (10 + 20 i, 0, 0); its synthetic view k is (10 + 20 i, 100 + 40 k, 0)
and its interpolated view j is (10 + 20 i, 0, 100 + 40 j), at another size (24 x 40) than the real
images (32 x 32). With colour jitter, grayscale, blur and solarize off, any crop of a flat image is
that flat colour, so a crop's colour names the image it was cut from. The shared store holds lossless
PNG views (exact colours); a JPEG store (the default format) is checked to within JPEG's rounding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genssl.data.augment import MultiCropSpec, sample_multicrop_params
from genssl.data.dali_loader import DaliMultiCropLoader
from genssl.data.gensis_loader import GenSISBatch, GenSISLoader
from genssl.data.index import build_index
from genssl.data.viewstore import ViewStoreReader, create_view_store

N, K, J, VH, VW = 12, 2, 2, 24, 40
PLAIN = MultiCropSpec(global_size=16, local_size=8, n_local=2, jitter_p=0, grayscale_p=0, blur_p_global=(0.0,),
                      blur_p_local=0, solarize_p_global=(0.0,))
PARTNERS = np.array([[(5 * i + j + 1) % N for j in range(J)] for i in range(N)])  # never i itself
ALPHAS = np.array([[(0.2, 0.4, 0.6, 0.8)[(i + j) % 4] for j in range(J)] for i in range(N)], dtype=np.float32)


def real_rgb(i):
    return (10 + 20 * i, 0, 0)


def synthetic_rgb(i, k):
    return (10 + 20 * i, 100 + 40 * k, 0)


def interp_rgb(i, j):
    return (10 + 20 * i, 0, 100 + 40 * j)


def _write_store(path: Path, fingerprint: str, skip: tuple[int, ...] = (), view_format: str = "png") -> Path:
    st = create_view_store(path, N, K, J, VH, VW, {"fingerprint": fingerprint, "generator_hash": "test"}, shard_size=4,
                           view_format=view_format)
    for i in range(N):
        if i in skip:
            continue
        views = np.stack([np.full((VH, VW, 3), synthetic_rgb(i, k), np.uint8) for k in range(K)])
        interp = np.stack([np.full((VH, VW, 3), interp_rgb(i, j), np.uint8) for j in range(J)])
        st.write_source(i, views, np.zeros(K), interp, PARTNERS[i], ALPHAS[i], durable=False)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(index, store path): 12 flat-colour PNGs in an ImageFolder, and a complete view store."""
    root = tmp_path_factory.mktemp("gensis")
    for i in range(N):
        d = root / "images" / ("a" if i < N // 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), real_rgb(i), np.uint8)).save(d / f"{i:02d}.png")
    index = build_index(root / "images", cache_dir=root / "cache")
    assert [int(Path(p).stem) for p in index.source_paths] == list(range(N))  # index position == colour id
    return index, _write_store(root / "views.zarr", index.fingerprint)


def _colours(x: torch.Tensor, spec: MultiCropSpec = PLAIN) -> np.ndarray:
    """[B,3,h,w] normalised crops of flat images -> [B,3] RGB (asserting each crop is flat)."""
    mean = np.asarray(spec.mean)[None, :, None, None] * 255
    std = np.asarray(spec.std)[None, :, None, None] * 255
    px = x.numpy().astype(np.float64) * std + mean
    rgb = px.mean(axis=(2, 3))
    assert np.abs(px - rgb[:, :, None, None]).max() < 0.6, "crop of a flat image is not flat"
    return rgb


def _same_colour(x: torch.Tensor, expected, atol: float = 0.6) -> None:
    np.testing.assert_allclose(_colours(x), np.asarray(expected, dtype=np.float64), atol=atol)


def _loader(world, **kw) -> GenSISLoader:
    index, store = world
    args = dict(spec=PLAIN, batch_size=4, rank=0, world_size=1, seed=3, p_gen=0.5, py_workers=0)
    args.update(kw)
    return GenSISLoader(index, store, **args)


def _equal(a: GenSISBatch, b: GenSISBatch) -> bool:
    fields = [f.name for f in dataclasses.fields(GenSISBatch) if f.name != "crops"]
    return (len(a.crops) == len(b.crops) and all(torch.equal(x, y) for x, y in zip(a.crops, b.crops))
            and all((getattr(a, f) is None and getattr(b, f) is None) or torch.equal(getattr(a, f), getattr(b, f))
                    for f in fields))


def test_every_crop_comes_from_the_right_image(world):
    index, _ = world
    loader = _loader(world)
    chosen_k = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        ks, js = loader.view_choice()
        chosen_k.append(ks.copy())
        batches = list(loader)
        assert len(batches) == len(loader) == N // 4
        np.testing.assert_array_equal(torch.stack([b.indices for b in batches]).numpy(), loader.batches())
        for step, b in enumerate(batches):
            idx = b.indices.numpy()
            assert [tuple(c.shape) for c in b.crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
            assert b.interp.shape == b.partner.shape == (4, 3, 16, 16)
            assert b.alpha.dtype == torch.float32 and b.partner_indices.dtype == torch.int64
            assert b.from_gen.dtype == torch.bool and b.indices.dtype == torch.int64
            real = [real_rgb(i) for i in idx]
            for c, crop in enumerate(b.crops):
                if c != 1:
                    _same_colour(crop, real)
            gen = b.from_gen.numpy()
            _same_colour(b.crops[1], [synthetic_rgb(i, ks[i]) if g else real_rgb(i) for i, g in zip(idx, gen)])
            _same_colour(b.interp, [interp_rgb(i, js[i]) for i in idx])
            partners = PARTNERS[idx, js[idx]]
            np.testing.assert_array_equal(b.partner_indices.numpy(), partners)
            _same_colour(b.partner, [real_rgb(p) for p in partners])
            np.testing.assert_array_equal(b.alpha.numpy(), ALPHAS[idx, js[idx]])
            # the decision is drawn on the host, from the batch's generator, right after the crop parameters
            rng = np.random.default_rng([3, epoch, 0, step])
            sample_multicrop_params(rng, PLAIN, index.sizes[idx])
            np.testing.assert_array_equal(gen, rng.random(4) < 0.5)
            crops, indices = b  # unpacks like a DaliMultiCropLoader batch
            assert crops is b.crops and indices is b.indices
    assert not all(np.array_equal(chosen_k[0], k) for k in chosen_k[1:])  # the view choice changes by epoch
    np.testing.assert_array_equal(loader.view_choice(2)[0], chosen_k[2])  # ... and is a function of it


def test_from_gen_rate_is_p_gen(world):
    loader = _loader(world, batch_size=N, p_gen=0.3)  # one step per epoch
    flags = []
    for epoch in range(10):
        loader.set_epoch(epoch)
        flags += [b.from_gen for b in loader]
    rate = torch.cat(flags).float().mean().item()
    assert abs(rate - 0.3) < 0.13, rate  # 120 draws: 3 standard deviations


def test_p_gen_extremes(world):
    for p, expected in ((1.0, True), (0.0, False)):
        loader = _loader(world, p_gen=p)
        ks = loader.view_choice()[0]
        colour = synthetic_rgb if expected else (lambda i, k: real_rgb(i))
        for b in loader:
            assert bool(b.from_gen.all()) is expected and bool(b.from_gen.any()) is expected
            _same_colour(b.crops[1], [colour(i, ks[i]) for i in b.indices.numpy()])


def test_same_augmentation_as_the_vanilla_loader(world):
    """The real crops are DaliMultiCropLoader's, bit for bit (same graph, same parameter stream);
    with p_gen > 0 only the synthetic slot-1 crops differ."""
    index, store = world
    spec = MultiCropSpec(global_size=16, local_size=8, n_local=2)  # every augmentation on
    vanilla = list(DaliMultiCropLoader(index, spec, 4, 0, 1, seed=5))
    plain = list(GenSISLoader(index, None, spec, 4, 0, 1, seed=5, p_gen=0.0, interpolation=False, py_workers=0))
    full = list(GenSISLoader(index, store, spec, 4, 0, 1, seed=5, p_gen=0.5, py_workers=0))
    assert len(vanilla) == len(plain) == len(full) == N // 4
    for (crops, idx), a, b in zip(vanilla, plain, full):
        assert a.interp is None and a.alpha is None and not a.from_gen.any()
        assert torch.equal(idx, a.indices) and torch.equal(idx, b.indices)
        assert all(torch.equal(x, y) for x, y in zip(crops, a.crops))
        real = ~b.from_gen
        assert all(torch.equal(crops[c], b.crops[c]) for c in range(len(crops)) if c != 1)
        assert torch.equal(crops[1][real], b.crops[1][real])
        assert all(not torch.equal(crops[1][s], b.crops[1][s]) for s in torch.nonzero(b.from_gen).ravel())
    assert any(b.from_gen.any() and not b.from_gen.all() for b in full)  # both kinds were checked


def test_iter_from_and_resume_are_exact(world):
    loader = _loader(world)
    loader.set_epoch(2)
    full = list(loader)
    it = loader.iter_from(1)
    next(it)  # abandoned half-way
    del it
    assert all(_equal(x, y) for x, y in zip(list(loader.iter_from(1)), full[1:]))
    assert len(list(loader.iter_from(2))) == 1
    for kw in ({}, {"num_threads": 1, "prefetch": 1, "read_threads": 1}):  # a restarted process at (2, 2)
        fresh = _loader(world, **kw)
        fresh.set_epoch(2)
        assert _equal(next(iter(fresh.iter_from(2))), full[2])
    assert list(loader.iter_from(len(loader))) == []
    with pytest.raises(ValueError, match="step"):
        loader.iter_from(len(loader) + 1)


def test_parallel_workers_give_the_same_batches(world):
    """DALI parallel external source (2 spawned workers, each building whole batches) == the
    threaded reader, in order, including a start mid-epoch."""
    threaded = _loader(world)
    parallel = _loader(world, py_workers=2)
    for loader in (threaded, parallel):
        loader.set_epoch(1)
    want = list(threaded)[1:]
    got = list(parallel.iter_from(1))
    assert len(got) == len(want) == 2 and all(_equal(x, y) for x, y in zip(got, want))


def test_interpolation_off_reads_no_interpolated_views(world, monkeypatch):
    def boom(self, i):
        raise AssertionError("interp read with interpolation=False")

    monkeypatch.setattr(ViewStoreReader, "interp", boom)
    monkeypatch.setattr(ViewStoreReader, "encoded_interp", boom)
    for b in _loader(world, interpolation=False):
        assert b.interp is None and b.partner is None and b.alpha is None and b.partner_indices is None
        assert len(b.crops) == PLAIN.n_crops


def test_jpeg_views_are_decoded_by_dali_like_real_images(world, tmp_path, monkeypatch):
    """The default store format: DALI gets the JPEG bytes (no host decode) and its crops carry the
    views' colours to within JPEG's rounding of a flat colour."""
    index, _ = world
    store = _write_store(tmp_path / "jpeg.zarr", index.fingerprint, view_format="jpeg")
    assert ViewStoreReader(store).encoded_views(0)[0][:2] == b"\xff\xd8"

    def no_host_decode(self, i):
        raise AssertionError("the loader decoded a view on the host")

    monkeypatch.setattr(ViewStoreReader, "views", no_host_decode)
    monkeypatch.setattr(ViewStoreReader, "interp", no_host_decode)
    loader = _loader((index, store), p_gen=1.0)
    ks, js = loader.view_choice()
    for b in loader:
        idx = b.indices.numpy()
        assert b.from_gen.all()
        _same_colour(b.crops[0], [real_rgb(i) for i in idx])
        _same_colour(b.crops[1], [synthetic_rgb(i, ks[i]) for i in idx], atol=2.5)
        _same_colour(b.interp, [interp_rgb(i, js[i]) for i in idx], atol=2.5)


def test_store_problems_are_clear_errors(world, tmp_path):
    index, store = world
    incomplete = _write_store(tmp_path / "partial.zarr", index.fingerprint, skip=(3, 7))
    with pytest.raises(ValueError, match=r"2 of 12 sources are not generated.*\[3, 7\].*rerun the generation job"):
        _loader((index, incomplete))
    other = _write_store(tmp_path / "other.zarr", "another-dataset", skip=tuple(range(N)))
    with pytest.raises(ValueError, match="fingerprint.*rerun the generation job"):
        _loader((index, other))
    with pytest.raises(ValueError, match="fingerprint"):
        _loader(world, expect_fingerprint="not-this-one")
    with pytest.raises(ValueError, match="generation job"):
        _loader((index, tmp_path / "nowhere.zarr"))
    with pytest.raises(ValueError, match="store_path"):
        _loader((index, None))
    with pytest.raises(ValueError, match="n_global >= 2"):
        _loader(world, spec=dataclasses.replace(PLAIN, n_global=1))
    with pytest.raises(ValueError, match="p_gen"):
        _loader(world, p_gen=1.5)
    old = tmp_path / "old.zarr"  # a schema-1 store: the message says how to convert it
    old.mkdir()
    (old / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"schema_version": 1}}')
    with pytest.raises(ValueError, match=r"schema 1.*python -m genssl.data.convert_views"):
        _loader((index, old))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI 'mixed' decoding)")
def test_gpu_pipeline_matches_cpu(world):
    for py_workers in (0, 2):
        cpu, gpu = _loader(world, py_workers=py_workers), _loader(world, py_workers=py_workers, device_id=0)
        for a, b in zip(cpu, gpu):
            for f in ("indices", "from_gen", "alpha", "partner_indices"):
                assert getattr(b, f).device.type == "cpu" and torch.equal(getattr(a, f), getattr(b, f))
            for x, y in zip(a.crops + [a.interp, a.partner], b.crops + [b.interp, b.partner]):
                assert y.device.type == "cuda" and y.dtype == torch.float32 and y.shape == x.shape
                assert (x - y.cpu()).abs().mean() < 0.1  # decoders/resamplers differ in the last bits only
