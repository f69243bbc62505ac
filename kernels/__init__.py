"""Fused Triton losses and their plain-torch references (see docs/KERNELS.md)."""

from .contrastive import contrastive_loss
from .contrastive_reference import contrastive_loss_reference
from .distributed import distributed_contrastive_loss, gather_with_grad

__all__ = ["contrastive_loss", "contrastive_loss_reference", "gather_with_grad", "distributed_contrastive_loss"]
