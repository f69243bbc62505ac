"""The kill -9 battery (bench/faults.py, docs/RELIABILITY.md), reduced for CI: recipes/dino.py killed with
SIGKILL once during an optimizer step and once while a checkpoint file is half written, rerun each time
with the same command, ends bitwise equal to an uninterrupted run (encoder weights and eval.json).

Equality is what fails when resume is broken: planted once (engine/trainer.py `fit`, `first = 0`), a
resume that restarted the epoch at batch 0 instead of its data position made this test fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from genssl.bench.faults import DINO_KEYS, run_chain

pytestmark = pytest.mark.slow

# 48 images, batch 16: 3 steps per epoch, 6 in all; a checkpoint every 2 steps; evaluation kept cheap.
KEYS = [k for k in DINO_KEYS if not k.startswith("data=")] + [
    "data=builtin:shapes?size=32&per_class=4&val_per_class=2", "eval.linear_epochs=10"]
FAULTS = [(".", "step", 3),          # in step 3: steps 1-2 done and checkpointed
          (".", "ckpt-write", 4)]    # the step-4 checkpoint half written: resume from step 2 again


def test_dino_killed_during_a_step_and_a_checkpoint_write_ends_equal(tmp_path: Path) -> None:
    chain = run_chain("dino", tmp_path, timeout=300, faults=FAULTS, keys=KEYS, log=lambda msg: None)
    first, second = chain["faults"]
    assert first["killed"] and first["left"] == {"steps_logged": 2, "checkpoint": 2}
    assert first["outcome"] == "resumed at step 2/6" and first["steps_lost"] == 0
    assert second["killed"] and second["left"] == {"steps_logged": 4, "checkpoint": 2}
    assert second["outcome"] == "resumed at step 2/6" and second["steps_lost"] == 2
    assert chain["final_rerun_ok"], chain["processes"]
    results = chain["comparisons"]["."]
    assert results["encoder.safetensors"]["equal"], results
    assert results["eval.json"]["equal"], results
