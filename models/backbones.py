"""Backbones (timm, randomly initialised) returning one feature vector per image.

`build_backbone(name, ...)` gives an `nn.Module` with

- `embed_dim: int` — width of the feature vector,
- `forward(x [B, 3, H, W]) -> [B, embed_dim]` — the CLS token after the final norm for ViTs
  (what DINO uses), the globally average-pooled last stage for ResNets,
- `build_kwargs: dict` — JSON-able keyword arguments such that `build_backbone(**build_kwargs)`
  rebuilds the same architecture (the engine writes them to `encoder.json`).

ViTs are built with `dynamic_img_size=True`: the position embedding (a grid for `img_size`) is
interpolated to whatever resolution comes in, so one model sees 224² global and 96² local crops
(or 32²/16² on small data). Every H and W must be a multiple of the patch size. `patch_size`
overrides timm's 16 (use 4 or 8 for 32–64 px images).

ResNets take `stem_stride`: how much the stem shrinks the image before the first stage. 4 is
timm's ImageNet stem (7×7 stride-2 conv + max-pool). 1 and 2 replace it by one 3×3 conv of that
stride without max-pool: 1 is the CIFAR stem of SimCLR (He et al.'s CIFAR ResNets keep full
resolution), 2 a cheaper middle ground. On 32² images the ImageNet stem leaves a 1×1 map at the
last stage, which is why small images want a smaller stride.

ResNets also take `width`: the channels of the first stage (the stages have width, 2·width, 4·width,
8·width; timm's 64 gives 64–512). Halving it quarters the cost of a step, which is what lets a 2-core
CPU run enough steps to learn on 32² images (docs/LEARNING.md). The stem keeps timm's 64 channels.
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

BACKBONES = ("vit_tiny", "vit_small", "vit_base", "resnet18", "resnet50")

_TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
}


def build_backbone(
    name: str,
    img_size: int = 224,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    stem_stride: int = 4,
    width: int = 64,
) -> nn.Module:
    """Build a randomly initialised backbone without classifier (see module docstring)."""
    if name not in _TIMM_NAMES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    is_vit = name.startswith("vit_")
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
    if is_vit:
        patch = 16 if patch_size is None else int(patch_size)
        if patch < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if img_size < patch or img_size % patch != 0:
            raise ValueError(
                f"img_size ({img_size}) must be a positive multiple of patch_size ({patch})"
            )
        # use_naflex=False pins the classic VisionTransformer (state_dict keys) whatever
        # TIMM_USE_NAFLEXVIT says in the environment.
        kwargs.update(img_size=img_size, patch_size=patch, dynamic_img_size=True, use_naflex=False)
    elif patch_size is not None:
        raise ValueError(f"patch_size only applies to ViT backbones, not {name!r}")
    if stem_stride not in (1, 2, 4):
        raise ValueError(f"stem_stride must be 1, 2 or 4 (4 = the ImageNet stem), got {stem_stride}")
    if is_vit and stem_stride != 4:
        raise ValueError(f"stem_stride only applies to ResNet backbones, not {name!r}; leave it at 4")
    if width < 8:
        raise ValueError(f"width (the ResNet's first-stage channels) must be >= 8, got {width}")
    if is_vit and width != 64:
        raise ValueError(f"width only applies to ResNet backbones, not {name!r}; leave it at 64")
    if width != 64:
        kwargs.update(channels=tuple(width * m for m in (1, 2, 4, 8)))

    model = timm.create_model(_TIMM_NAMES[name], **kwargs)
    if stem_stride != 4:
        model.conv1 = nn.Conv2d(3, model.bn1.num_features, 3, stride=stem_stride, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm inits convs
        model.maxpool = nn.Identity()
    model.embed_dim = int(model.num_features)  # timm ResNets only have num_features
    model.build_kwargs = dict(
        name=name, img_size=int(img_size), patch_size=patch_size, drop_path_rate=float(drop_path_rate),
        stem_stride=int(stem_stride), width=int(width),
    )
    return model


def backbone_config(module: nn.Module) -> dict[str, Any]:
    """The kwargs that rebuild `module` with `build_backbone(**config)` (a copy, JSON-able)."""
    cfg = getattr(module, "build_kwargs", None)
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{type(module).__name__} was not made by build_backbone (no .build_kwargs attribute)"
        )
    return dict(cfg)
