"""All-gather with gradient and the distributed form of the contrastive loss.

``gather_with_grad(x)``: forward = all-gather of ``x`` [n, ...] from every rank into
[world * n, ...] (rank order); backward = reduce-scatter (sum over ranks) of the incoming gradient,
returning this rank's slice. CUDA tensors on NCCL use ``reduce_scatter_tensor``; other backends
(gloo lacks reduce-scatter) use ``all_reduce`` + slice. All ranks must pass the same shape.

``distributed_contrastive_loss``: local rows against the all-gathered columns. Definition (W ranks,
equal local batch ``M_local``, ``M = W * M_local`` global rows, ``r`` = this rank)::

    loss_r = (1/M) * sum_{i in rows of rank r} w_i l_i          (reduction="mean")
    l_i    = the contrastive row loss of genssl.kernels.contrastive_loss with columns
             K = cat_r(k_local_r) and, if exclude_self, self_offset = r * M_local

so that ``sum_r loss_r`` equals the single-process loss on the concatenated batch, and the gradient
of ``loss_r`` w.r.t. this rank's ``q_local`` / ``k_local`` (after the reduce-scatter of the gather's
backward) equals the gradient of that single-process loss w.r.t. the same rows.

Note for data-parallel training: an engine that *averages* gradients over W ranks (DDP, DeepSpeed)
then yields ``1/W`` of the single-process gradient; multiply ``loss_r`` by W (the loss modules in
``genssl.models.contrastive`` do) to recover it exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .contrastive import contrastive_loss

__all__ = ["gather_with_grad", "distributed_contrastive_loss", "world_info", "all_gather_no_grad"]


def world_info(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _nccl_tensor(x: torch.Tensor, group) -> bool:
    """CUDA tensor on a group with an NCCL backend (``"nccl"`` or e.g. ``"cpu:gloo,cuda:nccl"``)."""
    return x.is_cuda and "nccl" in str(dist.get_backend(group))


def _all_gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    x = x.contiguous()
    if _nccl_tensor(x, group) and hasattr(dist, "all_gather_into_tensor"):
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        rank, world = world_info(group)
        ctx.group, ctx.rank, ctx.world, ctx.n = group, rank, world, x.shape[0]
        return _all_gather(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        n, rank, group = ctx.n, ctx.rank, ctx.group
        if _nccl_tensor(grad, group) and hasattr(dist, "reduce_scatter_tensor"):
            out = torch.empty((n,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=group)
            return out, None
        grad = grad.clone()  # all_reduce is in place; never modify the incoming buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
        return grad[rank * n:(rank + 1) * n], None


def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather ``x`` [n, ...] into [world * n, ...] (rank order), no autograd; identity on one rank."""
    _, world = world_info(group)
    if world == 1:
        return x
    return _all_gather(x.detach(), group, world)


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather ``x`` [n, ...] over ``group`` into [world * n, ...] with a reduce-scatter backward.

    Identity when torch.distributed is not initialised or the group has one rank.
    """
    _, world = world_info(group)
    if world == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def distributed_contrastive_loss(q_local, k_local, q_labels_local, k_labels_local, *, temperature, weights=None,
                                 exclude_self=True, reduction="mean", group=None):
    """Contrastive loss of this rank's rows against the columns of all ranks (see module docstring).

    Args:
        q_local: [M_local, D] rows of this rank. k_local: [N_local, D] columns of this rank
            (gathered with gradient; ``N_local == M_local`` when ``exclude_self``).
        q_labels_local, k_labels_local: integer labels, global across ranks (e.g. dataset indices).
        exclude_self: exclude column ``rank * M_local + i`` for local row ``i`` (NT-Xent / StableRep,
            where k_local is q_local); False for MoCo v3 (queries vs. momentum keys).
        reduction: ``"mean"`` -> ``(1 / (W * M_local)) * sum_local w_i l_i`` (global-row mean; summing
            over ranks gives the single-process loss); ``"none"`` -> local vector ``w_i l_i``.

    Every rank must call it with the same shapes (all-gather). Without an initialised process group
    (or with one rank) this is :func:`genssl.kernels.contrastive_loss`.
    """
    rank, world = world_info(group)
    if not isinstance(q_local, torch.Tensor) or q_local.dim() != 2:
        raise ValueError("q_local must be a 2-D tensor [M_local, D]")
    if not isinstance(k_local, torch.Tensor) or k_local.dim() != 2:
        raise ValueError("k_local must be a 2-D tensor [N_local, D]")
    if not isinstance(k_labels_local, torch.Tensor) or k_labels_local.dim() != 1:
        raise ValueError("k_labels_local must be a 1-D integer tensor [N_local]")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'none'), got {reduction!r}")
    m_local, n_local = q_local.shape[0], k_local.shape[0]
    if exclude_self and m_local != n_local:
        raise ValueError(f"exclude_self needs k_local rows ({n_local}) == q_local rows ({m_local})")
    if k_labels_local.shape[0] != n_local:
        raise ValueError(f"k_labels_local must have shape [{n_local}], got {tuple(k_labels_local.shape)}")
    if world == 1:
        return contrastive_loss(q_local, k_local, q_labels_local, k_labels_local, temperature=temperature,
                                weights=weights, self_offset=0 if exclude_self else None, reduction=reduction)
    k_all = gather_with_grad(k_local, group)
    k_labels_all = all_gather_no_grad(k_labels_local.to(torch.int64), group)
    rows = contrastive_loss(q_local, k_all, q_labels_local, k_labels_all, temperature=temperature, weights=weights,
                            self_offset=rank * n_local if exclude_self else None, reduction="none")
    if reduction == "none":
        return rows
    return rows.sum() / (world * m_local)
