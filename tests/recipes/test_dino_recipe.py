"""End to end through the real recipes: DALI CPU pipeline, DeepSpeed, EMA teacher, k-NN, export.

Tiny settings (32 px built-in shapes, one epoch) keep each run well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from genssl.tests.helpers import assert_accuracies

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TINY_DATA = "builtin:shapes?size=32&per_class=12&val_per_class=4"
TINY = ["preset=smoke", "epochs=1", "batch_size=16", "patch_size=8", "crops.global_size=32", "crops.local_size=16",
        "crops.n_local=2", "eval.size=32", "log.progress=false", "num_workers=1"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], timeout: int = 400) -> str:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def test_deepspeed_two_ranks_zero3_trains_evaluates_and_resumes(tmp_path: Path) -> None:
    """The acceptance command: `deepspeed --num_gpus 2 recipes/dino.py preset=smoke zero_stage=3 out=DIR`."""
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", "29631", "recipes/dino.py", *TINY, "zero_stage=3",
           f"data={TINY_DATA}", f"out={tmp_path}"]
    out = _run(cmd)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["knn_k"] == 20 and result["n_test"] == 12 * 4  # every val image was a query
    hits = result["knn_top1"] * result["n_test"] / 100  # an accuracy over the 48 queries: a whole number of hits
    assert abs(hits - round(hits)) < 1e-6 and result["knn_top5"] >= result["knn_top1"]
    assert "k-NN (k=20, T=0.07)" in out
    assert_accuracies(result, n_test=12 * 4)
    assert_accuracies(result["random_init"], n_test=12 * 4)
    assert "random init" in out
    for name in ("config.yaml", "metrics.jsonl", "encoder.safetensors", "encoder.json", "checkpoints/latest"):
        assert (tmp_path / name).exists(), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps == sorted(set(steps))

    again = _run(cmd)  # a finished run resumes at its last step and only re-evaluates
    assert "resumed from" in again
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == steps

    knn = _run([sys.executable, "recipes/eval_knn.py", f"encoder={tmp_path}", f"data={TINY_DATA}", "eval.size=32"])
    standalone = json.loads((tmp_path / "eval_knn.json").read_text())
    assert abs(standalone["knn_top1"] - result["knn_top1"]) < 1e-6, "the standalone k-NN must reproduce eval.json"
    assert standalone["linear_top1"] == result["linear_top1"], "the standalone linear probe must reproduce eval.json"
    assert "top-1" in knn


def test_folder_with_corrupt_files_is_reported_and_skipped(tmp_path: Path) -> None:
    data = tmp_path / "images"
    for c, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 40, 230)]):
        folder = data / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40, 36), tuple((v + 7 * i) % 256 for v in colour)).save(folder / f"{i}.jpg", quality=90)
    (data / "class0" / "empty.jpg").write_bytes(b"")
    (data / "class1" / "notes.jpg").write_text("not an image")
    good = (data / "class2" / "0.jpg").read_bytes()
    (data / "class2" / "truncated.jpg").write_bytes(good[: len(good) // 2])

    out = _run([sys.executable, "recipes/dino.py", *TINY, f"data={data}", f"out={tmp_path / 'run'}"])
    assert "3 unreadable file(s) skipped" in out
    report = Path(out.split("reasons in ")[1].split()[0])
    files = json.loads(report.read_text())["files"]
    assert {Path(f["path"]).name for f in files} == {"empty.jpg", "notes.jpg", "truncated.jpg"}
    assert all(f["reason"] for f in files)
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["n_train"] + result["n_test"] == 3 * 12, "the quarantined files must not be evaluated"


def test_throughput_bench_writes_its_json(tmp_path: Path) -> None:
    out = _run([sys.executable, "bench/throughput.py", "--data", TINY_DATA, "--steps", "6", "--batches", "2",
                "--repeats", "1", "--workers", "1", "--out", str(tmp_path), "batch_size=8", "patch_size=8",
                "crops.global_size=32", "crops.local_size=16", "crops.n_local=2"])
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["device"] and record["versions"]["torch"]
    results = record["results"]
    for name in ("data_dali", "data_torch_pil"):  # the median of its own repeats (1 repeat here)
        assert results[name]["images_per_s"] == statistics.median(results[name]["repeats"]), name
    ratio = results["data_dali"]["images_per_s"] / results["data_torch_pil"]["images_per_s"]
    assert results["data_speedup"] == pytest.approx(ratio)
    for name in ("train_step_synthetic", "end_to_end"):
        assert math.isfinite(results[name]["images_per_s"]), name
    assert "DALI / DataLoader+PIL" in out
