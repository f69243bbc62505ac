"""The whole Gen-SIS pipeline as a tiny smoke run, then a rerun from a copy of its folder that skips every
finished stage."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from genssl.tests.helpers import assert_accuracies, run_recipe

pytestmark = pytest.mark.slow
TINY = ["data=builtin:shapes?size=32&per_class=6&val_per_class=2", "epochs=1", "batch_size=8", "patch_size=8",
        "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "eval.size=32", "log.progress=false",
        "num_workers=1", "generator.epochs=1", "generator.batch_size=16", "generator.eldm.sample_every=0",
        "generator.ae.epochs=1", "generation.steps=2", "generation.batch_size=8"]


def _run(cmd: list[str]) -> str:
    return run_recipe(cmd, timeout=600)


def test_pipeline_runs_end_to_end_and_a_rerun_skips_finished_stages(tmp_path: Path) -> None:
    cmd = [sys.executable, "recipes/dino_gensis.py", *TINY, f"out={tmp_path}"]
    out = _run(cmd)
    result = json.loads((tmp_path / "eval.json").read_text())
    for method in ("random_init", "dino", "gen_dino"):
        assert_accuracies(result[method], n_test=12 * 2)  # every val image is a query
    assert "gen_dino" in out and "top-1 %" in out
    assert "random init" in out and "Gen-DINO" in out
    for path in ("dino/encoder.safetensors", "eldm/eldm", "views.zarr", "gen_dino/encoder.safetensors",
                 "gen_dino/metrics.jsonl"):
        assert (tmp_path / path).exists(), path
    terms = json.loads((tmp_path / "gen_dino" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_dino" in terms and "loss_dis" in terms

    # The same run from a copied folder, with other logging and workers (keys that cannot change results).
    moved = tmp_path.with_name(tmp_path.name + "_moved")
    shutil.copytree(tmp_path, moved)
    again = _run([*cmd[:-1], f"out={moved}", "log.every_steps=3", "num_workers=2"])
    assert again.count("finished earlier with these settings; skipped") == 3  # dino, eldm, gen_dino
    assert "nothing to do" in again  # the view store is complete
    assert json.loads((moved / "eval.json").read_text())["gen_dino"] == result["gen_dino"]


def test_gen_off_is_the_dino_baseline_alone(tmp_path: Path) -> None:
    out = _run([sys.executable, "recipes/dino_gensis.py", *TINY, "gen=off", f"out={tmp_path}"])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert_accuracies(result["dino"], n_test=12 * 2)
    assert "gen_dino" not in result
    assert not (tmp_path / "eldm").exists() and "dino" in out
