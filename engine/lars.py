"""LARS (You, Gitman, Ginsburg 2017, arXiv 1708.03888) as SimCLR, BYOL, Barlow Twins and SwAV train with it.

For every weight matrix / conv kernel ``w`` with gradient ``g`` (biases and norm parameters, ndim <= 1,
are excluded from both weight decay and adaptation, as in those papers' code):

    g' = trust · (g + wd·w),    trust = η‖w‖ / ‖g + wd·w‖   (1 when either norm is 0)

then SGD with momentum on ``g'`` (``v ← m·v + g'``, ``w ← w − lr·v``, the form of the Barlow Twins
and SwAV implementations). η = ``optim.lars_eta`` (0.001 in all four papers).

Why as a gradient transform and not an optimizer: DeepSpeed hands the optimizer flat partitions of
many parameters (ZeRO 1-3, and the bf16 optimizer), so a per-layer norm cannot be taken there. Here
each parameter's full fp32 weight and gradient are read and its gradient rewritten through
DeepSpeed's ``safe_get_full_*`` / ``safe_set_full_grad`` between ``engine.backward`` and
``engine.step``, which is exact at every ZeRO stage; the optimizer is then plain SGD with momentum
and no weight decay of its own (`engine.trainer.build_optimizer`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["adapts", "lars_gradient", "apply_lars"]


def adapts(name: str, p: torch.Tensor) -> bool:
    """Whether parameter ``name`` takes weight decay and the trust ratio (the rule of `param_groups`).

    Under ZeRO-3 a parameter's own tensor is an empty placeholder; its real shape is ``ds_shape``."""
    return len(getattr(p, "ds_shape", p.shape)) > 1 and not name.endswith(".bias")


def lars_gradient(weight: torch.Tensor, grad: torch.Tensor, weight_decay: float, eta: float) -> torch.Tensor:
    """``g'`` of the module docstring for one parameter (full tensors, fp32)."""
    update = grad + weight_decay * weight
    w_norm, u_norm = torch.linalg.vector_norm(weight), torch.linalg.vector_norm(update)
    trust = torch.where((w_norm > 0) & (u_norm > 0), eta * w_norm / u_norm, torch.ones_like(w_norm))
    return trust * update


def apply_lars(module: nn.Module, weight_decay: float, eta: float) -> None:
    """Rewrite the gradients of ``module`` (the DeepSpeed engine's module) in place: ``g ← g'``.

    Call after ``engine.backward`` and before ``engine.step``, on every rank (ZeRO-3 gathers)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_grad

    for name, p in module.named_parameters():
        if not p.requires_grad or not adapts(name, p):
            continue
        grad = safe_get_full_grad(p)
        if grad is None:
            continue
        weight = safe_get_full_fp32_param(p)  # None without a DeepSpeed master copy: the parameter is it
        weight = p.detach() if weight is None else weight
        safe_set_full_grad(p, lars_gradient(weight.float(), grad.float(), weight_decay, eta).to(grad.dtype))
