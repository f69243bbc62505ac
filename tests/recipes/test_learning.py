"""Guard on learning: a short DINO run must make the encoder clearly better than its random init.

A loss that goes down proves nothing (DINO's can fall while features get worse). Planting a
defect showed what this needs (docs/LEARNING.md): with the EMA update deleted, the run still
"beat" a random init evaluated with BatchNorm mean 0 / variance 1 by more than 5 points, because
training replaces those statistics by the data's. The floor now gets the data's statistics
(`calibrate_batchnorm`), and against it this run (the smoke preset on 480 built-in 32 px images,
12 epochs of batch 32, k-NN only) scored 27.5 % vs 26.7 %: the settings do not learn enough yet,
so the test is marked xfail until they do (it reports XPASS when they do).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from genssl.tests.helpers import run_recipe

pytestmark = pytest.mark.slow
MARGIN = 5.0  # k-NN top-1 points above the random init


@pytest.mark.xfail(strict=False, reason=(
    "open work (issue 'Trustworthy learning'): against a random init whose BatchNorm statistics come from the "
    "data, this smoke-sized DINO run scored 27.5 % vs 26.7 % k-NN (docs/LEARNING.md); settings that clear the "
    "margin are not found yet. The assertion stays as the target."))
def test_short_dino_run_beats_random_init(tmp_path: Path) -> None:
    run_recipe([sys.executable, "recipes/dino.py", "preset=smoke", "data=builtin:shapes?size=32&per_class=40&val_per_class=20",
                "epochs=12", "eval.linear=false", "ckpt.every_steps=0", "log.progress=false", f"out={tmp_path}"],
               timeout=1200, threads=2)
    result = json.loads((tmp_path / "eval.json").read_text())
    trained, floor = result["knn_top1"], result["random_init"]["knn_top1"]
    assert result["n_test"] == 12 * 20
    assert trained >= floor + MARGIN, f"DINO k-NN {trained:.2f} % vs random init {floor:.2f} %: training did not help"
