"""BatchNorm with statistics over the global batch of all ranks (SyncBatchNorm), on any device.

With one BatchNorm per rank, a ResNet trained on W ranks normalises with per-rank statistics: the
model then depends on how the batch is split, and the running statistics (the teacher's included)
differ by rank. DINO converts every BatchNorm of student and teacher with
``nn.SyncBatchNorm.convert_sync_batchnorm`` before training (main_dino.py); so does genssl.

``torch.nn.SyncBatchNorm`` runs only on GPU-like devices. `GlobalBatchNorm` is the same operation
for CPU ranks (gloo): the batch mean and variance are sums all-reduced through
``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the gradients, so the
gradient is that of the global batch exactly as in torch's SyncBatchNorm. Two passes (mean, then
the centred second moment) keep the variance as accurate as a single-process BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


def _all_reduce(t: Tensor) -> Tensor:
    """Sum over ranks; differentiable (its backward sums the gradients over ranks)."""
    from torch.distributed._functional_collectives import all_reduce, wait_tensor

    return wait_tensor(all_reduce(t, "sum", dist.group.WORLD))


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics cover every rank's batch (CPU SyncBatchNorm)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dims [N, C, ...], got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=xf.dtype, device=x.device)
        sums = _all_reduce(torch.cat([xf.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total  # [C]
        centred = xf - mean.view(shape)
        var = _all_reduce((centred * centred).sum(dims)) / total  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (total / max(float(total) - 1.0, 1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm in ``module`` synchronised across ranks: torch's SyncBatchNorm on CUDA,
    `GlobalBatchNorm` elsewhere. Parameters and buffers are kept (same tensors), so optimizer
    groups and EMA pairs built from them stay valid. Returns the module (a new one only when
    ``module`` itself is a BatchNorm)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in list(module.named_children()):
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(module, name, converted)
    return module


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


__all__ = ["GlobalBatchNorm", "convert_sync_batchnorm", "has_batchnorm"]
