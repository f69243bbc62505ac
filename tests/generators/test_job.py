"""Generation job: resumable after SIGKILL (byte-identical), disjoint concurrent ranks, contact sheet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from genssl.data.viewstore import ARRAY_NAMES, ViewStoreReader, open_view_store
from genssl.generators.job import contact_sheet, interp_assignment, run_generation

N_SOURCES = 16

# A real (tiny) sampler in a fresh process: same seeds → same weights in every process.
SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np, torch
    torch.set_num_threads(1)
    from genssl.generators.autoencoder import build_autoencoder, tiny_autoencoder_config
    from genssl.generators.eldm import ELDM, tiny_eldm_config
    from genssl.generators.job import run_generation
    from genssl.generators.conditioning import EmbeddingStats
    from genssl.generators.samplers import GuidedSampler

    store, rank, world, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    torch.manual_seed(0)
    eldm = ELDM(tiny_eldm_config())
    ae = build_autoencoder(tiny_autoencoder_config())
    emb = np.random.default_rng(0).standard_normal(({n}, 16)).astype(np.float32)
    sampler = GuidedSampler(eldm, ae, scheduler="dpmpp_2m", steps=3, max_batch=4,
                            condition_stats=EmbeddingStats.from_embeddings(emb))
    levels = (np.arange({n}) % 5) * 100
    rep = run_generation(store, {n}, emb, sampler, fingerprint="fp-test", rank=rank, world_size=world,
                         K=1, J=1, base_seed=123, noise_levels=levels, batch_size=4, shard_size=4,
                         progress=False, on_group_done=lambda idx: time.sleep(pause))
    print("REPORT " + json.dumps(rep))
""").format(n=N_SOURCES)


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(script: Path, store: Path, rank=0, world=1, pause=0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(store), str(rank), str(world), str(pause)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def _arrays(store: Path) -> dict[str, np.ndarray]:
    st = open_view_store(store)
    return {name: st._arrays[name][:] for name in ARRAY_NAMES}


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("job") / "gen.py"
    p.write_text(SCRIPT)
    return p


@pytest.fixture(scope="module")
def reference(script, tmp_path_factory) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("ref") / "views.zarr"
    rep = _finish(_start(script, store))
    assert sorted(rep["written"]) == list(range(N_SOURCES))
    return store, _arrays(store)


def test_interp_assignment():
    for i in range(20):
        p, a = interp_assignment(5, i, 20, J=3)
        assert p.dtype == np.int64 and a.dtype == np.float32 and len(p) == len(a) == 3
        assert (p != i).all() and ((p >= 0) & (p < 20)).all()
        assert set(np.round(a.astype(np.float64), 3).tolist()) <= {0.2, 0.4, 0.6, 0.8}
        p2, a2 = interp_assignment(5, i, 20, J=3)
        assert (p == p2).all() and (a == a2).all()
    allp = np.concatenate([interp_assignment(1, 0, 4, J=64)[0]])
    assert set(allp.tolist()) == {1, 2, 3}
    with pytest.raises(ValueError, match="2 sources"):
        interp_assignment(0, 0, 1, J=1)


@pytest.mark.slow
def test_sigkill_then_rerun_is_byte_identical(script, reference, tmp_path):
    ref_store, ref = reference
    store = tmp_path / "views.zarr"
    p = _start(script, store, pause=0.4)
    deadline = time.time() + 240
    n_done = 0
    while time.time() < deadline:
        if p.poll() is not None:
            pytest.fail(f"generation ended before it could be killed: {p.communicate()[1][-2000:]}")
        if (store / "zarr.json").exists():
            n_done = open_view_store(store).n_done()
            if n_done >= 5:
                break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    missing = open_view_store(store).missing()
    assert 0 < len(missing) < N_SOURCES, "the kill should land mid-run"
    rep = _finish(_start(script, store))
    assert sorted(rep["written"]) == missing                   # only the missing sources are redone
    assert rep["skipped"] == N_SOURCES - len(missing)
    got = _arrays(store)
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert got["done"].all()


@pytest.mark.slow
def test_two_ranks_write_one_store(script, reference, tmp_path):
    _, ref = reference
    store = tmp_path / "views.zarr"
    procs = [_start(script, store, rank=r, world=2, pause=0.05) for r in (0, 1)]
    reps = [_finish(p) for p in procs]
    w0, w1 = set(reps[0]["written"]), set(reps[1]["written"])
    assert not (w0 & w1) and w0 | w1 == set(range(N_SOURCES))   # every source done exactly once
    assert all(i // 4 % 2 == 0 for i in w0) and all(i // 4 % 2 == 1 for i in w1)
    got = _arrays(store)
    assert got["done"].all()
    for name in ARRAY_NAMES:                                   # independent of the number of ranks
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    # the store's contents are what the job promised
    r = ViewStoreReader(store, expect_fingerprint="fp-test")
    assert r.noise_levels(7).tolist() == [200]
    _, partners, alphas = r.interp(7)
    p, a = interp_assignment(123, 7, N_SOURCES, 1)
    assert partners.tolist() == p.tolist() and alphas.tolist() == a.tolist()


def test_in_process_run_skip_and_contact_sheet(tmp_path):
    """A fake sampler: checks the request layout (views then interpolations, levels, seeds) in-process."""
    calls = []

    class Fake:
        image_size = (4, 4)
        settings = {"kind": "fake"}

        def generator_hash(self):
            return "fake-hash"

        def __call__(self, e, seeds, levels):
            calls.append((e.shape[0], list(levels)))
            val = (np.asarray(seeds) % 251).astype(np.uint8)
            return np.broadcast_to(val[:, None, None, None], (len(seeds), 4, 4, 3)).copy()

    emb = np.eye(6, 8, dtype=np.float32)
    store = tmp_path / "v.zarr"
    rep = run_generation(store, 6, emb, Fake(), fingerprint="f", K=2, J=1, noise_levels=100,
                         batch_size=6, shard_size=2, progress=True)
    assert rep["views"] == 18 and sorted(rep["written"]) == list(range(6))
    assert all(n <= 6 for n, _ in calls) and calls[0][1] == [100, 100, 0, 100, 100, 0]
    again = run_generation(store, 6, emb, Fake(), fingerprint="f", K=2, J=1, noise_levels=100,
                           batch_size=6, shard_size=2, progress=False)
    assert again["written"] == [] and again["skipped"] == 6
    with pytest.raises(ValueError, match="fingerprint"):
        run_generation(store, 6, emb, Fake(), fingerprint="other", K=2, J=1, shard_size=2, progress=False)
    png = contact_sheet(store, tmp_path / "sheet.png", n=4)
    from PIL import Image

    im = Image.open(png)
    assert im.size == (3 * (4 + 2) + 2, 4 * (4 + 2) + 2)
