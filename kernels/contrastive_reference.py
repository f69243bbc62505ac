"""Plain-torch, materialising reference of the generic contrastive loss.

It builds the full ``M x N`` logit matrix, so its memory is ``O(M*N)``; it is the oracle of the
tests (call it with float64 inputs), the baseline of ``bench/losses.py`` and the CPU fallback of
:func:`genssl.kernels.contrastive_loss` when the Triton interpreter is not enabled.

Contract (shared with the Triton path, see docs/KERNELS.md)::

    s_ij  = q_i . k_j / temperature
    V(i)  = all columns j, except j = self_offset + i when self_offset is not None
    P(i)  = {j in V(i) : k_labels[j] == q_labels[i]}
    l_i   = logsumexp_{j in V(i)} s_ij - mean_{j in P(i)} s_ij      (l_i = 0, no gradient, if P(i) empty)
    "mean": (1/M) sum_i w_i l_i        "none": the vector w_i l_i
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["contrastive_loss_reference", "contrastive_rows_reference", "check_contrastive_inputs"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_REDUCTIONS = ("mean", "none")


def check_contrastive_inputs(q, k, q_labels, k_labels, temperature, weights, self_offset, reduction):
    """Validate the arguments of the contrastive loss; raise ``ValueError`` naming the bad one.

    Returns ``(temperature: float, self_offset: int | None)`` normalised to Python scalars.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16 (float64: reference only), got {t.dtype}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must have at least one row and one feature, got shape {tuple(t.shape)}")
    M, D = q.shape
    N, Dk = k.shape
    if D != Dk:
        raise ValueError(f"k feature dimension {Dk} does not match q feature dimension {D} (D mismatch)")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    for name, lab, n in (("q_labels", q_labels, M), ("k_labels", k_labels, N)):
        if not isinstance(lab, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of integers, got {type(lab).__name__}")
        if lab.dtype not in _INT_DTYPES:
            raise ValueError(f"{name} must be an integer tensor (int64), got {lab.dtype}")
        if lab.dim() != 1 or lab.shape[0] != n:
            raise ValueError(f"{name} must have shape [{n}], got {tuple(lab.shape)}")
        if lab.device != q.device:
            raise ValueError(f"{name} is on {lab.device} but q is on {q.device}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a positive scalar, got a tensor of shape {tuple(temperature.shape)}")
        temperature = float(temperature.item())
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a positive real number, got {temperature!r}")
    temperature = float(temperature)
    if not (temperature > 0.0) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise ValueError(f"weights must be a tensor of shape [{M}] or None, got {type(weights).__name__}")
        if weights.dim() != 1 or weights.shape[0] != M:
            raise ValueError(f"weights must have shape [{M}], got {tuple(weights.shape)}")
        if not (weights.is_floating_point() or weights.dtype in _INT_DTYPES):
            raise ValueError(f"weights must be a real tensor, got {weights.dtype}")
        if weights.device != q.device:
            raise ValueError(f"weights is on {weights.device} but q is on {q.device}")
    if self_offset is not None:
        if isinstance(self_offset, bool) or not isinstance(self_offset, numbers.Integral):
            raise ValueError(f"self_offset must be an int or None, got {self_offset!r}")
        self_offset = int(self_offset)
        if self_offset < 0 or self_offset + M > N:
            raise ValueError(
                f"self_offset={self_offset} out of range: need 0 <= self_offset and self_offset + M <= N "
                f"(M={M}, N={N})")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return temperature, self_offset


def reduce_rows(rows: torch.Tensor, weights, reduction: str) -> torch.Tensor:
    """Apply the (detached) row weights and the reduction to per-row losses ``rows`` [M]."""
    if weights is not None:
        rows = rows * weights.detach().to(rows.dtype)
    if reduction == "none":
        return rows
    return rows.sum() / rows.shape[0]


def contrastive_rows_reference(q, k, q_labels, k_labels, temperature: float, self_offset=None):
    """Unweighted per-row losses ``l_i`` [M] (float32, or float64 for float64 inputs).

    The logits are computed in the (promoted) input dtype, as a plain PyTorch implementation would
    (bf16 tensor-core matmul on a GPU), then upcast; everything after is float32 (float64 if asked).
    """
    dtype = torch.promote_types(q.dtype, k.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    M, N = q.shape[0], k.shape[0]
    s = (q.to(dtype) @ k.to(dtype).t()).to(acc) * (1.0 / temperature)
    pos = q_labels.view(M, 1).long() == k_labels.view(1, N).long()
    valid = None
    if self_offset is not None:
        valid = torch.ones(M, N, dtype=torch.bool, device=q.device)
        r = torch.arange(M, device=q.device)
        valid[r, r + self_offset] = False
        pos = pos & valid
    cnt = pos.sum(dim=1)
    active = cnt > 0
    s_lse = s if valid is None else s.masked_fill(~valid, float("-inf"))
    # Rows without a positive contribute 0 and no gradient; give them finite dummy logits so that
    # neither the forward nor the backward of logsumexp produce NaN (-inf - -inf).
    s_lse = torch.where(active.view(M, 1), s_lse, torch.zeros((), dtype=acc, device=q.device))
    lse = torch.logsumexp(s_lse, dim=1)
    pos_mean = torch.where(pos, s, torch.zeros((), dtype=acc, device=q.device)).sum(dim=1) / cnt.clamp_min(1)
    return torch.where(active, lse - pos_mean, torch.zeros((), dtype=acc, device=q.device))


def contrastive_loss_reference(q, k, q_labels, k_labels, *, temperature, weights=None, self_offset=None,
                               reduction="mean"):
    """Materialising reference of :func:`genssl.kernels.contrastive_loss` (same contract).

    Memory ``O(M*N)``. Output float32 (float64 when the inputs are float64); gradients reach ``q``
    and ``k`` through ordinary autograd, in their own dtypes.
    """
    temperature, self_offset = check_contrastive_inputs(q, k, q_labels, k_labels, temperature, weights,
                                                        self_offset, reduction)
    rows = contrastive_rows_reference(q, k, q_labels, k_labels, temperature, self_offset)
    return reduce_rows(rows, weights, reduction)
