"""TensorBoard event files (engine/metrics.py), read back with TensorBoard's own reader.

The scalars must equal ``metrics.jsonl`` (in float32, TensorBoard's scalar type) step for step,
including after a resume that drops the steps past the checkpoint; ``log.tensorboard=false`` and
ranks other than 0 write none; images come back pixel for pixel; the eval results of a real recipe
run equal its ``eval.json``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from genssl.engine.metrics import MetricsLogger, log_image, log_scalars  # noqa: E402
from genssl.engine.pretrain import accuracy_scalars  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _events(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


def _reader(run_dir: Path):
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0,
                                                                          event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


def _scalars(acc, prefix: str) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` of the scalar tags under ``prefix``; a step seen twice fails."""
    out = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith(prefix):
            events = acc.Scalars(tag)
            steps = [e.step for e in events]
            assert len(steps) == len(set(steps)), f"{tag}: steps logged twice {steps}"
            out[tag[len(prefix):]] = {e.step: e.value for e in events}
    return out


def _jsonl(run_dir: Path) -> dict[str, dict[int, float]]:
    """``metrics.jsonl`` as ``{key: {step: value as float32}}`` (every key but ``step``)."""
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                out.setdefault(key, {})[record["step"]] = float(np.float32(value))
    return out


def _assert_events_equal_metrics(run_dir: Path) -> None:
    expected = _jsonl(run_dir)
    assert expected, "metrics.jsonl is empty"
    assert _scalars(_reader(run_dir), "train/") == expected


def _record(step: int, rng: np.random.Generator) -> dict:
    """A record shaped like engine/trainer.py's (loss, an objective term, schedules, throughput)."""
    return {"step": step, "epoch": round(step / 4, 4), "loss": float(rng.normal()), "teacher_temp": 0.04,
            "lr": float(rng.uniform(1e-6, 1e-3)), "wd": float(rng.uniform(0.04, 0.4)), "momentum": 0.996,
            "images_per_s": float(rng.uniform(10, 1e4)), "mem_gb": float(rng.uniform(0, 80)), "skipped_steps": step // 3}


def test_scalars_equal_metrics_jsonl(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    logger = MetricsLogger(tmp_path, True, total_steps=7, progress=False)
    for step in range(1, 8):
        logger.log(_record(step, rng))
    logger.close()
    assert len(_events(tmp_path)) == 1
    _assert_events_equal_metrics(tmp_path)
    assert set(_jsonl(tmp_path)) == {"epoch", "loss", "teacher_temp", "lr", "wd", "momentum", "images_per_s",
                                     "mem_gb", "skipped_steps"}


def test_resume_hides_the_steps_past_the_checkpoint(tmp_path: Path) -> None:
    """Killed after logging step 6 with its checkpoint at step 3: steps 4-6 are trained (and logged) again."""
    rng = np.random.default_rng(1)
    first = MetricsLogger(tmp_path, True, total_steps=8, progress=False)
    for step in range(1, 7):
        first.log(_record(step, rng))
    first.close()
    again = MetricsLogger(tmp_path, True, total_steps=8, resume_step=3, progress=False)
    for step in range(4, 9):
        again.log(_record(step, rng))  # new values: the stale ones must not show
    again.close()
    assert len(_events(tmp_path)) == 2
    _assert_events_equal_metrics(tmp_path)
    assert sorted(_scalars(_reader(tmp_path), "train/")["loss"]) == list(range(1, 9))


def test_tensorboard_false_and_other_ranks_write_no_event_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "off").mkdir(), (tmp_path / "rank1").mkdir()  # fit creates the run folder
    off = MetricsLogger(tmp_path / "off", True, total_steps=2, progress=False, tensorboard=False)
    other_rank = MetricsLogger(tmp_path / "rank1", False, total_steps=2, progress=False)
    for logger in (off, other_rank):
        logger.log(_record(1, rng))
        logger.close()
    assert _events(tmp_path / "off") == [] and (tmp_path / "off" / "metrics.jsonl").is_file()
    assert list((tmp_path / "rank1").iterdir()) == []


def test_image_during_training_goes_into_the_training_event_file(tmp_path: Path) -> None:
    """TensorBoard follows only a folder's newest event file while it grows: a preview logged mid-run
    must not start a second one. Images come back pixel for pixel (PNG)."""
    rng = np.random.default_rng(3)
    grid = rng.integers(0, 256, size=(19, 37, 3), dtype=np.uint8)
    logger = MetricsLogger(tmp_path, True, total_steps=4, progress=False)
    logger.log(_record(1, rng))
    log_image(tmp_path, "eldm/samples", grid, 2)
    logger.log(_record(2, rng))
    assert len(_events(tmp_path)) == 1
    logger.close()
    log_scalars(tmp_path, accuracy_scalars({"knn_top1": 41.5, "knn_top5": 90.0, "linear_top1": None, "knn_k": 20},
                                           {"knn_top1": 12.25, "linear_top1": 30.0}), 2)
    acc = _reader(tmp_path)
    (image,) = acc.Images("eldm/samples")
    assert image.step == 2 and (image.width, image.height) == (37, 19)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), grid)
    assert _scalars(acc, "eval/") == {"knn_top1": {2: 41.5}, "knn_top5": {2: 90.0},
                                      "random_init/knn_top1": {2: 12.25}, "random_init/linear_top1": {2: 30.0}}
    _assert_events_equal_metrics(tmp_path)


