"""The generator recipes end to end on the CPU: autoencoder, E-LDM (with its own autoencoder) and view
generation under torchrun with 2 ranks (complete store, no-op rerun, completion of missing sources,
refusals), and the generation benchmark in --quick mode.

Tiny everything: builtin:shapes at 32 px (96 training images), a randomly initialised ViT-Tiny/8
encoder written with save_encoder, autoencoders and UNets of a few hundred thousand parameters.
Each recipe runs in a fresh process (as a user runs it), with its own GENSSL_CACHE.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genssl.tests.helpers import random_vit_encoder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DATA = "builtin:shapes?per_class=8&val_per_class=2&size=32"
N_TRAIN = 96


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("genssl-cache")


def _env(cache: Path) -> dict:
    env = dict(os.environ, GENSSL_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], cache: Path, expect_ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _recipe(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / f"{name}.py"), *args]


def _torchrun(nproc: int, name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
            str(ROOT / "recipes" / f"{name}.py"), *args]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return random_vit_encoder(tmp_path_factory.mktemp("encoder"))


def test_autoencoder_recipe_writes_a_loadable_autoencoder(tmp_path: Path, cache: Path) -> None:
    import torch

    from genssl.generators.autoencoder import autoencoder_hash, decode, encode, load_pretrained_autoencoder

    out = tmp_path / "ae"
    proc = _run(_recipe("autoencoder", f"data={DATA}", f"out={out}", "epochs=1", "batch_size=16",
                        "arch.scaling_samples=32", "log.progress=false", "log.every_steps=2"), cache)
    assert "autoencoder: wrote" in proc.stdout
    folder = out / "autoencoder"
    ae = load_pretrained_autoencoder(folder)
    meta = json.loads((folder / "genssl.json").read_text())
    assert type(ae).__name__ == "AutoencoderKL" and meta["hash"] == autoencoder_hash(ae)
    assert meta["image_size"] == 32 and meta["downsample_factor"] == 4
    assert ae.config.scaling_factor == pytest.approx(meta["scaling_factor"])  # the stored factor is the one in use
    z = encode(ae, torch.zeros(2, 3, 32, 32))
    assert z.shape == (2, 4, 8, 8) and decode(ae, z).shape == (2, 3, 32, 32)
    steps = [r["step"] for r in _metrics(out)]
    assert steps[-1] == N_TRAIN // 16 and (out / "checkpoints" / "latest").is_file()

    # A user's pretrained autoencoder: nothing is trained.
    proc = _run(_recipe("autoencoder", f"data={DATA}", f"out={tmp_path / 'ae2'}", f"autoencoder={folder}"), cache)
    assert "nothing to train" in proc.stdout and not (tmp_path / "ae2" / "metrics.jsonl").exists()


# 2 ranks x batch 8: 6 steps per epoch, 36 steps in all
ELDM_ARGS = ("epochs=6", "batch_size=8", "ae.epochs=1", "ae.batch_size=8", "ae.arch.scaling_samples=32",
             "eldm.sample_every=18", "log.every_steps=4", "log.progress=false")


@pytest.fixture(scope="module")
def eldm_run(tmp_path_factory, cache: Path, encoder: Path) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("eldm") / "run"
    proc = _run(_torchrun(2, "eldm", f"encoder={encoder}", f"data={DATA}", f"out={out}", *ELDM_ARGS), cache)
    return out, proc


def test_eldm_recipe_two_ranks_trains_saves_and_previews(eldm_run, cache: Path) -> None:
    from PIL import Image

    from genssl.generators.eldm import load_eldm

    out, proc = eldm_run
    # its own autoencoder was trained first (the default)
    assert (out / "ae" / "autoencoder" / "config.json").is_file() and (out / "ae" / "metrics.jsonl").is_file()
    gen = json.loads((out / "eldm" / "generator.json").read_text())
    assert gen["autoencoder"]["trained_here"] and gen["autoencoder"]["path"] == str((out / "ae" / "autoencoder").resolve())
    assert gen["encoder"]["embed_dim"] == 192 and gen["image_size"] == 32 and gen["latent_shape"] == [4, 8, 8]
    eldm = load_eldm(out / "eldm")
    assert eldm.model_hash() == gen["eldm_hash"] and eldm.config.embed_dim == 192
    # caches keyed by fingerprint + model hash
    assert len(list((cache / "generators").glob("embeddings-*.safetensors"))) == 1
    assert len(list((cache / "generators").glob("latents-*.safetensors"))) == 1
    # preview grids: 3 rows (real, reconstruction, generated) of 8 tiles, upscaled to 64 px
    for name in ("step00000018.png", "final.png"):  # the grid after the last step is final.png
        img = Image.open(out / "samples" / name)
        assert img.size == (8 * 64, 3 * 64 + 4)
    # the same grids in TensorBoard, at their steps (the last one is the final grid)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("eldm/samples")] == [18, 36]
    metrics = _metrics(out)
    assert [r["step"] for r in metrics] == list(range(4, 37, 4))
    losses = [r["loss"] for r in metrics]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses


def test_eldm_rerun_resumes_without_retraining_or_recomputing(eldm_run, cache: Path, encoder: Path) -> None:
    out, _ = eldm_run
    before = json.loads((out / "eldm" / "generator.json").read_text())["eldm_hash"]
    n_metrics = len(_metrics(out))
    proc = _run(_torchrun(2, "eldm", f"encoder={encoder}", f"data={DATA}", f"out={out}", *ELDM_ARGS), cache)
    text = proc.stdout + proc.stderr
    assert "already trained with these settings" in text and "resumed from" in text
    assert "computing" not in text  # both caches were hit
    assert json.loads((out / "eldm" / "generator.json").read_text())["eldm_hash"] == before
    assert len(_metrics(out)) == n_metrics


def _store_arrays(store: Path) -> dict[str, np.ndarray]:
    from genssl.data.viewstore import ARRAY_NAMES, open_view_store

    st = open_view_store(store)
    return {name: st._arrays[name][:] for name in ARRAY_NAMES}


def test_generate_views_two_ranks_complete_noop_and_resume(eldm_run, cache: Path, tmp_path: Path) -> None:
    from genssl.data.builtin import resolve_data
    from genssl.data.index import build_index
    from genssl.data.viewstore import ViewStoreReader, open_view_store

    out, _ = eldm_run
    store = tmp_path / "views.zarr"
    args = (f"eldm={out}", f"data={DATA}", f"out={store}", "views_per_image=1", "interp_per_image=1", "steps=3",
            "batch_size=8", "shard_size=16", "sampler=dpmpp_2m")
    proc = _run(_torchrun(2, "generate_views", *args, f"contact_sheet={tmp_path / 'sheet.png'}"), cache)
    assert "96/96 sources done" in proc.stdout
    with Image.open(tmp_path / "sheet.png") as sheet:  # a real image: a grid of 32 px tiles with 2 px gaps
        width, height = sheet.size
        assert (width - 2) % 34 == 0 and (height - 2) % 34 == 0 and (width - 2) // 34 >= 2, sheet.size
    assert "view/s" in proc.stderr  # rank 0's progress bar (tqdm: views done, rate, ETA)

    fingerprint = build_index(resolve_data(DATA, cache).train, cache).fingerprint
    reader = ViewStoreReader(store, expect_fingerprint=fingerprint)
    assert len(reader) == N_TRAIN and reader.missing() == []
    assert reader.views(5).shape == (1, 32, 32, 3) and reader.views(5).dtype == np.uint8
    views, partners, alphas = reader.interp(90)
    assert views.shape == (1, 32, 32, 3) and 0 <= partners[0] < N_TRAIN and partners[0] != 90
    assert np.isclose(alphas[0], [0.2, 0.4, 0.6, 0.8]).any()
    assert reader.attrs["eldm_hash"] == json.loads((out / "eldm" / "generator.json").read_text())["eldm_hash"]
    first = _store_arrays(store)
    assert not np.array_equal(first["views"][0], first["views"][1]), "two sources got the same view"

    # a second run is a no-op: nothing written
    files = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    proc = _run(_torchrun(2, "generate_views", *args), cache)
    assert "nothing to do" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == files

    # sources lost (as after a kill -9 before they were durable) are regenerated, bit for bit, here by 1 rank
    open_view_store(store, "r+").invalidate([3, 17, 18, 64])
    proc = _run(_recipe("generate_views", *args), cache)
    assert "wrote 4 source(s)" in proc.stdout
    again = _store_arrays(store)
    for name, arr in first.items():
        np.testing.assert_array_equal(arr, again[name], err_msg=name)

    # another generator's settings are refused with the store's message
    proc = _run(_recipe("generate_views", *args, "seed=1"), cache, expect_ok=False)
    assert proc.returncode == 2 and "generated with sampler settings" in proc.stderr
    # a backend that cannot run here fails at start with the library's message
    proc = _run(_recipe("generate_views", *args[:2], f"out={tmp_path / 'trt.zarr'}", "backend=tensorrt"), cache,
                expect_ok=False)
    assert proc.returncode == 2 and "backend=tensorrt needs" in proc.stderr and not (tmp_path / "trt.zarr").exists()


def test_generate_views_with_a_noise_level_on_the_condition(eldm_run, cache: Path, tmp_path: Path) -> None:
    """GenView's condition noise (METHODS §2.2) through the recipe: the data set's embedding statistics
    reach the sampler, every view records its level, and the noised views differ from level 0's."""
    from genssl.data.viewstore import open_view_store

    out, _ = eldm_run
    args = (f"eldm={out}", f"data={DATA}", "views_per_image=1", "interp_per_image=0", "steps=2", "batch_size=16",
            "sampler=ddim", "report=false")
    clean, noised = tmp_path / "clean.zarr", tmp_path / "noised.zarr"
    _run(_recipe("generate_views", *args, f"out={clean}"), cache)
    _run(_recipe("generate_views", *args, f"out={noised}", "noise_level=300"), cache)
    a, b = open_view_store(clean), open_view_store(noised)
    assert (b._arrays["noise_level"][:] == 300).all() and (a._arrays["noise_level"][:] == 0).all()
    assert not np.array_equal(a._arrays["views"][:], b._arrays["views"][:])


