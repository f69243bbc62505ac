"""Damaged view stores: the training loader falls back to real crops, the generation job repairs.

The loader half reuses test_gensis_loader's flat-colour world (a crop's colour names the image it was
cut from); the repair half runs `run_generation` with a deterministic numpy sampler and checks that
verify + regenerate gives back the undamaged store, byte for byte.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from genssl.data.augment import MultiCropSpec
from genssl.data.dali_loader import INTERP_DAMAGED, VIEW_DAMAGED
from genssl.data.gensis_loader import GenSISLoader
from genssl.data import viewstore as vs
from genssl.data.viewstore import ViewStoreCorruptError, ViewStoreReader, open_view_store
from genssl.generators.job import format_verification, run_generation, verify_store
from genssl.tests.data.test_gensis_loader import (PARTNERS, PLAIN, _equal, _same_colour, interp_rgb, real_rgb, synthetic_rgb,
                                                  world)  # noqa: F401  (world is a fixture)

VIEW_SOURCE, INTERP_SOURCE = 5, 9  # the damaged sources of `damaged`


def _flip(path: Path, at: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    data[at + 1] ^= 0x5A
    path.write_bytes(bytes(data))


def _flip_source(store, name: str, i: int) -> None:
    """Flip bytes inside source i's own inner chunk of its shard file (its neighbours stay whole)."""
    f, off, length = store.chunk_location(name, i)
    _flip(f, off + length // 2)


def _drop_source(store, name: str, i: int) -> None:
    """Delete source i's inner chunk from its shard: its index entry says "no data", with a valid crc32c
    (the shard counterpart of deleting a chunk file)."""
    f, _, _ = store.chunk_location(name, i)
    data = bytearray(f.read_bytes())
    n_inner = store.shard_size // store.sources_per_chunk
    start = len(data) - (16 * n_inner + 4)
    entry = start + 16 * store._inner(i)
    data[entry:entry + 16] = b"\xff" * 16
    data[-4:] = vs._crc(bytes(data[start:-4]))
    f.write_bytes(bytes(data))


@pytest.fixture()
def damaged(world, tmp_path):
    """(index, a copy of the store with source 5's views chunk bit-flipped and source 9's interp chunk deleted)."""
    index, store = world
    copy = tmp_path / "views.zarr"
    shutil.copytree(store, copy)
    st = open_view_store(copy)
    _flip_source(st, "views", VIEW_SOURCE)
    _drop_source(st, "interp", INTERP_SOURCE)
    return index, copy


def _loader(pair, **kw) -> GenSISLoader:
    index, store = pair
    args = dict(spec=PLAIN, batch_size=4, rank=0, world_size=1, seed=3, p_gen=1.0, py_workers=0)
    args.update(kw)
    return GenSISLoader(index, store, **args)


def _check_epoch(loader: GenSISLoader) -> None:
    """Every sample of the epoch holds what it should, given the damage of `damaged`."""
    ks, js = loader.view_choice()
    for b in loader:
        idx = b.indices.numpy()
        status = b.status.numpy()
        view_lost, interp_lost = idx == VIEW_SOURCE, idx == INTERP_SOURCE
        np.testing.assert_array_equal(status, np.where(view_lost, VIEW_DAMAGED, 0) | np.where(interp_lost, INTERP_DAMAGED, 0))
        np.testing.assert_array_equal(b.from_gen.numpy(), ~view_lost)  # p_gen = 1: only the damaged one is real
        _same_colour(b.crops[0], [real_rgb(i) for i in idx])
        _same_colour(b.crops[1], [real_rgb(i) if i == VIEW_SOURCE else synthetic_rgb(i, ks[i]) for i in idx])
        # alpha 1 and the partner image i itself: the interpolation at alpha 1 is image i
        partners = np.where(interp_lost, idx, PARTNERS[idx, js[idx]])
        np.testing.assert_array_equal(b.partner_indices.numpy(), partners)
        assert b.alpha.numpy()[interp_lost].tolist() == [1.0] * int(interp_lost.sum())
        _same_colour(b.interp, [real_rgb(i) if i == INTERP_SOURCE else interp_rgb(i, js[i]) for i in idx])
        _same_colour(b.partner, [real_rgb(p) for p in partners])


def test_damaged_views_fall_back_to_real_crops_and_are_reported_once(damaged, caplog):
    index, store = damaged
    loader = _loader(damaged)
    with caplog.at_level(logging.WARNING, logger="genssl.data"):
        for epoch in range(3):  # every source is met every epoch: still one report each
            loader.set_epoch(epoch)
            _check_epoch(loader)
    assert loader.read_problems() == {"files_skipped": 0, "views_damaged": 2}
    warned = [r.getMessage() for r in caplog.records if "view store" in r.getMessage()]
    assert len(warned) == 2, warned
    assert any(f"source {VIEW_SOURCE} " in w and "checksum" in w and "verify=true" in w for w in warned)
    assert any(f"source {INTERP_SOURCE} " in w and "missing" in w for w in warned)
    report = json.loads(Path(str(store) + ".damage.json").read_text())
    assert report["store"] == str(store) and report["count"] == 2
    rows = {r["source"]: r for r in report["sources"]}
    assert rows[VIEW_SOURCE]["array"] == "synthetic view" and "views" in rows[VIEW_SOURCE]["reason"]
    assert rows[INTERP_SOURCE]["array"] == "interpolated view" and "interp" in rows[INTERP_SOURCE]["reason"]

    # A new run (a new loader) reports them again, once.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genssl.data"):
        list(_loader(damaged))
    assert len([r for r in caplog.records if "view store" in r.getMessage()]) == 2


def test_fallback_is_the_real_crop_bit_for_bit_and_resume_is_exact(damaged):
    """With every augmentation on: a damaged sample's slot-1 crop (and interpolated crop) is exactly
    the real crop the vanilla stream draws for it, and batches stay a pure function of the step."""
    index, _ = damaged
    spec = MultiCropSpec(global_size=16, local_size=8, n_local=2)
    vanilla = list(GenSISLoader(index, None, spec, 4, 0, 1, seed=5, p_gen=0.0, interpolation=False, py_workers=0))
    loader = _loader(damaged, spec=spec, seed=5)
    full = list(loader)
    for a, b in zip(vanilla, full):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.crops[0], b.crops[0])
        for s, i in enumerate(b.indices.tolist()):
            if i == VIEW_SOURCE:
                assert torch.equal(b.crops[1][s], a.crops[1][s])
            if i == INTERP_SOURCE:
                assert torch.equal(b.interp[s], a.crops[1][s])
            if i not in (VIEW_SOURCE, INTERP_SOURCE):
                assert not torch.equal(b.crops[1][s], a.crops[1][s])  # synthetic
    assert all(_equal(x, y) for x, y in zip(list(loader.iter_from(1)), full[1:]))
    fresh = _loader(damaged, spec=spec, seed=5, read_threads=1)
    assert all(_equal(x, y) for x, y in zip(list(fresh.iter_from(2)), full[2:]))


