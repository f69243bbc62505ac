"""Backbones: every name builds, features have the right width, ViTs take any multiple of the patch."""

from __future__ import annotations

import json

import pytest
import torch

from genssl.models.backbones import BACKBONES, backbone_config, build_backbone

EXPECTED_DIM = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768, "resnet18": 512, "resnet50": 2048}


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_builds_and_has_embed_dim(name: str) -> None:
    torch.manual_seed(0)
    vit = name.startswith("vit_")
    model = build_backbone(name, img_size=16, patch_size=8 if vit else None).eval()
    assert model.embed_dim == EXPECTED_DIM[name]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16 if vit else 32, 16 if vit else 32))
    assert out.shape == (2, model.embed_dim)
    assert torch.isfinite(out).all()


def test_vit_dynamic_image_size() -> None:
    model = build_backbone("vit_tiny", img_size=32, patch_size=8).eval()
    with torch.no_grad():
        big = model(torch.randn(3, 3, 32, 32))
        small = model(torch.randn(3, 3, 16, 16))
        wide = model(torch.randn(1, 3, 16, 24))
    assert big.shape == small.shape == (3, 192)
    assert wide.shape == (1, 192)


def test_vit_default_patch_is_16() -> None:
    model = build_backbone("vit_tiny", img_size=32)
    assert model.patch_embed.patch_size == (16, 16)
    assert model.build_kwargs["patch_size"] is None


def test_rebuild_from_build_kwargs() -> None:
    model = build_backbone("vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.1)
    cfg = json.loads(json.dumps(backbone_config(model)))  # what encoder.json holds
    assert cfg == {"name": "vit_tiny", "img_size": 32, "patch_size": 8, "drop_path_rate": 0.1}
    again = build_backbone(**cfg)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(a[key].shape == b[key].shape for key in a)
    again.load_state_dict(a)  # strict


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="vit_small.*resnet50"):
        build_backbone("vit_huge")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="only applies to ViT"):
        build_backbone("resnet18", patch_size=8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_backbone("vit_tiny", img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="not made by build_backbone"):
        backbone_config(torch.nn.Linear(2, 2))
