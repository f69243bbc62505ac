"""recipes/generate_views.py with GenView's adaptive noise (docs/METHODS.md §2.1–2.2), in process.

Planted data: 12 images with a large centred flat square on a black/white checker texture ("object") and
12 of the texture alone ("plain"), 32 px. The E-LDM is untrained and tiny (its views are noise, which
does not matter here: what is checked is the level each view was drawn at); the frozen encoder is a
randomly initialised ViT-Tiny/8 (a 4×4 token grid), the E-LDM's own, so the default foreground encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genssl.data.dali_loader import DaliEvalLoader
from genssl.data.index import build_index
from genssl.data.viewstore import open_view_store
from genssl.engine.config import ConfigError, parse_config
from genssl.engine.distributed import DistInfo
from genssl.generators.foreground import (adaptive_noise_level, fit_dataset_pca, foreground_proportions,
                                          load_token_encoder, noise_level_histogram)
from genssl.generators.training import EncoderInput, file_sha256
from genssl.recipes.generate_views import PRESETS, GenerateConfig, GenerationError, generate
from genssl.tests.helpers import random_vit_encoder

pytestmark = pytest.mark.slow  # ~20 s of CPU: DALI loaders, a tiny sampler, the view-quality report

DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
PER_CLASS, SIDE, SAMPLE = 12, 32, 16


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from genssl.generators.autoencoder import autoencoder_hash, build_autoencoder, tiny_autoencoder_config
    from genssl.generators.eldm import ELDM, save_eldm, tiny_eldm_config
    from genssl.recipes.eldm import ELDM_DIR, GENERATOR_FILE

    root = tmp_path_factory.mktemp("adaptive")
    rng = np.random.default_rng(0)
    for cls in ("object", "plain"):
        (root / "data" / cls).mkdir(parents=True)
        for k in range(PER_CLASS):
            px = 128 + 60 * np.sign(rng.normal(size=(SIDE, SIDE, 1))).repeat(3, 2)
            if cls == "object":
                side = int(rng.integers(20, 28))
                top = (SIDE - side) // 2
                px[top:top + side, top:top + side] = rng.integers(150, 255, 3)
            Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(root / "data" / cls / f"{k}.png")
    index = build_index(root / "data", root / "cache")
    (root / "encoder").mkdir()
    encoder = random_vit_encoder(root / "encoder") / "encoder.safetensors"

    torch.manual_seed(0)
    ae = build_autoencoder(tiny_autoencoder_config())
    ae.save_pretrained(root / "autoencoder")
    folder = save_eldm(ELDM(tiny_eldm_config(embed_dim=192)), root / "eldm" / ELDM_DIR)
    spec = EncoderInput(SIDE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    (folder / GENERATOR_FILE).write_text(json.dumps({
        "autoencoder": {"path": str(root / "autoencoder"), "hash": autoencoder_hash(ae)}, "data": str(root / "data"),
        "encoder": {"path": str(encoder), "sha256": file_sha256(encoder), "embed_dim": 192, "input": spec.to_dict()}}))
    return {"root": root, "index": index, "encoder": encoder, "eldm": root / "eldm"}


def _cfg(world: dict, out: Path, **keys) -> GenerateConfig:
    argv = [f"eldm={world['eldm']}", f"data={world['root'] / 'data'}", f"out={out}", "views_per_image=2",
            "interp_per_image=0", "steps=1", "batch_size=16", "shard_size=8", "noise=adaptive",
            f"foreground_sample={SAMPLE}", f"cache_dir={world['root'] / 'cache'}", "progress=false", "num_workers=1",
            *[f"{k}={v}" for k, v in keys.items()]]
    return parse_config(argv, GenerateConfig, PRESETS, default_preset="smoke").config


@pytest.fixture(scope="module")
def adaptive(world) -> tuple[Path, dict]:
    out = world["root"] / "adaptive.zarr"
    total = generate(_cfg(world, out, contact_sheet=world["root"] / "sheet.png", report_sources=8), DIST)
    return out, total


def test_each_source_gets_the_level_of_its_foreground_proportion(world, adaptive) -> None:
    out, _ = adaptive
    store = open_view_store(out)
    levels = store._arrays["noise_level"][:]                        # [N, K]
    assert (levels[:, 0] == levels[:, 1]).all()                     # both views of a source share its level

    # the rule computed here, independently of the recipe's cached data-set pass
    enc = load_token_encoder(world["encoder"])
    pca = fit_dataset_pca(enc, world["index"], "cpu", SAMPLE, seed=0, num_threads=1)
    loader = DaliEvalLoader(world["index"], enc.input_size, 8, 0, 1, num_threads=1, crop_ratio=1.0,
                            mean=enc.mean.flatten().tolist(), std=enc.std.flatten().tolist())
    p, rows = [], []
    for images, _, idx in loader:
        p.append(foreground_proportions(pca, enc, [images]))
        rows.append(idx)
    p = torch.cat(p)[torch.argsort(torch.cat(rows))]
    np.testing.assert_array_equal(levels[:, 0], adaptive_noise_level(p).numpy())

    labels = world["index"].labels                                   # 0: object, 1: plain
    obj, plain = levels[labels == 0, 0], levels[labels == 1, 0]
    assert obj.min() > plain.max(), (obj, plain)                    # a large centred object: more noise
    assert store.sampler_settings["noise"]["mode"] == "adaptive" and store.sampler_settings["noise"]["size"] == SIDE


def test_report_and_tensorboard_show_the_levels(world, adaptive) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from genssl.generators.view_quality import format_report

    out, total = adaptive
    hist = noise_level_histogram(open_view_store(out)._arrays["noise_level"][:])
    assert total["quality"]["views"]["noise_levels"] == hist and len(hist) > 1
    text = format_report(total["quality"])
    assert f"noise levels of all {2 * 2 * PER_CLASS} generated views: " in text
    assert ", ".join(f"{k}: {v}" for k, v in sorted(hist.items(), key=lambda kv: int(kv[0]))) in text
    events = EventAccumulator(str(out.parent), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("views/contact_sheet")] == [2 * PER_CLASS]


def test_a_rerun_with_other_noise_settings_is_refused(world, adaptive) -> None:
    out, _ = adaptive
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for keys in ({"noise": "fixed", "noise_level": 100}, {"noise": "fixed"}, {"foreground_sample": 8},
                 {"foreground_size": 64}):
        with pytest.raises(GenerationError, match=r"noise settings .* use a new out="):
            generate(_cfg(world, out, report="false", **keys), DIST)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    assert generate(_cfg(world, out, report="false"), DIST)["written"] == 0  # the same settings: a no-op


def test_a_fixed_level_is_part_of_the_store_identity(world, tmp_path) -> None:
    out = tmp_path / "fixed.zarr"
    generate(_cfg(world, out, noise="fixed", noise_level=200, views_per_image=1, report="false"), DIST)
    assert (open_view_store(out)._arrays["noise_level"][:] == 200).all()
    with pytest.raises(GenerationError, match="noise settings"):
        generate(_cfg(world, out, noise="fixed", noise_level=300, views_per_image=1, report="false"), DIST)


def test_config_refusals() -> None:
    def parse(*argv):
        return parse_config(list(argv), GenerateConfig, PRESETS, default_preset="smoke")

    with pytest.raises(ConfigError, match="drop noise_level=100"):
        parse("noise=adaptive", "noise_level=100")
    with pytest.raises(ConfigError, match="needs eldm="):
        parse("noise=adaptive", "pipeline=/p")
    with pytest.raises(ConfigError, match="foreground_fraction"):
        parse("foreground_fraction=1.0")
