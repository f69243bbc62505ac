"""StableRep as a genssl objective: multi-positive contrastive learning over m views per source.

- Tian, Fan, Isola, Chang, Krishnan, *StableRep: Synthetic Images from Text-to-Image Models Make Strong
  Visual Representation Learners*, NeurIPS 2023, https://arxiv.org/abs/2306.00984 (docs/METHODS.md §3)

A batch holds n sources with V views each (V = m synthetic views, + 1 real image in the
``real+synthetic`` mode), every view augmented on its own. The student is backbone f → projector g;
``z = normalize(g(f(x)))`` for the nV views of the *global* batch, ``s_ij = z_i·z_j / τ``, and the
positives of view i are the other views of its source, ``P(i) = {j ≠ i : y_j = y_i}``. The target
distribution of row i is uniform over P(i), the prediction a softmax over every other view (the
paper's Algorithm 1, self masked in both):

    ℓ_i = log Σ_{j≠i} exp(s_ij) − (1/|P(i)|) Σ_{j∈P(i)} s_ij        (= H(p_i, q_i))
    L   = (1/nV) Σ_i ℓ_i

With V = 2 this is SimCLR's NT-Xent. The loss is `models.contrastive.MultiPositiveLoss` (the fused
kernel on CUDA, its plain-torch reference on CPU). On W ranks every rank's rows are scored against the
columns of all ranks, gathered with their gradient; labels are the sources' dataset indices, global by
construction, and the loader puts all V views of a source on one rank (data/multiview_loader.py).

Projector (defaults, official code ``google-research/syn-rep-learn`` ``StableRep/models/StableRep.py``):
3 linear layers 4096 → 4096 → 256 with BN + ReLU after the first two and none after the last
(``--ssl-mlp-dim 4096 --ssl-emb-dim 256``); τ = 0.1 (``--ssl-temp``). The official model runs the
projector once per view (BN statistics per view); genssl runs the student once over all views, as its
SimCLR objective does (BN statistics over the nV images).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from genssl.models.contrastive import MultiPositiveLoss
from genssl.models.heads import SSLStudent, projection_mlp

__all__ = ["StableRepConfig", "build_stablerep_student", "StableRepObjective", "stablerep_loss_reference",
           "view_labels"]


@dataclasses.dataclass
class StableRepConfig:
    """Head and loss settings; defaults = the official ViT-B/16 run (docs/METHODS.md §3)."""

    hidden_dim: int = 4096    # --ssl-mlp-dim
    out_dim: int = 256        # --ssl-emb-dim
    num_layers: int = 3       # the official image_mlp: 3 linears
    temperature: float = 0.1  # --ssl-temp; paper τ = 0.1

    def validate(self) -> None:
        if self.hidden_dim < 1 or self.out_dim < 1:
            raise ValueError(f"stablerep.hidden_dim and stablerep.out_dim must be >= 1, got {self.hidden_dim} and "
                             f"{self.out_dim}")
        if self.num_layers < 1:
            raise ValueError(f"stablerep.num_layers must be >= 1 (official: 3), got {self.num_layers}")
        if not self.temperature > 0:
            raise ValueError(f"stablerep.temperature must be > 0 (paper: 0.1), got {self.temperature}")


def build_stablerep_student(backbone: nn.Module, cfg: StableRepConfig) -> SSLStudent:
    cfg.validate()
    projector = projection_mlp(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=cfg.num_layers,
                               hidden_bn=True, last_bn=False)
    return SSLStudent(backbone, projector)


def view_labels(indices: torch.Tensor, n_views: int) -> torch.Tensor:
    """Labels ``[V·n]`` of view-major rows (all sources' view 0, then view 1, ...): the source indices."""
    return indices.reshape(-1).repeat(n_views)


class StableRepObjective(nn.Module):
    """The multi-positive loss over the global batch of all views (module docstring); no teacher, no state.

    Batches are ``(crops, indices)``: ``crops`` V tensors ``[n, 3, H, W]`` (view v of every source),
    ``indices`` ``[n]`` the sources' dataset indices (data/multiview_loader.py's batches unpack so).
    """

    def __init__(self, student: SSLStudent, cfg: StableRepConfig, n_views: int, epochs: int, dtype: torch.dtype):
        super().__init__()
        cfg.validate()
        if n_views < 2:
            raise ValueError(f"StableRep needs at least 2 views per source (each view's positives are the others), "
                             f"got {n_views}; set stablerep.m >= 2")
        self.teacher = None
        self.loss = MultiPositiveLoss(cfg.temperature)
        self.cfg, self.n_views, self.dtype = cfg, int(n_views), dtype

    def training_loss(self, engine, batch, progress):
        crops, indices = batch
        if len(crops) != self.n_views or any(c.shape != crops[0].shape for c in crops):
            raise ValueError(f"StableRep expects {self.n_views} equal-shape views per source, got "
                             f"{[tuple(c.shape) for c in crops]}")
        # One student call over all views: the backbone sees the nV images as one batch.
        z, _ = engine([c.to(self.dtype) for c in crops])  # [V·n, D], view-major
        labels = view_labels(indices.to(z.device), self.n_views)
        loss = self.loss(z.float(), labels)
        return loss, {"loss_contrastive": loss.detach()}

    def late_parameters(self, student: SSLStudent) -> list[nn.Parameter]:
        return []


def stablerep_loss_reference(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain-torch multi-positive loss, one row at a time, as the paper's Algorithm 1 writes it.

    z: ``[N, D]`` projections (any order), labels: ``[N]``. Row i's target ``p`` is uniform over the
    other rows of its label, its prediction ``q = softmax`` over every row but itself; the loss is
    ``mean_i H(p_i, q_i)``, a row without a positive contributing 0.
    """
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    rows = []
    for i in range(n):
        others = torch.arange(n, device=z.device) != i
        logits = (z @ z[i]) / temperature  # [N]
        log_q = logits[others] - torch.logsumexp(logits[others], dim=0)
        positive = (labels[others] == labels[i]).to(z.dtype)
        if positive.sum() == 0:
            rows.append(z.new_zeros(()) * logits.sum())  # keeps the graph: a zero row still has a gradient
            continue
        p = positive / positive.sum()
        rows.append(-(p * log_q).sum())
    return torch.stack(rows).mean()
