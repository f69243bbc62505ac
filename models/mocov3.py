"""MoCo v3 as a genssl objective: symmetric InfoNCE of predictions against momentum keys.

- Chen, Xie, He, *An Empirical Study of Training Self-Supervised Vision Transformers*, ICCV 2021,
  https://arxiv.org/abs/2104.02057 (Algorithm 1) — docs/METHODS.md §5.3

Student = backbone f → projector g → predictor h; momentum encoder = EMA of f and g
(``θ_m ← m·θ_m + (1−m)·θ``, m from 0.99 to 1 on a cosine for ResNet-50, set by the recipe through
``cfg.ema``). For views x_1, x_2 of the global batch (N images)::

    q_v = normalize(h(g(f(x_v))))      k_v = normalize(g_m(f_m(x_v)))      (no gradient)
    ctr(q, k) = 2τ · (1/N) Σ_i [ −q_i·k_i/τ + log Σ_j exp(q_i·k_j/τ) ]     j over the global batch
    L = ctr(q_1, k_2) + ctr(q_2, k_1)

``MoCoV3Loss`` gathers the keys of all ranks (as ``concat_all_gather`` in the official code); the
factor 2τ is Algorithm 1's (``CrossEntropyLoss()(logits, labels) * (2 * tau)``). No queue, no
running state: the negatives share the query's batch, so synchronised BN (applied by genssl on > 1
rank, as the official code) leaks nothing and no BN shuffling is needed.

Heads (official code facebookresearch/moco-v3, ``moco/builder.py``): all linears without bias, BN +
ReLU after each hidden linear. ResNet-50: projector 2048 → 4096 → 256 with a last BN without
affine, predictor 256 → 4096 → 256 without a last BN. ViT: 3-layer projector, predictor with the
last BN (``mocov3.proj_layers=3 mocov3.pred_last_bn=true``). Temperature: ResNet-50 τ = 1.0
(``--moco-t`` default), ViT τ = 0.2 (CONFIG.md).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from genssl.models.contrastive import MoCoV3Loss
from genssl.models.ema import EMATeacher
from genssl.models.heads import SSLStudent, backbone_over_crops, projection_mlp
from genssl.models.qdc import quality_weights
from genssl.models.simclr import two_view_crops

__all__ = ["MoCoV3Config", "build_mocov3_student", "MoCoV3Objective", "mocov3_loss_reference"]


@dataclasses.dataclass
class MoCoV3Config:
    """Head and loss settings; defaults = MoCo v3, ImageNet, ResNet-50, batch 4096 (official code)."""

    hidden_dim: int = 4096        # `--moco-mlp-dim`
    out_dim: int = 256            # `--moco-dim`
    proj_layers: int = 2          # ResNet; 3 for ViT
    pred_layers: int = 2
    pred_last_bn: bool = False    # ResNet; True for ViT
    temperature: float = 1.0      # ResNet-50 (`--moco-t` default); 0.2 for ViT

    def validate(self) -> None:
        if self.hidden_dim < 1 or self.out_dim < 1:
            raise ValueError(f"mocov3.hidden_dim and mocov3.out_dim must be >= 1, got {self.hidden_dim} and {self.out_dim}")
        if self.proj_layers < 1 or self.pred_layers < 1:
            raise ValueError(f"mocov3.proj_layers and mocov3.pred_layers must be >= 1 (ResNet: 2 and 2, ViT: 3 and 2), "
                             f"got {self.proj_layers} and {self.pred_layers}")
        if not self.temperature > 0:
            raise ValueError(f"mocov3.temperature must be > 0 (ResNet-50: 1.0, ViT: 0.2), got {self.temperature}")


def build_mocov3_student(backbone: nn.Module, cfg: MoCoV3Config) -> SSLStudent:
    cfg.validate()
    projector = projection_mlp(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=cfg.proj_layers,
                               hidden_bn=True, last_bn=True, last_bn_affine=False, last_bias=False)
    predictor = projection_mlp(cfg.out_dim, cfg.hidden_dim, cfg.out_dim, num_layers=cfg.pred_layers,
                               hidden_bn=True, last_bn=cfg.pred_last_bn, last_bn_affine=False, last_bias=False)
    return SSLStudent(backbone, projector, predictor)


class MoCoV3Objective(nn.Module):
    """``ctr(q1, k2) + ctr(q2, k1)`` with keys of the whole global batch; no running state."""

    def __init__(self, student: SSLStudent, cfg: MoCoV3Config, n_global: int, epochs: int, dtype: torch.dtype):
        super().__init__()
        cfg.validate()
        if n_global != 2:
            raise ValueError(f"mocov3 needs n_global=2 global crops, got {n_global}; set crops.n_global=2")
        if student.predictor is None:
            raise ValueError("mocov3 needs a student with a predictor; build it with build_mocov3_student")
        # The teacher copies the predictor too (unused, a few MB): EMATeacher follows the whole student.
        self.teacher = EMATeacher(student)
        self.loss = MoCoV3Loss(cfg.temperature)
        self.cfg, self.dtype = cfg, dtype

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Momentum-encoder projections ``[B, D]`` (fp32): backbone and projector, no predictor."""
        t = self.teacher.module
        half = self.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=half):
            return t.projector(backbone_over_crops(t.backbone, x)).float()

    def training_loss(self, engine, batch, progress):
        crops, _ = batch
        x1, x2 = two_view_crops(crops, "mocov3")
        k1, k2 = self.keys(x1), self.keys(x2)
        # One call per view, as the official code: BN statistics per view.
        _, q1 = engine(x1.to(self.dtype))
        _, q2 = engine(x2.to(self.dtype))
        loss = self.loss.symmetric(q1, q2, k1, k2, weights=quality_weights(self, x1, x2))  # GenView QDC (models/qdc.py)
        return loss, {"loss_contrastive": loss.detach()}

    def late_parameters(self, student: SSLStudent) -> list[nn.Parameter]:
        return []


def mocov3_loss_reference(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """Plain-torch ``ctr(q1, k2) + ctr(q2, k1)`` (with the 2τ factor), one query at a time. All [N, D]."""

    def ctr(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        losses = [torch.logsumexp(k @ q[i] / temperature, dim=0) - k[i] @ q[i] / temperature
                  for i in range(q.shape[0])]
        return 2 * temperature * torch.stack(losses).mean()

    return ctr(q1, k2) + ctr(q2, k1)