@pytest.mark.slow
def test_parallel_workers_fall_back_and_report_the_same(damaged):
    """Spawned DALI workers read the views: same batches, counts in the training process, one report."""
    store = damaged[1]
    threaded, parallel = _loader(damaged), _loader(damaged, py_workers=2)
    assert all(_equal(x, y) for x, y in zip(list(threaded), list(parallel)))
    assert parallel.read_problems() == {"files_skipped": 0, "views_damaged": 2}
    assert json.loads(Path(str(store) + ".damage.json").read_text())["count"] == 2


def test_a_damaged_done_chunk_makes_its_shard_real(damaged):
    """shard_size 4: sources 4..7 lose their done flags. The strict reader refuses the store; the
    loader keeps training, every sample of that shard real."""
    index, store = damaged
    _flip(open_view_store(store)._chunk_file("done", 4), at=1)
    with pytest.raises(ViewStoreCorruptError, match="'done'"):
        ViewStoreReader(store)
    loader = _loader(damaged)
    for b in loader:
        idx = b.indices.numpy()
        shard1 = (idx >= 4) & (idx < 8)
        np.testing.assert_array_equal(b.from_gen.numpy(), ~shard1 & (idx != VIEW_SOURCE))
        assert ((b.status.numpy() & INTERP_DAMAGED) != 0).tolist() == (shard1 | (idx == INTERP_SOURCE)).tolist()
        _same_colour(b.crops[1], [real_rgb(i) if s or i == VIEW_SOURCE else synthetic_rgb(i, loader.view_choice()[0][i])
                                  for i, s in zip(idx, shard1)])
    assert loader.read_problems()["views_damaged"] == 5  # 4..7 and 9


# ---------------------------------------------------------------------------------------------
# verify + regenerate

SOURCES, H, W = 12, 8, 8


class _Sampler:
    """Deterministic in (embedding, seed): what `run_generation` needs of a sampler."""

    image_size = (H, W)
    settings = {"kind": "test"}

    def generator_hash(self) -> str:
        return "test-sampler"

    def __call__(self, e, seeds, levels):
        out = []
        for emb, seed, level in zip(e.numpy(), seeds, levels):
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(level)])
            out.append((rng.integers(0, 256, (H, W, 3)) + 7 * emb.sum()).astype(np.uint8))
        return np.stack(out)


