"""Encoders load with plain timm (engine/export.py, docs/ENGINE.md "Loading an encoder with timm").

What a user types (the README's lines) must give the network genssl's own loader gives: the same
tensors in the state dict and the same features in float32, at the training size and at another
(ViTs interpolate their position embedding). The small-image ResNet stems, which timm cannot build,
are marked so in encoder.json, and plain timm refuses their weights instead of loading them wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from genssl.engine.export import load_encoder, save_encoder
from genssl.models.backbones import build_backbone

CONFIG = {"crops": {"mean": [0.41, 0.45, 0.5], "std": [0.21, 0.24, 0.27]}, "eval": {"size": 32}}


def _export(tmp_path: Path, **arch) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone(**arch)
    # Trained BatchNorm statistics differ from the initial 0 / 1; make them so here, so a loader that
    # dropped the buffers would show in the features.
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    save_encoder(backbone, tmp_path, CONFIG)
    return tmp_path


def _timm_model(run: Path) -> torch.nn.Module:
    """The README's lines, verbatim apart from the run folder."""
    spec = json.load(open(run / "encoder.json"))["timm"]
    return timm.create_model(spec["model_name"], pretrained=True, **spec["kwargs"],
                             pretrained_cfg_overlay=dict(spec["pretrained_cfg_overlay"], file=str(run / "encoder.safetensors"))).eval()


@pytest.mark.parametrize("arch, sizes", [
    (dict(name="vit_tiny", img_size=32, patch_size=4), (32, 48)),
    (dict(name="resnet18", img_size=32, stem_stride=4), (32, 45)),
    (dict(name="resnet18", img_size=32, stem_stride=4, width=16), (32,)),
])
def test_plain_timm_gives_genssl_features(tmp_path: Path, arch: dict, sizes: tuple[int, ...]) -> None:
    run = _export(tmp_path, **arch)
    ours, _ = load_encoder(run)
    model = _timm_model(run)
    assert type(model) is type(ours)
    saved = load_file(str(run / "encoder.safetensors"))
    state = model.state_dict()
    assert set(state) == set(saved), "plain timm's keys must be the file's, none missing, none extra"
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(3, 3, size, size, generator=gen)
            features, reference = model(x), ours(x)
            assert features.shape == (3, ours.embed_dim)
            torch.testing.assert_close(features, reference, rtol=1e-6, atol=1e-6)
    # timm's own preprocessing config carries the run's normalisation and eval size
    data = timm.data.resolve_data_config(model=model)
    assert tuple(data["mean"]) == tuple(CONFIG["crops"]["mean"]) and tuple(data["std"]) == tuple(CONFIG["crops"]["std"])
    assert tuple(data["input_size"]) == (3, 32, 32) and data["interpolation"] == "bilinear"


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_small_image_resnet_stem_is_genssl_only(tmp_path: Path, stem_stride: int) -> None:
    run = _export(tmp_path, name="resnet18", img_size=32, stem_stride=stem_stride)
    spec = json.loads((run / "encoder.json").read_text())["timm"]
    assert spec["model_name"] is None and "load_encoder" in spec["reason"]
    ours, _ = load_encoder(run)
    assert ours(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    # Plain timm's resnet18 (7x7 stem) must refuse these weights, not load a different network.
    with pytest.raises(RuntimeError, match="conv1.weight"):
        timm.create_model("resnet18", pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=str(run / "encoder.safetensors")))
