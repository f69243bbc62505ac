"""Contrastive loss modules (SimCLR NT-Xent, StableRep multi-positive, MoCo v2, MoCo v3) and the
GenView quality-driven (QDC) row weights.

All of them are thin wrappers around one fused kernel, :func:`genssl.kernels.contrastive_loss`
(rows ``q`` against columns ``k`` with integer labels, see docs/KERNELS.md). They L2-normalise the
features first, and run distributed when ``torch.distributed`` is initialised with more than one
rank: local rows are scored against the columns of every rank (gathered with gradient).

Distributed value and gradient convention: each rank returns the mean over *its own* rows (so the
average of the ranks' values is the single-process loss on the concatenated batch), and the gradient
of that value w.r.t. this rank's features is ``W x`` the gradient of the single-process loss. A
data-parallel engine that averages gradients over the W ranks (DDP, DeepSpeed) therefore applies
exactly the single-process gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genssl.kernels import contrastive_loss, distributed_contrastive_loss
from genssl.kernels.distributed import all_gather_no_grad, world_info

__all__ = ["NTXentLoss", "MultiPositiveLoss", "MoCoV2Loss", "MoCoV3Loss", "qdc_weights"]


def qdc_weights(scores: torch.Tensor) -> torch.Tensor:
    """GenView quality-driven contrastive weights ``w = B * softmax(scores)`` (temperature 1, detached).

    - GenView, 2024, https://arxiv.org/abs/2403.12003 (QDC loss)

    ``scores`` [B]: per-pair quality ``q_i = cos(z^f_i1, z^f_i2) - cos(z^b_i1, z^b_i2)``. The weights
    average to 1, so ``(1/B) sum_i w_i l_i`` stays on the scale of the unweighted loss. Pass the same
    weights to both symmetric directions (the ``weights=`` argument of the losses below does that).
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    s = scores.detach().float()
    return s.shape[0] * torch.softmax(s, dim=0)


def _check_weights(weights, batch):
    if weights is not None and (weights.dim() != 1 or weights.shape[0] != batch):
        raise ValueError(f"weights must have shape [{batch}], got {tuple(weights.shape)}")


def _loss(q, k, q_labels, k_labels, temperature, weights, exclude_self):
    """Mean over this rank's rows; distributed (gathered columns) when W > 1 (see module docstring)."""
    _, world = world_info()
    if world > 1:
        return world * distributed_contrastive_loss(q, k, q_labels, k_labels, temperature=temperature,
                                                    weights=weights, exclude_self=exclude_self)
    return contrastive_loss(q, k, q_labels, k_labels, temperature=temperature, weights=weights,
                            self_offset=0 if exclude_self else None)


class NTXentLoss(nn.Module):
    """Normalized temperature-scaled cross entropy (NT-Xent) of SimCLR, for two views.

    - SimCLR, 2020, https://arxiv.org/abs/2002.05709

    With ``z = normalize([z1; z2])`` (2B rows), ``s_ij = z_i . z_j / tau``, and ``p(i)`` the other
    view of sample ``i``::

        loss = (1 / 2B) sum_i w_i [ -s_{i,p(i)} + log sum_{j != i} exp(s_ij) ]

    i.e. the kernel with ``k = q``, labels ``[0..B-1, 0..B-1]`` (m = 2 views per label) and
    ``self_offset = 0``. Distributed: negatives from all ranks (gathered with gradient).

    Args:
        temperature: tau (paper: 0.1 for ImageNet with large batches, 0.5 for CIFAR-10).

    Forward:
        z1, z2: [B, D] projections of the two views. weights: optional [B] row weights (e.g.
        :func:`qdc_weights`), applied to both directions.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
        B = z1.shape[0]
        _check_weights(weights, B)
        rank, world = world_info()
        z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
        ids = torch.arange(B, device=z.device) + rank * B  # globally unique sample ids
        labels = torch.cat([ids, ids])
        w = None if weights is None else torch.cat([weights, weights])
        return _loss(z, z, labels, labels, self.temperature, w, exclude_self=True)


class MultiPositiveLoss(nn.Module):
    """Multi-positive contrastive loss of StableRep (m >= 2 views share a label).

    - StableRep, 2023, https://arxiv.org/abs/2306.00984

    With ``z = normalize(features)``, ``s_ij = z_i . z_j / tau`` and ``P(i) = {j != i: y_j = y_i}``::

        loss = (1/n) sum_i w_i [ log sum_{j != i} exp(s_ij) - (1/|P(i)|) sum_{j in P(i)} s_ij ]

    (cross entropy against the target distribution uniform over the positives); rows with no
    positive contribute 0. m = 2 is NT-Xent. Groups may be ragged.

    Args:
        temperature: tau (paper: 0.1).

    Forward:
        features: [n, D] (e.g. B sources x m views, any order). labels: [n] integer group ids; in
        distributed runs they must be global (e.g. dataset indices), since labels equal across
        ranks are positives. weights: optional [n].
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None):
        if features.dim() != 2 or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"features must be [n, D] and labels [n], got {tuple(features.shape)} and "
                             f"{tuple(labels.shape)}")
        _check_weights(weights, features.shape[0])
        z = F.normalize(features, dim=1)
        return _loss(z, z, labels, labels, self.temperature, weights, exclude_self=True)


