"""SimSiam: a siamese network with a predictor and a stop-gradient, no momentum encoder (docs/METHODS.md §5.5).

- Chen, He, "Exploring Simple Siamese Representation Learning", CVPR 2021, https://arxiv.org/abs/2011.10566
- official code: github.com/facebookresearch/simsiam, simsiam/builder.py, main_simsiam.py

One network f (backbone → projector) and a predictor h. For two views with ``z_k = f(x_k)`` and
``p_k = h(z_k)``::

    D(p, z) = − cos(p, sg(z))                                  (negative cosine, stop-gradient on z)
    L       = ½ D(p_1, z_2) + ½ D(p_2, z_1)                    (mean over the batch; in [−1, 1])

Projector (ImageNet): three linears 2048 → 2048 → 2048 → 2048 with BN on every layer, the output BN
without affine parameters; predictor 2048 → 512 → 2048 with BN only on the hidden layer.

The paper keeps the predictor's learning rate fixed (not decayed; §4.2, ``--fix-pred-lr``); genssl's engine
has one cosine schedule for all parameters, so the predictor is decayed too (docs/METHODS.md §5.5).

Distributed: a per-row loss, so each rank's local mean already follows the engine's convention.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genssl.models.heads import SSLStudent, projection_mlp
from genssl.models.qdc import quality_weights

__all__ = ["SimSiamConfig", "build_simsiam_student", "simsiam_loss", "simsiam_loss_reference", "SimSiamObjective"]


@dataclasses.dataclass
class SimSiamConfig:
    """SimSiam heads (paper §3, official `--dim 2048 --pred-dim 512`)."""

    hidden_dim: int = 2048
    out_dim: int = 2048
    predictor_hidden_dim: int = 512  # the predictor's bottleneck
    fix_pred_lr: bool = True  # the predictor keeps the base lr, undecayed (paper §4.2, official `--fix-pred-lr`)

    def validate(self) -> None:
        for name in ("hidden_dim", "out_dim", "predictor_hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"simsiam.{name} must be >= 1, got {getattr(self, name)}")


def build_simsiam_student(backbone: nn.Module, cfg: SimSiamConfig) -> SSLStudent:
    cfg.validate()
    # The official output layer keeps the ResNet fc's bias but freezes it (a BN follows); none here.
    projector = projection_mlp(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=3,
                               hidden_bn=True, last_bn=True, last_bn_affine=False)
    predictor = projection_mlp(cfg.out_dim, cfg.predictor_hidden_dim, cfg.out_dim, num_layers=2)
    return SSLStudent(backbone, projector, predictor)


def simsiam_loss(p: Tensor, z: Tensor, weights: Tensor | None = None) -> Tensor:
    """``D(p, z) = −mean_rows w·cos(p, sg(z))``: p [n, D] predictions, z [n, D] projections of the other
    view, ``weights`` [n] optional per-pair weights (GenView's QDC weights, detached; default 1).

    ``z`` is detached here: the stop-gradient is what keeps SimSiam from collapsing (paper §4.1).
    """
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must both be [n, D] with the same shape, got {tuple(p.shape)} and {tuple(z.shape)}")
    cos = F.cosine_similarity(p, z.detach(), dim=1)
    return -(cos if weights is None else weights.detach().to(cos.dtype) * cos).mean()


def simsiam_loss_reference(p: Tensor, z: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-row loop of −w·p·z/(‖p‖‖z‖) (tests only)."""
    w = torch.ones(p.shape[0], dtype=p.dtype) if weights is None else weights
    rows = [-w[i] * (p[i] @ z[i].detach()) / (p[i].norm() * z[i].detach().norm()) for i in range(p.shape[0])]
    return torch.stack(rows).mean()


class SimSiamObjective(nn.Module):
    """SimSiam on two views; no teacher, no running state."""

    def __init__(self, student: SSLStudent, cfg: SimSiamConfig, n_global: int, epochs: int, dtype: torch.dtype):
        super().__init__()
        cfg.validate()
        if n_global != 2:
            raise ValueError(f"SimSiam compares two views: set crops.n_global=2 (got {n_global})")
        if student.predictor is None:
            raise ValueError("SimSiam needs a predictor: build the student with build_simsiam_student")
        self.teacher = None
        self.cfg, self.dtype = cfg, dtype

    def training_loss(self, engine, batch, progress) -> tuple[Tensor, dict[str, Tensor]]:
        crops, _ = batch
        if len(crops) != 2:
            raise ValueError(f"SimSiam takes exactly two crops per image, got {len(crops)}: set crops.n_local=0")
        # One call per view, as the official code: BatchNorm statistics are per view.
        (z1, p1), (z2, p2) = (engine(view.to(self.dtype)) for view in crops)
        fp32 = torch.promote_types(z1.dtype, torch.float32)
        z1, z2, p1, p2 = (t.to(fp32) for t in (z1, z2, p1, p2))
        w = quality_weights(self, crops[0], crops[1])  # GenView QDC (models/qdc.py); None: unweighted
        loss_1, loss_2 = simsiam_loss(p1, z2, w), simsiam_loss(p2, z1, w)
        # Collapse monitor of the paper (Fig. 2): std over the batch of ẑ = z/‖z‖, averaged over
        # dimensions; ≈ 1/√D for a healthy run, 0 when collapsed.
        z_std = F.normalize(z1.detach(), dim=1).std(0).mean()
        terms = {"loss_view1": loss_1.detach(), "loss_view2": loss_2.detach(), "z_std": z_std}
        return 0.5 * (loss_1 + loss_2), terms

    def late_parameters(self, student: SSLStudent) -> list[nn.Parameter]:
        return []

    def fixed_lr_parameters(self, student: SSLStudent) -> list[nn.Parameter]:
        """The predictor's parameters when ``fix_pred_lr``: the engine gives them the peak lr throughout."""
        return list(student.predictor.parameters()) if self.cfg.fix_pred_lr else []
