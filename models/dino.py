"""DINO: self-distillation with no labels.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin (2021), "Emerging Properties in
Self-Supervised Vision Transformers", ICCV. Reference code: github.com/facebookresearch/dino.

A student g_s and a teacher g_t (EMA of the student, kept by the engine) share an architecture
backbone → `DINOHead`. Every image gives `n_global` global crops (seen by both) and local crops
(student only). With teacher centre c, temperatures τ_t (teacher) and τ_s (student):

    q_i = softmax((g_t(x_i) − c) / τ_t)            i ∈ global crops  (no gradient)
    p_j = softmax(g_s(x_j) / τ_s)                   j ∈ all crops
    L   = 1/|P| Σ_{(i, j) ∈ P} mean_batch H(q_i, p_j),   P = {(i, j): i ∈ global, j ≠ i},
    H(q, p) = −Σ_k q_k log p_k

and after each step the centre moves towards the batch mean of the teacher logits (all ranks):

    c ← m·c + (1 − m)·mean_batch g_t(x),   m = center_momentum.

Layouts are crop-major, as the reference code: `student_out [n_crops·B, D]` holds all B rows of
crop 0, then crop 1, …, and the first `n_global` crops are the global ones; `teacher_out
[n_global·B, D]` likewise.

"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from genssl.models.heads import backbone_over_crops

__all__ = [
    "WeightNormLinear",
    "DINOHead",
    "MultiCropWrapper",
    "DINOLoss",
    "dino_loss_reference",
]

# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------


class _TruncNormalLinear(nn.Linear):
    """nn.Linear initialised as DINO's head (trunc-normal std 0.02, zero bias).

    The init lives in `reset_parameters`, i.e. inside the layer's own `__init__`, so it also
    holds under `deepspeed.zero.Init` (which partitions each module as its `__init__` returns).
    """

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class WeightNormLinear(nn.Module):
    """Weight-normalised linear layer without bias: `y = x @ (g · v / ‖v‖)ᵀ`, rows normalised.

    Parameters are named `weight_v [out, in]` and `weight_g [out, 1]` like the reference code's
    `nn.utils.weight_norm(..., dim=0)`, so DINO checkpoints load. The normalisation is written out
    in `forward` (no hooks or parametrizations), so DeepSpeed ZeRO-3 can partition and gather
    `weight_v` like any other parameter. With `train_g=False`, `g` is a buffer fixed to 1.
    """

    def __init__(self, in_features: int, out_features: int, train_g: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # nn.Linear's default init for v (the reference wraps a fresh nn.Linear); g = 1.
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        g = torch.ones(out_features, 1)
        if train_g:
            self.weight_g = nn.Parameter(g)
        else:
            self.register_buffer("weight_g", g)

    def weight(self) -> Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=1, keepdim=True))  # [out, in]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight())

    def extra_repr(self) -> str:
        trainable = isinstance(self.weight_g, nn.Parameter)
        return f"in_features={self.in_features}, out_features={self.out_features}, train_g={trainable}"


class DINOHead(nn.Module):
    """MLP (nlayers, GELU, optional BN) → bottleneck → L2-normalise → `last_layer`.

    `last_layer` is a bias-free weight-normalised linear to `out_dim` prototypes. With
    `norm_last_layer=True` (DINO's default for ViTs) its scale g is fixed to 1 and not trained.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1:
            raise ValueError("DINOHead dimensions must be >= 1")
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = _TruncNormalLinear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(_TruncNormalLinear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(_TruncNormalLinear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, train_g=not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:  # [B, in_dim] -> [B, out_dim]
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of `last_layer` (DINO drops their gradients in the first epoch)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# Multi-crop wrapper
# --------------------------------------------------------------------------------------------


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of possibly different resolutions.

    Consecutive crops of equal (H, W) are concatenated and go through the backbone in one call;
    the head runs once on all features. Output rows are in crop order (crop-major). With
    ``multicrop=packed`` (models/packed_vit.py `set_multicrop`) a ViT backbone takes every crop in one
    packed call; the output is the same.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_backbone(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, embed_dim]
        return self.backbone(x)

    def forward(self, crops: Sequence[Tensor] | Tensor) -> Tensor:
        """`crops`: list of [B_i, 3, H_i, W_i] → logits [Σ B_i, out_dim] in crop order."""
        return self.head(backbone_over_crops(self.backbone, crops))


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bf16/float32 inputs, float64 kept (tests)."""
    return torch.promote_types(x.dtype, torch.float32)


class DINOLoss(nn.Module):
    """DINO cross-entropy between centred/sharpened teacher and student distributions.

    `forward(student_out [n_crops·B, D], teacher_out [n_global·B, D], teacher_temp)` returns the
    scalar loss of the module docstring and then (by default) updates the centre. The pieces are
    public so other losses (e.g. Gen-DINO's disentanglement term) reuse the same centring:
    `teacher_probs` (centre + sharpen, detached) and `cross_entropy` (vs. the student softmax).
    Softmaxes run in float32 for bf16/fp16 inputs (float64 inputs stay float64).
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if n_global < 1:
            raise ValueError(f"n_global must be >= 1, got {n_global}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))

    # -- pieces ------------------------------------------------------------------------------

    def teacher_probs(self, teacher_out: Tensor, teacher_temp: float) -> Tensor:
        """softmax((t − c) / τ_t) over the last dim, detached; [N, D] → [N, D] (≥ float32)."""
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        self._check_dim(teacher_out, "teacher_out")
        self._center_to(teacher_out.device)
        t = teacher_out.detach().to(_compute_dtype(teacher_out))
        return F.softmax((t - self.center.to(t.dtype)) / teacher_temp, dim=-1)

    def cross_entropy(self, targets: Tensor, student_logits: Tensor, reduction: str = "mean") -> Tensor:
        """H(targets, softmax(student_logits / τ_s)) per row; `reduction` "mean" (scalar) or "none" [N]."""
        if targets.shape != student_logits.shape:
            raise ValueError(
                f"targets {tuple(targets.shape)} and student_logits {tuple(student_logits.shape)} differ"
            )
        dtype = torch.promote_types(_compute_dtype(student_logits), targets.dtype)
        logp = F.log_softmax(student_logits.to(dtype) / self.student_temp, dim=-1)
        h = -(targets.to(dtype) * logp).sum(-1)
        if reduction == "none":
            return h
        if reduction == "mean":
            return h.mean()
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """c ← m·c + (1 − m)·(batch mean of teacher logits over all ranks), in float32."""
        self._check_dim(teacher_out, "teacher_out")
        self._center_to(teacher_out.device)
        total = teacher_out.detach().float().sum(dim=0)  # [D]
        count = torch.tensor([teacher_out.shape[0]], dtype=torch.float32, device=total.device)
        if dist.is_available() and dist.is_initialized():
            # One collective for the sum and the row count: exact even if batches differ by rank.
            packed = torch.cat([total, count])
            dist.all_reduce(packed)
            total, count = packed[:-1], packed[-1:]
        batch_center = (total / count).unsqueeze(0)  # [1, D]
        m = self.center_momentum
        self.center.copy_(self.center.float() * m + batch_center * (1.0 - m))

    # -- loss --------------------------------------------------------------------------------

    def forward(
        self,
        student_out: Tensor,
        teacher_out: Tensor,
        teacher_temp: float,
        update_center: bool = True,
    ) -> Tensor:
        """Scalar DINO loss; then `update_center(teacher_out)` unless `update_center=False`.

        Pass `update_center=False` when another loss term of the same step must see the same
        centre, and call `update_center` once yourself afterwards.
        """
        n_crops, batch = _crop_layout(student_out, teacher_out, self.n_global)
        self._check_dim(student_out, "student_out")
        D, G = self.out_dim, self.n_global
        q = self.teacher_probs(teacher_out, teacher_temp).view(G, batch, D)
        dtype = torch.promote_types(_compute_dtype(student_out), q.dtype)
        logp = F.log_softmax(student_out.to(dtype) / self.student_temp, dim=-1).view(n_crops, batch, D)
        q = q.to(dtype)
        # Σ_{i<G} Σ_{j≠i} H(q_i, p_j) = Σ_i Σ_j H(q_i, p_j) − Σ_{i<G} H(q_i, p_i)   (per sample)
        all_pairs = -(q.sum(0) * logp.sum(0)).sum(-1)  # [B]
        same_view = -(q * logp[:G]).sum(-1).sum(0)  # [B]
        n_terms = G * n_crops - G
        loss = (all_pairs - same_view).mean() / n_terms
        if update_center:
            self.update_center(teacher_out)
        return loss

    # -- helpers -----------------------------------------------------------------------------

    def _check_dim(self, x: Tensor, name: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.out_dim:
            raise ValueError(f"{name} must be [N, {self.out_dim}], got {tuple(x.shape)}")

    def _center_to(self, device: torch.device) -> None:
        if self.center.device != device:
            self.center = self.center.to(device)


def _crop_layout(student_out: Tensor, teacher_out: Tensor, n_global: int) -> tuple[int, int]:
    """(n_crops, B) from crop-major layouts; ValueError when they do not fit together."""
    if student_out.dim() != 2 or teacher_out.dim() != 2 or student_out.shape[1] != teacher_out.shape[1]:
        raise ValueError(
            f"student_out {tuple(student_out.shape)} and teacher_out {tuple(teacher_out.shape)} "
            "must both be [rows, out_dim]"
        )
    if teacher_out.shape[0] == 0 or teacher_out.shape[0] % n_global:
        raise ValueError(f"teacher_out has {teacher_out.shape[0]} rows, not a positive multiple of n_global={n_global}")
    batch = teacher_out.shape[0] // n_global
    if student_out.shape[0] % batch:
        raise ValueError(f"student_out has {student_out.shape[0]} rows, not a multiple of the batch size {batch}")
    n_crops = student_out.shape[0] // batch
    if n_crops < n_global or n_crops * n_global - n_global == 0:
        raise ValueError(
            f"need n_crops >= n_global and at least one (teacher, other student crop) pair; "
            f"got n_crops={n_crops}, n_global={n_global} (student crops start with the global ones)"
        )
    return n_crops, batch


def dino_loss_reference(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    teacher_temp: float,
    student_temp: float,
    n_global: int,
) -> Tensor:
    """The reference code's loop, verbatim in spirit (no centre update); for tests."""
    n_crops, _ = _crop_layout(student_out, teacher_out, n_global)
    student = (student_out / student_temp).chunk(n_crops)
    teacher = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total = student_out.new_zeros(())
    n_terms = 0
    for iq, q in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue  # a teacher crop is not compared with the same view
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
