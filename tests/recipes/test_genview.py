"""recipes/genview.py end to end on tiny settings (48 built-in 32 px images, one epoch of 3 steps per training
stage, a 1-step E-LDM, 2 sampling steps): every stage, the adaptive levels in the view store, the QDC
weights reaching training, and a rerun that skips each finished stage. Plus the config refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from genssl.tests.helpers import assert_accuracies, run_recipe

DATA = "builtin:shapes?size=32&per_class=4&val_per_class=2"
N_TRAIN, N_TEST, BATCH = 12 * 4, 12 * 2, 16
TINY = [f"data={DATA}", "epochs=1", f"batch_size={BATCH}", "log.progress=false", "num_workers=1", "eval.linear_epochs=2",
        "generator.epochs=1", f"generator.batch_size={BATCH}", "generator.eldm.sample_every=0", "generator.ae.epochs=1",
        "generation.steps=2", f"generation.batch_size={BATCH}", "generation.report=false",
        "generation.foreground_sample=32", "genview.scorer_sample=32"]


def _genview(out: Path, *keys: str) -> str:
    return run_recipe([sys.executable, "recipes/genview.py", *TINY, *keys, f"out={out}"], timeout=900)


@pytest.fixture(scope="module")
def mocov3_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("genview") / "mocov3"
    return out, _genview(out, "method=mocov3")


@pytest.mark.slow
def test_pipeline_runs_end_to_end_with_adaptive_views_and_qdc_weights(mocov3_run) -> None:
    from genssl.data.viewstore import open_view_store
    from genssl.generators.foreground import noise_level_histogram

    out, log = mocov3_run
    result = json.loads((out / "eval.json").read_text())
    for row in ("random_init", "base", "genview"):
        assert_accuracies(result[row], n_test=N_TEST)
    assert "GenView (MoCo v3)" in log and "random init" in log and "linear top-1 %" in log
    for path in ("base/encoder.safetensors", "eldm/eldm", "views.zarr", "genview/encoder.safetensors", "views.png"):
        assert (out / path).exists(), path

    # one view per image, drawn at its adaptive level (the rule itself: tests/generators/test_adaptive_views.py)
    store = open_view_store(out / "views.zarr")
    levels = store._arrays["noise_level"][:]
    noise = store.sampler_settings["noise"]
    assert levels.shape == (N_TRAIN, 1) and set(np.unique(levels)) <= {0, 100, 200, 300, 400}
    assert len(np.unique(levels)) > 1 and result["noise_levels"] == noise_level_histogram(levels)
    assert noise["mode"] == "adaptive" and noise["size"] == 64 and noise["sample"] == 32  # a 4×4 ResNet-18 grid

    # the scorer weighted every training pair (3 steps of 16) with weights that are not all 1
    qdc = result["genview"]["qdc"]
    assert qdc["pairs"] == N_TRAIN and qdc["weight_std"] > 0 and qdc["weight_min"] < 1 < qdc["weight_max"]
    identity = json.loads((out / "genview" / "stage.json").read_text())["run_identity"]
    assert identity["genview.p"] == 1.0 and identity["genview.qdc"] is True
    assert identity["generation.noise"] == "adaptive" and identity["generation.interp_per_image"] == 0

    # the contact sheet is a TensorBoard image of the pipeline folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("views/contact_sheet")] == [N_TRAIN]

    again = _genview(out, "method=mocov3", "log.every_steps=3")
    assert again.count("finished earlier with these settings; skipped") == 3  # base, eldm, genview
    assert "nothing to do" in again and "foreground PCA" not in again  # the store is complete
    assert json.loads((out / "eval.json").read_text())["genview"] == result["genview"]


def test_config_refusals_name_the_fix() -> None:
    from genssl.engine.config import ConfigError, parse_config
    from genssl.recipes.genview import GenViewConfig, presets_for
    from genssl.recipes.ssl_methods import method_of

    def parse(*argv: str):
        method = method_of(list(argv), GenViewConfig.method, ("mocov2", "mocov3", "byol", "simsiam", "swav", "simclr"))
        return parse_config(list(argv), GenViewConfig, presets_for(method), default_preset="smoke")

    cfg = parse("method=swav").config
    assert cfg.crops.n_local == 2 and cfg.generation.noise == "adaptive" and cfg.generation.views_per_image == 1
    assert cfg.generation.foreground_size == 64 and cfg.genview.scorer_size == 64 and cfg.genview.p == 1.0
    imagenet = parse("method=mocov2", "preset=imagenet").config
    assert imagenet.generation.foreground_size == 0 and imagenet.genview.scorer_size == 0
    with pytest.raises(ConfigError, match="choose one of: mocov2, mocov3, byol, simsiam, swav, simclr"):
        parse("method=barlow")
    with pytest.raises(ConfigError, match=r"genview.p .* \[0, 1\]"):
        parse("genview.p=1.5")
    with pytest.raises(ConfigError, match="set crops.n_global=2"):
        parse("crops.n_global=1")