def test_bench_generate_quick(tmp_path: Path, cache: Path) -> None:
    proc = _run([sys.executable, "-m", "genssl.bench.generate", "--quick", "--backends", "eager", "tensorrt",
                 "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path)], cache)
    path = Path(proc.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    report = json.loads(path.read_text())
    assert path.name.endswith("-generate-quick.json")
    res = report["results"]
    assert res["diffusers_eager"]["status"] == "ok" and res["ours_eager"]["status"] == "ok"
    ours, theirs = res["ours_eager"], res["diffusers_eager"]
    assert ours["views_per_s"] == pytest.approx(report["config"]["batch"] / ours["median_s"])
    assert ours["speedup_vs_diffusers"] == pytest.approx(theirs["median_s"] / ours["median_s"])
    assert res["ours_eager"]["mean_abs_diff_grey_vs_diffusers"] <= 1.0  # same loop, same seeds, fp32
    assert res["ours_tensorrt"]["status"] == "skipped" and "tensorrt" in res["ours_tensorrt"]["reason"]
    q = report["quality"]
    assert q["reference"] == "ddim 8 steps" and {"pixel_mae", "latent_rmse"} <= set(q["dpmpp_2m_4"])
    assert report["versions"]["diffusers"] and report["config"]["batch"] == 4
