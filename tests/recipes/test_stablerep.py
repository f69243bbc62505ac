"""recipes/stablerep.py end to end on tiny settings (96 built-in 32 px images, one epoch of 6 steps per
training stage): on a view store written here (4 views per image) with a rerun from a moved copy that
skips every finished stage, and the text-to-image mode (captions + a tiny pipeline built in the test).
The E-LDM stages are engine/pipeline.py's, run end to end by tests/recipes/test_mixdiff_recipe.py."""

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
        "stablerep.m=3", "generation.views_per_image=3", "generation.steps=2", "generation.batch_size=12"]


def _stablerep(out: Path, cache: Path, *keys: str) -> str:
    return run_recipe([sys.executable, "recipes/stablerep.py", *TINY, f"cache_dir={cache}", *keys, f"out={out}"],
                      timeout=900)


@pytest.fixture(scope="module")
def store_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """A view store of the training images (view k: the image rolled by k pixels, darkened), then the recipe on it."""
    from genssl.data.viewstore import create_view_store
    from genssl.engine.distributed import DistInfo
    from genssl.engine.setup import load_data

    import torch
    from PIL import Image

    root = tmp_path_factory.mktemp("stablerep")
    cache = root / "cache"
    index = load_data(DATA, str(cache), DistInfo(0, 1, 0, torch.device("cpu"))).train
    store = create_view_store(root / "views.zarr", len(index), 3, 0, 32, 32,
                              {"fingerprint": index.fingerprint, "generator_hash": "test"}, shard_size=32, view_format="png")
    for i, path in enumerate(index.paths):
        image = np.asarray(Image.open(path).convert("RGB").resize((32, 32)))
        store.write_source(i, np.stack([(np.roll(image, k, axis=1) * (1 - 0.1 * k)).astype(np.uint8) for k in range(3)]),
                           np.zeros(3), durable=False)
    out = root / "run"
    return out, cache, _stablerep(out, cache, f"views={root / 'views.zarr'}")


@pytest.mark.slow
def test_runs_end_to_end_on_a_store_and_a_rerun_skips_finished_stages(store_run) -> None:
    out, cache, log = store_run
    result = json.loads((out / "eval.json").read_text())
    for row in ("random_init", "base", "stablerep"):
        assert_accuracies(result[row], n_test=N_TEST)
    assert result["mode"] == "synthetic" and result["m"] == 3
    assert "StableRep (synthetic, m=3)" in log and "SimCLR (real)" in log and "k-NN top-1 %" in log
    assert not (out / "eldm").exists()
    identity = json.loads((out / "stablerep" / "stage.json").read_text())["run_identity"]
    assert identity["stablerep.m"] == 3 and identity["stablerep.mode"] == "synthetic"
    metrics = [json.loads(line) for line in (out / "stablerep" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(r["loss"]) for r in metrics if "loss" in r)

    moved = out.with_name("moved")
    shutil.copytree(out, moved)
    again = _stablerep(moved, cache, f"views={out.parent / 'views.zarr'}")
    assert again.count("finished earlier with these settings; skipped") == 2  # base, stablerep
    assert json.loads((moved / "eval.json").read_text())["stablerep"] == result["stablerep"]


@pytest.mark.slow
def test_captions_and_a_text_to_image_pipeline(store_run, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from genssl.data.viewstore import open_view_store
    from genssl.generators.text_to_image import captions_fingerprint
    from genssl.tests.generators.test_text_to_image import build_tiny_pipeline

    out, cache, _ = store_run
    pipeline = build_tiny_pipeline(tmp_path / "pipeline", sample_size=16)  # 32 px views
    captions = [f"a {c} {s}" for c in ("red", "blue", "green", "grey") for s in ("square", "circle", "star", "ring")]
    (tmp_path / "captions.csv").write_text("image,caption\n" + "".join(f"x{n}.jpg,{c}\n" for n, c in enumerate(captions)))
    run = tmp_path / "run"
    log = _stablerep(run, cache, f"encoder={out / 'base'}", f"captions={tmp_path / 'captions.csv'}",
                     f"generator.pipeline={pipeline}", "generator.guidance=6", "batch_size=4")
    store = open_view_store(run / "views.zarr", "r")
    assert store.fingerprint == captions_fingerprint(captions) and store.views_per_image == 3 and store.n_sources == 16
    assert store.attrs["sampler"]["guidance"] == 6.0 and store.attrs["sampler"]["generator"] == "text_to_image"
    assert not (run / "base").exists() and not (run / "eldm").exists()
    result = json.loads((run / "eval.json").read_text())
    assert_accuracies(result["stablerep"], n_test=N_TEST)  # evaluated on data=
    assert result["captions"].endswith("captions.csv") and "StableRep (synthetic, m=3)" in log


def test_config_errors_name_the_fix() -> None:
    from genssl.engine.config import ConfigError, parse_config
    from genssl.recipes.stablerep import StableRepRecipeConfig, presets

    def parse(*keys):
        return parse_config(list(keys), StableRepRecipeConfig, presets(), default_preset="smoke").config

    cfg = parse()
    assert cfg.stablerep.m == cfg.generation.views_per_image == 4 and cfg.generation.interp_per_image == 0
    assert cfg.generator.guidance == 8.0 and StableRepRecipeConfig().stablerep.m == 6  # the paper's m is the key's default
    for keys, message in [(["stablerep.m=5"], "views_per_image"), (["captions=c.txt"], "generator.pipeline"),
                          (["captions=c.txt", "generator.pipeline=p", "stablerep.mode=real+synthetic"], "mode=synthetic"),
                          (["method=byol"], "method=simclr"), (["crops.n_local=2"], "n_local=0")]:
        with pytest.raises(ConfigError, match=message):
            parse(*keys)