def _generate(store: Path, **kw) -> dict:
    emb = np.random.default_rng(0).standard_normal((SOURCES, 4)).astype(np.float32)
    return run_generation(store, SOURCES, emb, _Sampler(), fingerprint="fp", K=2, J=1, base_seed=1,
                          noise_levels=np.arange(SOURCES) % 3, batch_size=6, shard_size=4, progress=False,
                          durable=False, **kw)


def _files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("gen") / "views.zarr"
    _generate(store)
    return store


def test_verify_finds_every_kind_of_damage_and_regeneration_restores_the_store(generated, tmp_path):
    assert verify_store(generated, repair=False)["damaged"] == []
    store = tmp_path / "views.zarr"
    shutil.copytree(generated, store)
    st = open_view_store(store)
    _flip_source(st, "views", 1)                                     # crc32c of one inner chunk
    _drop_source(st, "interp", 2)                                    # done source without its chunk
    f = st._chunk_file("views", 10)
    f.write_bytes(f.read_bytes()[:100])                              # truncated: the whole shard 8..11
    _flip(st._chunk_file("interp_alpha", 4), at=0)                   # per-shard chunk: sources 4..7
    before = _files(store)

    looked = verify_store(store, repair=False)
    assert _files(store) == before  # repair off: nothing touched
    found = {(d["array"], tuple(d["sources"])) for d in looked["damaged"]}
    assert found == {("views", (1, 2)), ("interp", (2, 3)), ("views", (8, 12)), ("interp_alpha", (4, 8))}
    reasons = {d["array"] + str(d["sources"][0]): d["reason"] for d in looked["damaged"]}
    assert "crc32c" in reasons["views1"] and "missing" in reasons["interp2"] and "truncated" in reasons["views8"] and "shard index" in reasons["views8"]

    # Two ranks: each checks and repairs its own shards (shard s belongs to rank s % 2).
    reports = [verify_store(store, rank, 2, fingerprint="fp", generator_hash="test-sampler") for rank in range(2)]
    lost = [1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(i for r in reports for i in r["invalidated"]) == lost
    assert sorted(open_view_store(store).missing()) == lost
    assert not f.exists() and st._chunk_file("views", 1).exists()  # unreadable shard deleted; one bad chunk kept
    summary = format_verification(store, reports)
    assert "4 damaged chunk(s)" in summary and "source 1:" in summary and "sources 8..11" in summary

    report = _generate(store)
    assert sorted(report["written"]) == lost
    assert _files(store) == _files(generated)  # byte for byte the undamaged store
    assert verify_store(store)["damaged"] == []


def test_a_damaged_done_chunk_regenerates_its_shard(generated, tmp_path):
    store = tmp_path / "views.zarr"
    shutil.copytree(generated, store)
    _flip(open_view_store(store)._chunk_file("done", 8), at=0)
    rep = verify_store(store)
    assert [(d["array"], d["sources"]) for d in rep["damaged"]] == [("done", [8, 12])]
    assert rep["invalidated"] == [8, 9, 10, 11] and open_view_store(store).missing() == [8, 9, 10, 11]
    _generate(store)
    assert _files(store) == _files(generated)


def test_verify_refuses_a_store_of_other_data(generated):
    with pytest.raises(ValueError, match="fingerprint"):
        verify_store(generated, fingerprint="other-data")


def test_reads_detect_a_missing_chunk_instead_of_returning_zeros(generated, tmp_path):
    store = tmp_path / "views.zarr"
    shutil.copytree(generated, store)
    st = open_view_store(store)
    _drop_source(st, "views", 3)
    assert st.views(2).any()
    with pytest.raises(ViewStoreCorruptError, match=r"'views'.*source 3.*missing.*verify=true"):
        ViewStoreReader(store).views(3)
    st._chunk_file("views", 3).unlink()                               # the whole shard file
    with pytest.raises(ViewStoreCorruptError, match=r"'views'.*source 2.*missing.*verify=true"):
        ViewStoreReader(store).views(2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI 'mixed' decoding)")
def test_gpu_fallback_matches_cpu(damaged):
    """The fallback conditionals on GPU data ('mixed' decoding): same samples, same flags as on the CPU."""
    for py_workers in (0, 2):
        cpu, gpu = _loader(damaged, py_workers=py_workers), _loader(damaged, py_workers=py_workers, device_id=0)
        for a, b in zip(cpu, gpu):
            for f in ("indices", "from_gen", "alpha", "partner_indices", "status"):
                assert torch.equal(getattr(a, f), getattr(b, f))
            for x, y in zip(a.crops + [a.interp, a.partner], b.crops + [b.interp, b.partner]):
                assert y.device.type == "cuda" and (x - y.cpu()).abs().mean() < 0.1
        assert gpu.read_problems() == {"files_skipped": 0, "views_damaged": 2}
