"""The artefact downstream users take away: ``encoder.safetensors`` + ``encoder.json``.

``encoder.json`` holds what rebuilds the backbone (``build_backbone(**arch)``), its embedding size,
the run's resolved config and the training data's fingerprint. Any key that names an encoder
(``encoder=``) accepts the run directory or the ``.safetensors`` file.
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


def save_encoder(backbone: nn.Module, out_dir: str | Path, config: dict, fingerprint: str = "") -> Path:
    out_dir = Path(out_dir)
    state = {k: v.detach().float().contiguous().cpu() for k, v in backbone.state_dict().items()}
    path = out_dir / ENCODER_FILE
    tmp = out_dir / f".{ENCODER_FILE}.tmp{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    meta = {"arch": dict(backbone.build_kwargs), "embed_dim": int(backbone.embed_dim), "data_fingerprint": fingerprint,
            "config": config}
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
