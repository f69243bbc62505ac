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
    x = torch.randn(2, 3, 16 if vit else 32, 16 if vit else 32)
    with torch.no_grad():
        out, alone = model(x), model(x[1:])
    assert out.shape == (2, model.embed_dim)
    # in eval mode each image's embedding is its own: the same alone as in a batch, and not the other's
    torch.testing.assert_close(alone, out[1:], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[0], out[1], atol=1e-3)


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
    assert cfg == {"name": "vit_tiny", "img_size": 32, "patch_size": 8, "drop_path_rate": 0.1, "stem_stride": 4,
                   "width": 64}
    again = build_backbone(**cfg)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(a[key].shape == b[key].shape for key in a)
    again.load_state_dict(a)  # strict


@pytest.mark.parametrize("stride", [1, 2])
def test_small_image_stem_keeps_resolution_and_rebuilds(stride: int) -> None:
    model = build_backbone("resnet18", img_size=32, stem_stride=stride).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (stride, stride)
    # 32 px through stem stride s and three stride-2 stages: a (32 / s / 8)² map before pooling.
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 32 // stride // 8, 32 // stride // 8)
    again = build_backbone(**json.loads(json.dumps(backbone_config(model))))
    again.load_state_dict(model.state_dict())  # strict: same architecture
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), model(x))
    with pytest.raises(ValueError, match="stem_stride must be 1, 2 or 4"):
        build_backbone("resnet18", stem_stride=3)
    with pytest.raises(ValueError, match="only applies to ResNet"):
        build_backbone("vit_tiny", img_size=32, patch_size=8, stem_stride=2)


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


def test_resnet_width_scales_every_stage_and_rebuilds() -> None:
    model = build_backbone("resnet18", img_size=32, stem_stride=2, width=32).eval()
    assert model.embed_dim == 256 and [m[0].conv1.out_channels for m in (model.layer1, model.layer2, model.layer3,
                                                                         model.layer4)] == [32, 64, 128, 256]
    again = build_backbone(**json.loads(json.dumps(backbone_config(model))))
    again.load_state_dict(model.state_dict())  # strict: the same architecture
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    with pytest.raises(ValueError, match="width only applies to ResNet"):
        build_backbone("vit_tiny", img_size=32, patch_size=8, width=32)
