"""Barlow Twins: make the cross-correlation of two views' embeddings the identity (docs/METHODS.md §5.6).

- Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
  Reduction", ICML 2021, https://arxiv.org/abs/2103.03230
- official code: github.com/facebookresearch/barlowtwins, main.py (`BarlowTwins.forward`)

Each view's projections ``z^A, z^B`` [N, D] are standardised per dimension over the batch (a
BatchNorm without affine: batch mean, biased batch variance, eps 1e-5), giving ``ẑ^A, ẑ^B``; then

    C_ij = (1/N) Σ_n ẑ^A_ni ẑ^B_nj                              [D, D] cross-correlation
    L    = Σ_i (1 − C_ii)²  +  λ Σ_i Σ_{j≠i} C_ij²             λ = 0.0051

unscaled, as the paper and the final official code (its early ``--scale-loss 1/32`` with λ = 3.9e-3
was removed in June 2021, commit 046eec3).

Distributed (W ranks, equal local batches n, N = W·n): the means, variances and C are sums over the
*global* batch, all-reduced with torch's functional ``all_reduce``, which is differentiable (its
backward all-reduces the gradient, as in genssl.models.sync_batchnorm). Every rank then holds the
same L, and the gradient w.r.t. this rank's rows is W × the single-process gradient; DeepSpeed's
average over ranks restores the single-process gradient exactly (the convention of
genssl.models.contrastive). The official code all-reduces C with the plain, non-differentiable
``torch.distributed.all_reduce``: each rank back-propagates only its own rows' share and DDP
averages, so the gradient it applies is 1/W of the single-process one (docs/METHODS.md §5.6).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn

from genssl.models.heads import SSLStudent, projection_mlp

__all__ = ["BarlowConfig", "build_barlow_student", "barlow_twins_loss", "barlow_twins_loss_reference",
           "BarlowObjective"]


@dataclasses.dataclass
class BarlowConfig:
    """Barlow Twins head and loss (the official code's ImageNet ResNet-50 values, main.py)."""

    hidden_dim: int = 8192   # projector 8192-8192-8192 (paper §2 / `--projector`)
    out_dim: int = 8192
    lambd: float = 0.0051    # off-diagonal weight: `--lambd 0.0051` in the final code; the paper rounds to 5e-3
    eps: float = 1e-5        # of the affine-free BatchNorm that standardises each view

    def validate(self) -> None:
        if min(self.hidden_dim, self.out_dim) < 1:
            raise ValueError(f"barlow.hidden_dim and barlow.out_dim must be >= 1, "
                             f"got {self.hidden_dim}, {self.out_dim}")
        if self.lambd < 0:
            raise ValueError(f"barlow.lambd must be >= 0 (the paper uses 5e-3), got {self.lambd}")
        if self.eps <= 0:
            raise ValueError(f"barlow.eps must be > 0 (BatchNorm's 1e-5), got {self.eps}")


def build_barlow_student(backbone: nn.Module, cfg: BarlowConfig) -> SSLStudent:
    """backbone → Linear-BN-ReLU-Linear-BN-ReLU-Linear (no bias anywhere, as the official projector)."""
    cfg.validate()
    projector = projection_mlp(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=3,
                               hidden_bn=True, last_bn=False, last_bias=False)
    return SSLStudent(backbone, projector)


def _sum_over_ranks(t: Tensor) -> Tensor:
    """Σ over ranks, differentiable (backward all-reduces the gradient); identity on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed._functional_collectives import all_reduce, wait_tensor

        return wait_tensor(all_reduce(t, "sum", dist.group.WORLD))
    return t


def _off_diagonal(c: Tensor) -> Tensor:
    """The D·(D−1) off-diagonal entries of a square [D, D] matrix, as a view (no mask, no copy)."""
    d = c.shape[0]
    # Row-major, the diagonal entries are D+1 apart: dropping the last one and reading the rest in
    # rows of D+1 puts every diagonal entry in column 0.
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:]


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051,
                      eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, on_diag, off_diag)`` with ``L = on_diag + lambd·off_diag`` (module docstring).

    Args:
        z1, z2: [n, D] this rank's projections of the two views (rows = the same images).
        lambd: weight of the off-diagonal term (paper 5e-3, official code 0.0051).
        eps: added to the batch variance before the square root (BatchNorm's eps).
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [n, D] with the same shape, "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n, d = z1.shape
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    n_total = n * world  # the loader gives every rank the same batch size
    if n_total < 2:
        raise ValueError("Barlow Twins standardises over the batch: it needs a global batch of at least 2")
    z = torch.stack([z1, z2])                                         # [2, n, D]
    mean = _sum_over_ranks(z.sum(1, keepdim=True)) / n_total          # [2, 1, D]
    centred = z - mean
    var = _sum_over_ranks(centred.square().sum(1, keepdim=True)) / n_total  # biased, as BatchNorm in training
    zn = centred * torch.rsqrt(var + eps)
    c = _sum_over_ranks(zn[0].T @ zn[1]) / n_total                    # [D, D]
    on_diag = (torch.diagonal(c) - 1).square().sum()
    off_diag = _off_diagonal(c).square().sum()
    return on_diag + lambd * off_diag, on_diag, off_diag


def barlow_twins_loss_reference(z1: Tensor, z2: Tensor, lambd: float = 0.0051,
                                eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Plain single-process loops over samples and entries (tests only): ``(L, on_diag, off_diag)``."""
    n, d = z1.shape

    def standardise(z):
        mean = sum(z[k] for k in range(n)) / n
        var = sum((z[k] - mean) ** 2 for k in range(n)) / n
        return [(z[k] - mean) / torch.sqrt(var + eps) for k in range(n)]

    a, b = standardise(z1), standardise(z2)
    c = sum(torch.outer(a[k], b[k]) for k in range(n)) / n
    on_diag = sum((1 - c[i, i]) ** 2 for i in range(d))
    off_diag = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on_diag + lambd * off_diag, on_diag, off_diag


class BarlowObjective(nn.Module):
    """Barlow Twins on two views; no momentum encoder, no running state."""

    def __init__(self, student: SSLStudent, cfg: BarlowConfig, n_global: int, epochs: int, dtype: torch.dtype):
        super().__init__()
        cfg.validate()
        if n_global != 2:
            raise ValueError(f"Barlow Twins compares two views: set crops.n_global=2 (got {n_global})")
        self.teacher = None
        self.cfg, self.dtype = cfg, dtype

    def training_loss(self, engine, batch, progress) -> tuple[Tensor, dict[str, Tensor]]:
        crops, _ = batch
        if len(crops) != 2:
            raise ValueError(f"Barlow Twins takes exactly two crops per image, got {len(crops)}: set crops.n_local=0")
        # One call per view, as the official code: the projector's BatchNorms see one view at a time.
        z1, z2 = (engine(view.to(self.dtype))[0] for view in crops)  # [B, D] each
        z1, z2 = (z.to(torch.promote_types(z.dtype, torch.float32)) for z in (z1, z2))  # statistics in fp32 at least
        loss, on_diag, off_diag = barlow_twins_loss(z1, z2, self.cfg.lambd, self.cfg.eps)
        return loss, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}

    def late_parameters(self, student: SSLStudent) -> list[nn.Parameter]:
        return []