class MoCoV2Loss(nn.Module):
    """InfoNCE with a queue of negatives (MoCo v2).

    - MoCo, 2019, https://arxiv.org/abs/1911.05722 ; MoCo v2, 2020, https://arxiv.org/abs/2003.04297

    With ``q = normalize(query)``, ``k = normalize(key)`` (momentum encoder), queue ``Q`` [K, dim]::

        loss = (1/B) sum_i w_i [ -q_i.k_i / tau + log( sum_j exp(q_i.k_j / tau) + sum_l exp(q_i.Q_l / tau) ) ]

    computed by the kernel with columns ``[k; Q]``, row labels ``0..B-1``, key labels ``0..B-1`` and
    queue labels ``-1`` (so queue entries never match: labels of queries are always >= 0). Note the
    other B-1 keys of the batch are negatives too (the paper's logits use only the queue); with
    K = 65536 this changes the negative set by B-1 entries. After the loss, the (detached) keys are
    enqueued, replacing the oldest entries (ring buffer with pointer ``queue_ptr``); in distributed
    runs the keys of all ranks are gathered and enqueued in rank order, so queues stay identical.
    The loss itself is per rank (local keys + queue), as in the paper.

    Args:
        dim: feature dimension. queue_size: K (paper: 65536). temperature: tau (MoCo v2: 0.2).

    Forward:
        query [B, dim], key [B, dim], weights optional [B], update_queue (default True).
    """

    def __init__(self, dim: int, queue_size: int = 65536, temperature: float = 0.2):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if queue_size < 1 or dim < 1:
            raise ValueError(f"dim and queue_size must be >= 1, got dim={dim}, queue_size={queue_size}")
        self.temperature = float(temperature)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` [b, dim] (normalised, detached) at the pointer, wrapping around."""
        keys = F.normalize(keys.detach().to(self.queue.dtype), dim=1)
        K = self.queue.shape[0]
        if keys.shape[0] > K:
            keys = keys[-K:]
        ptr = int(self.queue_ptr)
        idx = (torch.arange(keys.shape[0], device=self.queue.device) + ptr) % K
        self.queue[idx] = keys
        self.queue_ptr.fill_((ptr + keys.shape[0]) % K)

    def forward(self, query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor | None = None,
                update_queue: bool = True) -> torch.Tensor:
        if query.dim() != 2 or query.shape != key.shape or query.shape[1] != self.queue.shape[1]:
            raise ValueError(f"query and key must both be [B, {self.queue.shape[1]}], got {tuple(query.shape)} "
                             f"and {tuple(key.shape)}")
        B = query.shape[0]
        _check_weights(weights, B)
        q = F.normalize(query, dim=1)
        k = F.normalize(key, dim=1)
        cols = torch.cat([k, self.queue.detach().to(k.dtype)], dim=0)  # a copy: enqueue below can't alias it
        ids = torch.arange(B, device=q.device)
        col_labels = torch.cat([ids, torch.full((self.queue.shape[0],), -1, dtype=torch.long, device=q.device)])
        loss = contrastive_loss(q, cols, ids, col_labels, temperature=self.temperature, weights=weights)
        if update_queue:
            self.enqueue(all_gather_no_grad(k.detach()))
        return loss


class MoCoV3Loss(nn.Module):
    """InfoNCE of MoCo v3: queries against the momentum keys of the whole (global) batch.

    - MoCo v3, 2021, https://arxiv.org/abs/2104.02057

    With ``q = normalize(query)`` [B], ``k = normalize(key)`` gathered over ranks [W*B], positive of
    local row ``i`` at global column ``rank*B + i``::

        loss = 2 tau * (1/B) sum_i w_i [ -q_i.k_i / tau + log sum_j exp(q_i.k_j / tau) ]

    The factor ``2 tau`` is the paper's (Alg. 1: ``CrossEntropyLoss()(logits, labels) * (2 * tau)``);
    it makes the gradient scale independent of tau and, with the two symmetric terms
    (:meth:`symmetric`), matches the official loss. Nothing is excluded (``self_offset=None``).

    Args:
        temperature: tau (paper: 0.2 for ViT, 1.0 for R50).

    Forward:
        query [B, D] (from the base encoder + predictor), key [B, D] (momentum encoder; usually
        without gradient), weights optional [B].
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor | None = None):
        if query.dim() != 2 or query.shape != key.shape:
            raise ValueError(f"query and key must both be [B, D], got {tuple(query.shape)} and {tuple(key.shape)}")
        B = query.shape[0]
        _check_weights(weights, B)
        rank, _ = world_info()
        q = F.normalize(query, dim=1)
        k = F.normalize(key, dim=1)
        ids = torch.arange(B, device=q.device) + rank * B
        loss = _loss(q, k, ids, ids, self.temperature, weights, exclude_self=False)
        return 2.0 * self.temperature * loss

    def symmetric(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(q1, k2) + forward(q2, k1)`` with the same row weights in both terms."""
        return self.forward(q1, k2, weights) + self.forward(q2, k1, weights)
