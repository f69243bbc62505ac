"""The artefact downstream users take away: ``encoder.safetensors`` + ``encoder.json``.

``encoder.json`` holds what rebuilds the backbone (``build_backbone(**arch)``), its embedding size,
the run's resolved config, the training data's fingerprint and ``timm``: how plain timm builds and
loads the same network (docs/ENGINE.md, "Loading an encoder with timm"):

    spec = json.load(open("run/encoder.json"))["timm"]
    model = timm.create_model(spec["model_name"], pretrained=True, **spec["kwargs"],
                              pretrained_cfg_overlay=dict(spec["pretrained_cfg_overlay"], file="run/encoder.safetensors"))

The weights are the backbone's own state dict, whose keys are timm's (the backbones are timm models
with ``num_classes=0``). ViTs and ResNets with the ImageNet stem (``stem_stride=4``) are timm
architectures; the small-image ResNet stems (``stem_stride`` 1 or 2: one 3×3 conv, no max-pool)
are not (timm's ResNet stems are a 7×7 conv or three 3×3 convs, each followed by a max-pool), so
their ``timm.model_name`` is null with the reason, and `load_encoder` is the loader. Any key that
names an encoder (``encoder=``) accepts the run directory or the ``.safetensors`` file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genssl.engine.atomic import write_json_atomic
from genssl.models.backbones import build_backbone

ENCODER_FILE = "encoder.safetensors"


def timm_spec(backbone: nn.Module, config: dict) -> dict:
    """``encoder.json``'s ``timm`` entry: ``model_name``, the ``kwargs`` of ``timm.create_model`` that
    give ``backbone``'s architecture, and a ``pretrained_cfg_overlay`` carrying the run's input
    normalisation and eval size (so ``timm.data.resolve_data_config(model=model)`` preprocesses as
    genssl's evaluation does). ``model_name`` is None, with a ``reason``, where timm has no such network."""
    arch = backbone.build_kwargs
    if arch["stem_stride"] != 4:
        return {"model_name": None, "reason": f"stem_stride={arch['stem_stride']}: a 3x3-conv ResNet stem without "
                "max-pool, which timm cannot build; load it with genssl.engine.export.load_encoder"}
    kwargs: dict = {"num_classes": 0}
    if arch.get("width", 64) != 64:  # as models/backbones.py builds a narrower ResNet
        kwargs.update(channels=[arch["width"] * m for m in (1, 2, 4, 8)])
    if arch["name"].startswith("vit_"):  # as models/backbones.py builds them
        kwargs.update(img_size=arch["img_size"], patch_size=arch["patch_size"] or 16, dynamic_img_size=True,
                      use_naflex=False)
    overlay = {}
    crops, evaluation = config.get("crops") or {}, config.get("eval") or {}
    if "mean" in crops and "std" in crops:
        overlay.update(mean=list(crops["mean"]), std=list(crops["std"]))
    if evaluation.get("size"):
        # engine/evaluate.py's DaliEvalLoader: bilinear resize of the shorter side to size / 0.875, centre crop
        overlay.update(input_size=[3, int(evaluation["size"]), int(evaluation["size"])], crop_pct=0.875,
                       interpolation="bilinear")
    return {"model_name": backbone.pretrained_cfg["architecture"], "kwargs": kwargs, "pretrained_cfg_overlay": overlay}


def save_encoder(backbone: nn.Module, out_dir: str | Path, config: dict, fingerprint: str = "") -> Path:
    out_dir = Path(out_dir)
    state = {k: v.detach().float().contiguous().cpu() for k, v in backbone.state_dict().items()}
    path = out_dir / ENCODER_FILE
    tmp = out_dir / f".{ENCODER_FILE}.tmp{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    meta = {"arch": dict(backbone.build_kwargs), "embed_dim": int(backbone.embed_dim), "data_fingerprint": fingerprint,
            "timm": timm_spec(backbone, config), "config": config}
    write_json_atomic(out_dir / "encoder.json", meta)
    return path


def resolve_encoder_path(spec: str | Path) -> Path:
    path = Path(spec)
    if path.is_dir():
        path = path / ENCODER_FILE
    if not path.is_file():
        raise ValueError(f"encoder={spec}: no {ENCODER_FILE} there; pass a finished run directory or its {ENCODER_FILE}")
    if not path.with_name("encoder.json").is_file():
        raise ValueError(f"encoder={spec}: encoder.json is missing beside {path.name}; it records the architecture, "
                         "so copy it from the run that wrote the encoder (the two files travel together)")
    return path


def load_encoder(spec: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the backbone from ``encoder.json`` and load its weights; returns (module, metadata)."""
    path = resolve_encoder_path(spec)
    meta = json.loads(path.with_name("encoder.json").read_text())
    backbone = build_backbone(**meta["arch"])
    backbone.load_state_dict(load_file(str(path)))
    return backbone.to(device).eval(), meta
