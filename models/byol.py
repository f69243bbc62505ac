"""BYOL: an online network predicts a slow-moving target network's projection (docs/METHODS.md §5.4).

- Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020,
  https://arxiv.org/abs/2006.07733
- official code: github.com/deepmind/deepmind-research, byol/byol_experiment.py (`loss_fn`),
  byol/utils/helpers.py (`regression_loss`), byol/configs/byol.py

Online network = the student (backbone → projector → predictor q), target network = the EMA teacher
(its backbone → projector; its predictor is never used). For two views v, v' of each image, with
``p = q(z)`` online and ``z'`` the target's projection::

    ℓ(p, z') = ‖ p/‖p‖ − z'/‖z'‖ ‖² = 2 − 2·cos(p, sg(z'))
    L        = mean_batch [ ℓ(p_1, z'_2) + ℓ(p_2, z'_1) ]          (the paper's L + L̃, in [0, 8])

The target follows ``ξ ← τ·ξ + (1 − τ)·θ`` after every kept step, with τ rising on a cosine from
τ_base = 0.996 to 1; genssl's engine applies that schedule from ``ema.momentum`` →
``ema.momentum_end``, which the recipe sets (BYOL's official config uses τ_base 0.99 for 100/300
epochs, 0.996 for 1000).

Distributed: a per-row loss, so each rank's local mean already follows the engine's convention
(average of rank losses = global loss; DeepSpeed's gradient average = the global gradient). Only the
BatchNorms see the global batch, through the engine's SyncBatchNorm conversion.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genssl.models.ema import EMATeacher
from genssl.models.heads import SSLStudent, backbone_over_crops, projection_mlp
from genssl.models.qdc import quality_weights

__all__ = ["BYOLConfig", "build_byol_student", "byol_loss", "byol_loss_reference", "BYOLObjective"]


@dataclasses.dataclass
class BYOLConfig:
    """BYOL heads (paper §3.3, official byol/configs/byol.py `network_config`)."""

    hidden_dim: int = 4096            # projector Linear-BN-ReLU-Linear 4096 → 256
    out_dim: int = 256
    predictor_hidden_dim: int = 4096  # predictor: same shape as the projector, 256 → 4096 → 256

    def validate(self) -> None:
        for name in ("hidden_dim", "out_dim", "predictor_hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"byol.{name} must be >= 1, got {getattr(self, name)}")


def build_byol_student(backbone: nn.Module, cfg: BYOLConfig) -> SSLStudent:
    cfg.validate()
    projector = projection_mlp(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=2)
    predictor = projection_mlp(cfg.out_dim, cfg.predictor_hidden_dim, cfg.out_dim, num_layers=2)
    return SSLStudent(backbone, projector, predictor)


def byol_loss(p: Tensor, z: Tensor, weights: Tensor | None = None) -> Tensor:
    """``mean_rows w·(2 − 2·cos(p, sg(z)))``: p [n, D] online predictions, z [n, D] target projections,
    ``weights`` [n] optional per-pair weights (GenView's QDC weights, detached; default 1).

    ``z`` is detached here: the target never takes a gradient, whatever the caller passes.
    """
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must both be [n, D] with the same shape, got {tuple(p.shape)} and {tuple(z.shape)}")
    rows = 2 - 2 * (F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(1)
    return (rows if weights is None else weights.detach().to(rows.dtype) * rows).mean()


def byol_loss_reference(p: Tensor, z: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-row loop of the official ``regression_loss`` ‖p̂ − ẑ‖², weighted (tests only)."""
    w = torch.ones(p.shape[0], dtype=p.dtype) if weights is None else weights
    rows = [w[i] * ((p[i] / p[i].norm() - z[i].detach() / z[i].detach().norm()) ** 2).sum() for i in range(p.shape[0])]
    return torch.stack(rows).mean()


class BYOLObjective(nn.Module):
    """BYOL on two views: the student is the online network, ``teacher`` the target network."""

    def __init__(self, student: SSLStudent, cfg: BYOLConfig, n_global: int, epochs: int, dtype: torch.dtype):
        super().__init__()
        cfg.validate()
        if n_global != 2:
            raise ValueError(f"BYOL compares two views: set crops.n_global=2 (got {n_global})")
        if student.predictor is None:
            raise ValueError("BYOL's online network needs a predictor: build the student with build_byol_student")
        self.teacher = EMATeacher(student)
        self.cfg, self.dtype = cfg, dtype

    def target_projection(self, view: Tensor) -> Tensor:
        """The target network's projection ``z'`` [B, D] of one view (backbone → projector; no predictor)."""
        target = self.teacher.module
        with torch.no_grad(), torch.autocast(view.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            z = target.projector(backbone_over_crops(target.backbone, view))
        return z.to(torch.promote_types(z.dtype, torch.float32))

    def training_loss(self, engine, batch, progress) -> tuple[Tensor, dict[str, Tensor]]:
        crops, _ = batch
        if len(crops) != 2:
            raise ValueError(f"BYOL takes exactly two crops per image, got {len(crops)}: set crops.n_local=0")
        t1, t2 = (self.target_projection(view) for view in crops)
        # One call per view, as the official code: BatchNorm statistics are per view.
        p1, p2 = (engine(view.to(self.dtype))[1] for view in crops)
        p1, p2 = (p.to(torch.promote_types(p.dtype, torch.float32)) for p in (p1, p2))
        w = quality_weights(self, crops[0], crops[1])  # GenView QDC (models/qdc.py); None: unweighted
        loss_1, loss_2 = byol_loss(p1, t2, w), byol_loss(p2, t1, w)  # view 1 predicts view 2's target, and back
        return loss_1 + loss_2, {"loss_view1": loss_1.detach(), "loss_view2": loss_2.detach()}

    def late_parameters(self, student: SSLStudent) -> list[nn.Parameter]:
        return []
