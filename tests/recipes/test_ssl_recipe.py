"""recipes/ssl_methods.py end to end for every method: DALI CPU pipeline, DeepSpeed, k-NN + linear, export,
resume after a finished run, SIGKILL mid-run, and 2 ranks under ZeRO-3 (SimCLR and MoCo v3 on 2 ranks:
tests/models, equal to one process).

Tiny settings (96 built-in 32 px images, one epoch of 6 steps) keep each run to seconds of training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genssl.tests.helpers import ROOT, assert_accuracies, run_recipe

pytestmark = pytest.mark.slow
METHODS = ["simclr", "mocov2", "mocov3", "byol", "simsiam", "barlow", "swav"]
# The rerun of a finished run goes through the engine's resume, the same for every method; checked for
# one method with a momentum encoder and one without (SIGKILL mid-run is checked below for the queues).
RERUN = ("byol", "simsiam")
TINY_DATA = "builtin:shapes?size=32&per_class=8&val_per_class=4"
TINY = ["epochs=1", "batch_size=16", "log.progress=false", "log.every_steps=1", "num_workers=1",
        "eval.linear_epochs=10", f"data={TINY_DATA}"]


def _ssl(method: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "recipes/ssl_methods.py", f"method={method}", *TINY, f"out={out}", *extra]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_exports_and_evaluates(method: str, tmp_path: Path) -> None:
    out = run_recipe(_ssl(method, tmp_path), timeout=600)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert_accuracies(result, n_test=12 * 4)
    assert_accuracies(result["random_init"], n_test=12 * 4)
    assert "random init" in out and "trained" in out
    for name in ("config.yaml", "metrics.jsonl", "encoder.safetensors", "encoder.json", "checkpoints/latest"):
        assert (tmp_path / name).exists(), name
    losses = _losses(tmp_path)
    assert len(losses) == 6 and all(v == v for v in losses.values()), losses  # 96 images / 16, no NaN
    encoder = json.loads((tmp_path / "encoder.json").read_text())
    assert encoder["config"]["method"] == method
    if method in RERUN:  # a finished run resumes at its last step and re-evaluates the same encoder
        again = run_recipe(_ssl(method, tmp_path), timeout=600)
        assert "resumed from" in again and _losses(tmp_path) == losses
        rerun = json.loads((tmp_path / "eval.json").read_text())
        assert rerun["knn_top1"] == result["knn_top1"], "the exported encoder must be the same after a resume"


def _kill_after_checkpoint(cmd: list[str], run: Path, step: int) -> None:
    """Start ``cmd``, SIGKILL it once the checkpoint of ``step`` is complete, before the run ends."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            latest = run / "checkpoints" / "latest"
            if latest.is_file() and latest.read_text().strip() == f"step{step:08d}":
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert not (run / "eval.json").exists(), "the run ended before it could be killed; lengthen it"


@pytest.mark.parametrize("method", ["mocov2", "swav"])  # the methods with a queue in their checkpoint
def test_sigkill_then_rerun_gives_the_same_losses(method: str, tmp_path: Path) -> None:
    keys = ["epochs=3", "ckpt.every_steps=4", "eval.knn=false", "eval.linear=false"]
    if method == "swav":
        keys += ["swav.queue_length=32", "swav.epoch_queue_starts=1"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_recipe(_ssl(method, reference, *keys), timeout=600)
    _kill_after_checkpoint(_ssl(method, killed, *keys), killed, step=8)
    out = run_recipe(_ssl(method, killed, *keys), timeout=600)
    assert "resumed from" in out
    ref, got = _losses(reference), _losses(killed)
    assert ref.keys() == got.keys() and len(ref) == 18
    for step in ref:
        assert abs(ref[step] - got[step]) < 1e-5, (step, ref[step], got[step])


@pytest.mark.parametrize("method", ["mocov2"])  # gathered keys and a queue identical across ranks
def test_two_ranks_zero3(method: str, tmp_path: Path) -> None:
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", "29642", "recipes/ssl_methods.py", f"method={method}", *TINY,
           "batch_size=8", "zero_stage=3", f"out={tmp_path}"]
    run_recipe(cmd, timeout=600)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert_accuracies(result, n_test=12 * 4)
    assert len(_losses(tmp_path)) == 6  # 96 images / (2 ranks x 8)
