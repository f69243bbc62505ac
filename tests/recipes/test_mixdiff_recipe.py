"""recipes/mixdiff.py end to end on tiny settings (96 built-in 32 px images, one epoch of 6 steps per
training stage): SimCLR through every stage with the E-LDM and a rerun from a moved copy that skips each
finished stage; DINO, ``mixdiff.augment=false`` and the image-variation generator on the SimCLR run's
artefacts (``views=`` / ``encoder=``); ``mix=off``. Plus the resize-only augmentation as a unit test."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from genssl.tests.helpers import assert_accuracies, run_recipe

DATA = "builtin:shapes?size=32&per_class=8&val_per_class=4"
N_TEST = 12 * 4
TINY = [f"data={DATA}", "epochs=1", "batch_size=16", "log.progress=false", "num_workers=1", "eval.linear_epochs=10",
        "generator.epochs=1", "generator.batch_size=16", "generator.eldm.sample_every=0", "generator.ae.epochs=1",
        "generation.steps=2", "generation.batch_size=16", "generation.report_sources=16"]


def _mixdiff(out: Path, *keys: str) -> str:
    return run_recipe([sys.executable, "recipes/mixdiff.py", *TINY, *keys, f"out={out}"], timeout=900)


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("mixdiff") / "simclr"
    return out, _mixdiff(out, "method=simclr")


@pytest.mark.slow
def test_simclr_pipeline_runs_end_to_end_and_a_rerun_skips_finished_stages(simclr_run) -> None:
    out, log = simclr_run
    result = json.loads((out / "eval.json").read_text())
    for row in ("random_init", "base", "mixdiff"):
        assert_accuracies(result[row], n_test=N_TEST)
    assert "MixDiff (SimCLR)" in log and "random init" in log and "k-NN top-1 %" in log
    for path in ("base/encoder.safetensors", "eldm/eldm", "views.zarr", "mixdiff/encoder.safetensors"):
        assert (out / path).exists(), path
    quality = out / "views.zarr.quality.json"
    assert quality.is_file() and result["view_quality"] == str(quality) and str(quality) in log
    config = json.loads((out / "mixdiff" / "stage.json").read_text())["run_identity"]
    assert config["mixdiff.p"] == 1.0 and config["generation.interp_per_image"] == 0

    moved = out.with_name("simclr_moved")
    shutil.copytree(out, moved)
    again = _mixdiff(moved, "method=simclr", "log.every_steps=3")
    assert again.count("finished earlier with these settings; skipped") == 3  # base, eldm, mixdiff
    assert "nothing to do" in again  # the view store is complete
    assert json.loads((moved / "eval.json").read_text())["mixdiff"] == result["mixdiff"]


@pytest.mark.slow
def test_dino_on_the_same_views_replaces_one_global_crop(simclr_run, tmp_path: Path) -> None:
    out, _ = simclr_run
    log = _mixdiff(tmp_path, "method=dino", f"views={out / 'views.zarr'}", "patch_size=8")
    result = json.loads((tmp_path / "eval.json").read_text())
    for row in ("random_init", "base", "mixdiff"):
        assert_accuracies(result[row], n_test=N_TEST)
    assert "MixDiff (DINO)" in log and not (tmp_path / "eldm").exists()
    assert json.loads((tmp_path / "base" / "stage.json").read_text())["run_identity"]["crops.n_local"] == 2


@pytest.mark.slow
def test_without_augmentation_only_the_mixdiff_stage_trains(simclr_run, tmp_path: Path) -> None:
    out, _ = simclr_run
    log = _mixdiff(tmp_path, "method=simclr", f"encoder={out / 'base'}", f"views={out / 'views.zarr'}",
                   "mixdiff.augment=false")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["base"] == json.loads((out / "base" / "eval.json").read_text())  # read beside encoder=
    assert_accuracies(result["mixdiff"], n_test=N_TEST)
    assert not (tmp_path / "base").exists() and "MixDiff (SimCLR)" in log
    assert json.loads((tmp_path / "mixdiff" / "stage.json").read_text())["run_identity"]["mixdiff.augment"] is False


@pytest.mark.slow
def test_an_image_variation_pipeline_replaces_the_eldm(simclr_run, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from genssl.data.viewstore import open_view_store
    from genssl.tests.generators.test_image_variation import build_tiny_pipeline

    out, _ = simclr_run
    pipeline = build_tiny_pipeline(tmp_path / "pipeline", sample_size=16)  # 32 px views
    run = tmp_path / "run"
    log = _mixdiff(run, "method=barlow", f"encoder={out / 'base'}", f"generator.pipeline={pipeline}")
    assert not (run / "eldm").exists()
    store = open_view_store(run / "views.zarr", "r")
    assert store.attrs["pipeline"] == str(pipeline.resolve()) and (store.height, store.views_per_image) == (32, 1)
    assert (run / "views.zarr.quality.json").is_file()  # judged by the base encoder
    assert_accuracies(json.loads((run / "eval.json").read_text())["mixdiff"], n_test=N_TEST)
    assert "MixDiff (Barlow Twins)" in log


@pytest.mark.slow
def test_mix_off_is_the_base_method_alone(tmp_path: Path) -> None:
    _mixdiff(tmp_path, "method=simclr", "mix=off")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert_accuracies(result["base"], n_test=N_TEST)
    assert "mixdiff" not in result and not (tmp_path / "eldm").exists() and not (tmp_path / "views.zarr").exists()


def test_resize_only_draws_whole_images_without_any_augmentation() -> None:
    from genssl.data.augment import (P_BRIGHT, P_CONTRAST, P_FLIP, P_HUE, P_SAT, P_SIGMA, P_SOLAR, MultiCropSpec,
                                     sample_multicrop_params)
    from genssl.recipes.mixdiff import resize_only

    spec = resize_only(MultiCropSpec(global_size=32, n_local=0))
    params = sample_multicrop_params(np.random.default_rng(0), spec, np.array([[32, 32], [50, 50], [40, 30]] * 20))
    square = params[np.arange(60) % 3 != 2]
    assert np.array_equal(square[..., :4], np.broadcast_to([0, 0, 1, 1], square[..., :4].shape))  # the whole image
    wide = params[2::3]  # 40x30: its centre 30x30 square
    assert np.allclose(wide[..., :4], np.broadcast_to([0, 5 / 40, 1, 35 / 40], wide[..., :4].shape))
    assert (params[..., [P_FLIP, P_HUE, P_SIGMA, P_SOLAR]] == 0).all()
    assert (params[..., [P_BRIGHT, P_CONTRAST, P_SAT]] == 1).all()
    augmented = sample_multicrop_params(np.random.default_rng(0), MultiCropSpec(global_size=32, n_local=0),
                                        np.array([[32, 32]] * 60))
    assert (augmented[..., P_FLIP] == 1).any() and (augmented[..., :4] != [0, 0, 1, 1]).any()


def test_config_refusals_name_the_fix() -> None:
    from genssl.engine.config import ConfigError, parse_config
    from genssl.recipes.mixdiff import MixDiffConfig, method_of, presets_for

    def parse(*argv: str):
        return parse_config(list(argv), MixDiffConfig, presets_for(method_of(list(argv))), default_preset="smoke")

    assert parse("method=dino").config.crops.n_local == 2  # DINO's own presets
    assert parse("method=barlow").config.generation.interp_per_image == 0
    with pytest.raises(ConfigError, match="set crops.n_local=0"):
        parse("method=dino", "mixdiff.augment=false")
    with pytest.raises(ConfigError, match=r"mixdiff.p .* \[0, 1\]"):
        parse("mixdiff.p=1.5")
    with pytest.raises(ConfigError, match="choose one of: simclr.*dino"):
        parse("method=vicreg")
    with pytest.raises(ConfigError, match="give one generator"):
        parse("generator.pipeline=/p", "eldm=/e")
