"""DALI loaders on CPU (device_id=None): shapes, ranges, sampling, determinism, resume, eval."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from genssl.data.augment import MultiCropSpec, sample_multicrop_params
from genssl.data.dali_loader import DaliEvalLoader, DaliMultiCropLoader, epoch_batches, eval_shard, multicrop_graph
from genssl.data.index import build_index

SPEC = MultiCropSpec(global_size=32, local_size=16, n_local=3)


def _epoch(loader, start=0):
    out = list(loader.iter_from(start))
    return [c for c, _ in out], [i for _, i in out]


def test_multicrop_batches(shapes, within_normalised_range):
    train, _ = shapes
    loader = DaliMultiCropLoader(train, SPEC, batch_size=8, rank=0, world_size=1, seed=0)
    crops, indices = _epoch(loader)
    assert len(loader) == len(crops) == len(train) // 8
    for batch, idx in zip(crops, indices):
        assert [tuple(c.shape) for c in batch] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
        assert all(c.dtype == torch.float32 and c.device.type == "cpu" for c in batch)
        assert idx.dtype == torch.int64 and idx.shape == (8,)
        for c in batch:
            assert within_normalised_range(c, SPEC.mean, SPEC.std) and c.std() > 0.1
    assert not torch.equal(crops[0][0], crops[0][1])  # two different global views


def test_ranks_partition_the_epoch(shapes):
    train, _ = shapes
    seen = []
    for rank in range(2):
        loader = DaliMultiCropLoader(train, SPEC, batch_size=4, rank=rank, world_size=2, seed=5)
        loader.set_epoch(3)
        _, idx = _epoch(loader)
        assert len(idx) == len(loader) == len(train) // 8
        np.testing.assert_array_equal(torch.cat(idx).numpy(), loader.batches().ravel())
        seen.append(torch.cat(idx).numpy())
    allseen = np.concatenate(seen)
    assert len(set(allseen)) == len(allseen) == len(train)


def test_epoch_batches_shared_order():
    per_rank = [epoch_batches(45, 4, r, 2, seed=0, epoch=0) for r in range(2)]
    assert [b.shape for b in per_rank] == [(5, 4), (5, 4)]  # 45 // 8 global batches, 5 samples dropped
    single = epoch_batches(45, 8, 0, 1, seed=0, epoch=0)  # 2 ranks x 4 == 1 rank x 8, batch by batch
    for k in range(5):
        assert sorted(np.concatenate([per_rank[0][k], per_rank[1][k]])) == sorted(single[k])
    assert len(set(np.concatenate(per_rank).ravel())) == 40
    assert not np.array_equal(epoch_batches(45, 4, 0, 2, 0, 1), per_rank[0])
    assert sorted(np.concatenate([eval_shard(45, r, 2) for r in range(2)])) == list(range(45))
    with pytest.raises(ValueError, match="rank"):
        epoch_batches(45, 4, 2, 2, 0, 0)


def test_deterministic_by_seed_and_epoch(shapes):
    train, _ = shapes
    a = DaliMultiCropLoader(train, SPEC, batch_size=8, rank=0, world_size=1, seed=1)
    b = DaliMultiCropLoader(train, SPEC, batch_size=8, rank=0, world_size=1, seed=1, num_threads=1, prefetch=1)
    ca, ia = _epoch(a)
    cb, ib = _epoch(b)
    assert all(torch.equal(x, y) for x, y in zip(ia, ib))
    assert all(torch.equal(x, y) for ba, bb in zip(ca, cb) for x, y in zip(ba, bb))
    a.set_epoch(1)
    c1, i1 = _epoch(a)
    assert not all(torch.equal(x, y) for x, y in zip(ia, i1))
    a.set_epoch(0)
    c0, i0 = _epoch(a)  # going back reproduces epoch 0 exactly
    assert all(torch.equal(x, y) for ba, bb in zip(ca, c0) for x, y in zip(ba, bb))
    other = DaliMultiCropLoader(train, SPEC, batch_size=8, rank=0, world_size=1, seed=2)
    assert not torch.equal(next(iter(other))[1], ia[0])


def test_iter_from_resumes_exactly(shapes):
    train, _ = shapes
    loader = DaliMultiCropLoader(train, SPEC, batch_size=8, rank=0, world_size=1, seed=4)
    loader.set_epoch(2)
    full_c, full_i = _epoch(loader)
    k = 3
    it = loader.iter_from(1)
    next(it)  # abandon an iteration half-way: the next one must still be exact
    del it
    part_c, part_i = _epoch(loader, k)
    assert len(part_i) == len(full_i) - k
    assert all(torch.equal(x, y) for x, y in zip(part_i, full_i[k:]))
    assert all(torch.equal(x, y) for bp, bf in zip(part_c, full_c[k:]) for x, y in zip(bp, bf))
    assert list(loader.iter_from(len(loader))) == []
    with pytest.raises(ValueError, match="step"):
        loader.iter_from(len(loader) + 1)


def test_iter_from_does_not_read_skipped_batches(shapes, monkeypatch):
    train, _ = shapes
    loader = DaliMultiCropLoader(train, SPEC, batch_size=8, rank=0, world_size=1, seed=4)
    read = []
    import genssl.data.dali_loader as dl
    real = dl.FileReader.batch
    monkeypatch.setattr(dl.FileReader, "batch", lambda self, idx, pool=None: read.append(np.array(idx)) or real(self, idx, pool))
    list(loader.iter_from(4))
    np.testing.assert_array_equal(np.concatenate(read), loader.batches()[4:].ravel())


def test_eval_covers_every_sample_once(shapes, within_normalised_range):
    _, val = shapes
    seen, labels = [], []
    for rank in range(2):
        loader = DaliEvalLoader(val, size=24, batch_size=5, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, lab, idx in batches:
            assert images.shape[1:] == (3, 24, 24) and images.dtype == torch.float32
            assert images.shape[0] == lab.shape[0] == idx.shape[0] <= 5
            assert within_normalised_range(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the default
            seen.append(idx)
            labels.append(lab)
    allseen = torch.cat(seen).numpy()
    assert sorted(allseen) == list(range(len(val)))
    np.testing.assert_array_equal(torch.cat(labels).numpy(), val.labels[allseen])


def test_eval_centre_region():
    sizes = np.array([[400, 300], [32, 32], [20, 40]])
    fake = type("I", (), {"sizes": sizes, "labels": np.zeros(3, np.int64), "__len__": lambda s: 3, "paths": [""] * 3,
                          "report": None, "root": "", "file_stats": None, "ranges": None, "shards": []})()
    loader = DaliEvalLoader(fake, size=32, batch_size=2, rank=0, world_size=1)
    roi = loader.centre_rois(np.arange(3))
    np.testing.assert_allclose(roi[0], [0.0625, 0.171875, 0.9375, 0.828125])  # 262.5 px centre square
    np.testing.assert_allclose(roi[1:], [[0, 0, 1, 1]] * 2)  # tiny: whole image


def test_training_over_corrupt_folder_never_raises(corpus, tmp_path):
    root, expect = corpus
    index = build_index(root, cache_dir=tmp_path / "c")
    spec = MultiCropSpec(global_size=24, local_size=12, n_local=2)
    for epoch in range(2):
        loader = DaliMultiCropLoader(index, spec, batch_size=3, rank=0, world_size=1, seed=0)
        loader.set_epoch(epoch)
        got = [i for _, i in loader]
        assert len(got) == len(index) // 3
    assert len(list(DaliEvalLoader(index, 24, 4, 0, 1))) == -(-len(index) // 4)


def test_multicrop_graph_reusable_on_other_inputs():
    """A later pipeline (e.g. synthetic views) can push already-decoded arrays through the recipe."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.pipeline import Pipeline

    spec = dataclasses.replace(SPEC, n_local=1)
    rng = np.random.default_rng(0)
    views = (rng.random((4, 40, 30, 3)) * 255).astype(np.uint8)
    params = sample_multicrop_params(rng, spec, np.tile([[30, 40]], (4, 1)))
    pipe = Pipeline(batch_size=4, num_threads=1, device_id=None)
    with pipe:
        images = fn.external_source(source=lambda: list(views), batch=True, layout="HWC", dtype=types.UINT8)
        p = fn.external_source(source=lambda: params, batch=True, dtype=types.FLOAT)
        pipe.set_outputs(*multicrop_graph(images, spec, p))
    pipe.build()
    outs = [np.array(o.as_tensor()) for o in pipe.run()]
    assert [o.shape for o in outs] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)]


def test_rejects_bad_arguments(shapes):
    train, _ = shapes
    with pytest.raises(ValueError, match="global batch"):
        DaliMultiCropLoader(train, SPEC, batch_size=len(train), rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        DaliMultiCropLoader(train, SPEC, batch_size=2, rank=3, world_size=2, seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI 'mixed' decoding)")
def test_gpu_pipeline_matches_cpu(shapes):
    train, val = shapes
    cpu = DaliMultiCropLoader(train, SPEC, batch_size=8, rank=0, world_size=1, seed=1)
    gpu = DaliMultiCropLoader(train, SPEC, batch_size=8, rank=0, world_size=1, seed=1, device_id=0)
    for (cc, ci), (gc, gi) in zip(cpu, gpu):
        assert torch.equal(ci, gi) and gi.device.type == "cpu"
        for x, y in zip(cc, gc):
            assert y.device.type == "cuda" and y.dtype == torch.float32 and y.shape == x.shape
            assert (x - y.cpu()).abs().mean() < 0.1  # decoders/resamplers differ in the last bits only
    images, labels, idx = next(iter(DaliEvalLoader(val, 24, 8, 0, 1, device_id=0)))
    assert images.device.type == "cuda" and images.shape == (8, 3, 24, 24)