def test_contact_sheet_is_logged_as_an_image(tmp_path: Path) -> None:
    """A view store (3 of 4 sources done); its contact sheet PNG and the TensorBoard image agree."""
    from genssl.data.viewstore import create_view_store
    from genssl.generators.job import contact_sheet

    rng = np.random.default_rng(4)
    store_path = tmp_path / "views.zarr"
    store = create_view_store(store_path, 4, 2, 1, 6, 5, {"fingerprint": "fp", "generator_hash": "g"}, shard_size=2)
    for i in (0, 1, 3):
        store.write_source(i, rng.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8), np.zeros(2, np.int64),
                           rng.integers(0, 256, (1, 6, 5, 3), dtype=np.uint8), np.array([2]), np.array([0.5]))
    png = contact_sheet(store_path, tmp_path / "sheet.png", n=3, tensorboard_dir=tmp_path / "views")
    (image,) = _reader(tmp_path / "views").Images("views/contact_sheet")
    assert image.step == 3
    logged = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert np.array_equal(logged, np.asarray(Image.open(png).convert("RGB")))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(*cmd: str) -> None:
    proc = subprocess.run([sys.executable, *cmd], env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"


@pytest.mark.slow
def test_fit_writes_events_equal_to_metrics_and_none_when_off(tmp_path: Path) -> None:
    """engine/trainer.py `fit` (DINO on synthetic crops, DeepSpeed, one process)."""
    _run("tests/engine/dist_train.py", f"out={tmp_path / 'on'}", "epochs=1")
    _assert_events_equal_metrics(tmp_path / "on")
    assert {"loss", "teacher_temp", "lr", "wd", "momentum", "images_per_s", "mem_gb"} <= set(_jsonl(tmp_path / "on"))
    _run("tests/engine/dist_train.py", f"out={tmp_path / 'off'}", "epochs=1", "log.tensorboard=false")
    assert (tmp_path / "off" / "metrics.jsonl").is_file() and _events(tmp_path / "off") == []


@pytest.mark.slow
def test_dino_recipe_logs_training_and_evaluation(tmp_path: Path) -> None:
    """recipes/dino.py end to end: train/* equal metrics.jsonl, eval/* equal eval.json (trained and random
    init), at the last step; the job folder is what ``tensorboard --logdir`` is given."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    run = tmp_path / "job" / "dino"
    _run("recipes/dino.py", "preset=smoke", "epochs=1", "batch_size=16", "patch_size=8", "crops.global_size=32",
         "crops.local_size=16", "crops.n_local=2", "eval.size=32", "log.progress=false", "num_workers=1",
         "data=builtin:shapes?size=32&per_class=12&val_per_class=4", f"out={run}")
    _assert_events_equal_metrics(run)
    last = max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines())
    result = json.loads((run / "eval.json").read_text())
    expected = {key: {last: float(np.float32(value))} for key, value in accuracy_scalars(result, result["random_init"]).items()}
    assert {"eval/knn_top1", "eval/linear_top1", "eval/random_init/knn_top1"} <= set(expected)
    assert {f"eval/{k}": v for k, v in _scalars(_reader(run), "eval/").items()} == expected
    assert list(EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "job")).Runs()) == ["dino"]
