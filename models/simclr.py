"""SimCLR as a genssl objective: NT-Xent between two views, negatives from the global batch.

- Chen, Kornblith, Norouzi, Hinton, *A Simple Framework for Contrastive Learning of Visual
  Representations*, ICML 2020, https://arxiv.org/abs/2002.05709 (docs/METHODS.md §5.1)

The student is backbone f → projector g; ``z = normalize(g(f(x)))`` for both views of the N images
of the *global* batch (2N rows), ``s_ij = z_i·z_j / τ``, ``p(i)`` the other view of image i::

    ℓ_i = −s_{i,p(i)} + log Σ_{j≠i} exp(s_ij)
    L   = (1/2N) Σ_i ℓ_i

On W ranks every rank's rows are scored against the columns of all ranks (``NTXentLoss`` gathers
them with gradient), so the negatives are the 2N − 2 other views of the global batch, as in the
paper's TPU setup. There is no momentum encoder (``teacher = None``) and no running state.

Projector (defaults, ResNet-50): SimCLR v1's 2-layer MLP 2048 → 2048 → 128 (paper §2.3 "Default
setting": "a 2-layer MLP projection head to project the representation to a 128-dimensional latent
space"). The official code (google-research/simclr, ``model_util.projection_head``)
puts BatchNorm after *every* head layer, the output one without a shift; genssl does the same with
an affine output BN (its shift β starts at 0). SimCLR v2's 3-layer head is ``simclr.num_layers=3``.
BatchNorm statistics cover the global batch (SyncBN on > 1 rank, the paper's "global BN").

Only two crops: SimCLR's loss is defined on pairs, and its multi-crop extension is not one
obvious formula, so local crops are refused with a ``ValueError`` rather than guessed.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from genssl.models.contrastive import NTXentLoss
from genssl.models.heads import SSLStudent, projection_mlp
from genssl.models.qdc import quality_weights

__all__ = ["SimCLRConfig", "build_simclr_student", "SimCLRObjective", "simclr_loss_reference"]


@dataclasses.dataclass
class SimCLRConfig:
    """Head and loss settings; defaults = SimCLR v1, ImageNet, ResNet-50, batch 4096."""

    hidden_dim: int = 2048     # = the ResNet-50 feature width (the official head keeps the input width)
    out_dim: int = 128         # paper §2.3: 128-d latent space
    num_layers: int = 2        # v1: one hidden layer; v2 uses 3
    last_bn: bool = True       # official code: BN after the output linear too
    temperature: float = 0.1   # ImageNet at batch 4096 (official README); 0.5 for CIFAR-10

    def validate(self) -> None:
        if self.hidden_dim < 1 or self.out_dim < 1:
            raise ValueError(f"simclr.hidden_dim and simclr.out_dim must be >= 1, got {self.hidden_dim} and {self.out_dim}")
        if self.num_layers < 1:
            raise ValueError(f"simclr.num_layers must be >= 1 (1 = linear head, 2 = SimCLR v1, 3 = v2), got {self.num_layers}")
        if not self.temperature > 0:
            raise ValueError(f"simclr.temperature must be > 0 (paper: 0.1 ImageNet, 0.5 CIFAR), got {self.temperature}")


def build_simclr_student(backbone: nn.Module, cfg: SimCLRConfig) -> SSLStudent:
    cfg.validate()
    projector = projection_mlp(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=cfg.num_layers,
                               hidden_bn=True, last_bn=cfg.last_bn, last_bn_affine=True)
    return SSLStudent(backbone, projector)


def two_view_crops(crops, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views ``[B, 3, H, W]`` of a two-view method; ValueError for any other crop list."""
    if len(crops) != 2 or crops[0].shape != crops[1].shape:
        shapes = [tuple(c.shape) for c in crops]
        raise ValueError(f"{method} trains on exactly two equal-shape crops per image (n_global=2, n_local=0), "
                         f"got {len(crops)} crops of shapes {shapes}; set crops.n_local=0")
    return crops[0], crops[1]


class SimCLRObjective(nn.Module):
    """NT-Xent over the global batch of both views (module docstring); no teacher, no state."""

    def __init__(self, student: SSLStudent, cfg: SimCLRConfig, n_global: int, epochs: int, dtype: torch.dtype):
        super().__init__()
        cfg.validate()
        if n_global != 2:
            raise ValueError(f"simclr needs n_global=2 global crops, got {n_global}; set crops.n_global=2")
        self.teacher = None
        self.loss = NTXentLoss(cfg.temperature)
        self.cfg, self.dtype = cfg, dtype

    def training_loss(self, engine, batch, progress):
        crops, _ = batch
        x1, x2 = two_view_crops(crops, "simclr")
        B = x1.shape[0]
        # One student call on both views: BN statistics over the 2B images, as the official code.
        z, _ = engine([x1.to(self.dtype), x2.to(self.dtype)])  # [2B, D]
        loss = self.loss(z[:B], z[B:], weights=quality_weights(self, x1, x2))  # GenView QDC (models/qdc.py)
        return loss, {"loss_contrastive": loss.detach()}

    def late_parameters(self, student: SSLStudent) -> list[nn.Parameter]:
        return []


def simclr_loss_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain-torch NT-Xent, one row at a time. z1, z2: [N, D] projections of the two views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2N, D]
    n = z.shape[0]
    losses = []
    for i in range(n):
        others = torch.cat([z[:i], z[i + 1:]])  # every view except i itself
        positive = z[(i + n // 2) % n]
        losses.append(torch.logsumexp(others @ z[i] / temperature, dim=0) - positive @ z[i] / temperature)
    return torch.stack(losses).mean()
