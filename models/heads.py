"""Projection / prediction MLPs and the student of the two-branch SSL methods (docs/METHODS.md §4).

SimCLR, MoCo v2/v3, BYOL, SimSiam, Barlow Twins and SwAV all put an MLP *projector* (and some a
*predictor*) on the backbone; they differ in depth, width and where BatchNorm goes, which
`projection_mlp` spells out per method:

    Linear → [BN] → ReLU → ... → Linear → [BN (last_bn)]

`SSLStudent` is what DeepSpeed optimises for those methods: backbone → projector → predictor, run
over a list of crops with one backbone call per resolution (as DINO's `MultiCropWrapper`), or one
packed call for all of them when `set_multicrop` made the ViT backbone packed (models/packed_vit.py).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import Tensor, nn

from genssl.models.packed_vit import PackedViT

__all__ = ["projection_mlp", "backbone_over_crops", "SSLStudent"]


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, hidden_bn: bool = True,
                   last_bn: bool = False, last_bn_affine: bool = True, last_bias: bool = True) -> nn.Sequential:
    """``num_layers`` linear layers with BN (``hidden_bn``) and ReLU between them.

    ``last_bn`` adds a BatchNorm after the last linear (SimSiam, MoCo v3; ``last_bn_affine=False``
    there); linears followed by a BN carry no bias (it would be cancelled). ``num_layers=1`` is a
    single linear.
    """
    if num_layers < 1 or min(in_dim, hidden_dim, out_dim) < 1:
        raise ValueError(f"projection_mlp needs num_layers >= 1 and positive dims, got num_layers={num_layers}, "
                         f"dims=({in_dim}, {hidden_dim}, {out_dim})")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == num_layers - 1
        bn = last_bn if last else hidden_bn
        layers.append(nn.Linear(d_in, d_out, bias=(last_bias and not bn) if last else not bn))
        if bn:
            layers.append(nn.BatchNorm1d(d_out, affine=last_bn_affine if last else True))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def backbone_over_crops(backbone: nn.Module, crops: Sequence[Tensor] | Tensor) -> Tensor:
    """Features ``[Σ B_i, embed_dim]`` of a list of crops ``[B_i, 3, H_i, W_i]``, in crop order.

    Consecutive crops of equal (H, W) go through the backbone in one call. BatchNorm therefore sees
    them as one batch, as in DINO's and SwAV's multi-crop code. A `PackedViT` backbone
    (``multicrop=packed``) takes all crops in one call instead, with the same result.
    """
    if isinstance(crops, Tensor):
        crops = [crops]
    if len(crops) == 0:
        raise ValueError("got an empty list of crops")
    if isinstance(backbone, PackedViT):
        return backbone(list(crops))
    feats = [backbone(torch.cat(list(group))) for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:]))]
    return torch.cat(feats)


class SSLStudent(nn.Module):
    """backbone → projector (→ predictor): ``forward(crops) -> (z, p)``.

    ``z`` ``[Σ B_i, D]`` are the projections of all crops in crop order, ``p`` the predictor's output
    on ``z`` (``None`` without a predictor). Methods with a momentum encoder keep an EMA copy of this
    whole module and use only its ``z``.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, crops: Sequence[Tensor] | Tensor) -> tuple[Tensor, Tensor | None]:
        z = self.projector(backbone_over_crops(self.backbone, crops))
        return z, (self.predictor(z) if self.predictor is not None else None)
