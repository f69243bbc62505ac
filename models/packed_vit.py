"""Packed multi-crop forward of a ViT: every crop of a batch in one token sequence, block-diagonal attention.

A multi-crop batch holds crops at several resolutions (DINO: 2×224² global + 8×96² local). The
per-resolution forward (models/heads.py `backbone_over_crops`) runs the backbone once per
resolution. DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without
Supervision", https://arxiv.org/abs/2304.07193; reference code github.com/facebookresearch/dinov2,
`NestedTensorBlock`, `MemEffAttention`, `get_attn_bias_and_cat`) instead concatenates the tokens of
all crops and runs each transformer block once, attention restricted to the tokens of one crop:

    X = [x_1; …; x_n]                         x_i: the T_i = 1 + H_i·W_i/p² tokens of crop i
    Attn(X) = softmax(Q Kᵀ/√d + M) V,         M_ab = 0 if tokens a, b belong to the same crop, −∞ else

Everything else in a block (LayerNorm, qkv/proj linears, MLP, layer scale) acts per token, so the
packed forward computes exactly the per-resolution one: per crop, timm's patch embedding, position
embedding interpolated to its grid, and CLS token; the output is each crop's CLS token after the
final norm, rows in crop order ``[Σ B_i, D]``.

Layout: per-sample packing, ``[B, S, D]`` with ``S = Σ_i T_i`` (sample b's crops in crop order), so
all crops must have the same batch size B (multi-crop batches do; others fall back to one call per
resolution). Kernels (``attention=``):

- ``sdpa``: torch SDPA through timm's own `Attention` with the boolean ``[S, S]`` block mask (cached
  per crop layout). Runs everywhere, but scores every (a, b) pair, masked or not: S² per sample
  instead of Σ T_i² (2×197 + 8×37 tokens: 476,100 vs 88,570, 5.4× the attention FLOPs).
- ``xformers``: the same tokens seen as one sequence ``[1, B·S, D]`` with
  ``fmha.BlockDiagonalMask.from_seqlens([T_1, …, T_n] · B)`` (cached), as DINOv2: only the diagonal
  blocks are computed. CUDA only.
- ``auto``: xformers when it is importable and the tokens are on CUDA, else sdpa.

Stochastic depth draws one Bernoulli per (sample, crop) and residual branch, as the per-resolution
forward does (there each crop's rows are separate samples); the random draws differ, the
distribution does not.

`set_multicrop(student, multicrop, attention)` applies TrainConfig's ``multicrop=`` and
``attention=`` to ``student.backbone`` in place: a timm `VisionTransformer` becomes a `PackedViT`
(same parameters and state-dict keys, so checkpoints and encoder export do not change), whose
``forward`` also takes a list of crops. The packed pass enters through the ViT's own ``__call__``, so
DeepSpeed ZeRO-3 gathers ``cls_token`` and ``pos_embed`` as it does for timm's forward.
"""

from __future__ import annotations

import functools
import importlib
import itertools
from typing import Callable, Sequence

import torch
from timm.layers import DropPath
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

__all__ = ["MULTICROP", "ATTENTION", "PackedViT", "set_multicrop", "packed_forward", "resolve_attention",
           "xformers_available"]

MULTICROP = ("per_resolution", "packed")
ATTENTION = ("auto", "sdpa", "xformers")


@functools.cache
def xformers_available() -> bool:
    """Whether ``xformers.ops`` imports (cached: a failed import is not retried on every forward)."""
    try:
        importlib.import_module("xformers.ops")
    except ImportError:
        return False
    return True


def resolve_attention(attention: str, device: torch.device | str) -> str:
    """The kernel ``attention=`` means for tensors on ``device``: "sdpa" or "xformers" (module docstring)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r} is not valid; choose one of: {', '.join(ATTENTION)}")
    on_cuda = torch.device(device).type == "cuda"
    if attention == "sdpa":
        return "sdpa"
    if attention == "auto":
        return "xformers" if on_cuda and xformers_available() else "sdpa"
    if not xformers_available():
        raise ValueError("attention=xformers but xformers is not importable; install it "
                         "(pip install --no-deps xformers) or use attention=sdpa / attention=auto")
    if not on_cuda:
        raise ValueError(f"attention=xformers needs CUDA tensors (xformers' memory-efficient attention has no CPU "
                         f"kernel), got {torch.device(device)}; use attention=sdpa or attention=auto")
    return "xformers"


# --------------------------------------------------------------------------------------------
# The packed forward
# --------------------------------------------------------------------------------------------


def packed_forward(vit: VisionTransformer, crops: Sequence[Tensor], backend: str) -> Tensor:
    """CLS features ``[Σ B_i, D]`` of crops ``[B_i, 3, H_i, W_i]`` in one packed pass, rows in crop order.

    ``backend`` is a resolved kernel ("sdpa" or "xformers", see `resolve_attention`). With one
    resolution, or crops of unequal batch sizes, it is timm's forward once per resolution.
    """
    if len(crops) == 0:
        raise ValueError("got an empty list of crops")
    groups = [list(g) for _, g in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:]))]
    if len(groups) == 1 or len({c.shape[0] for c in crops}) != 1:
        return torch.cat([VisionTransformer.forward(vit, torch.cat(g)) for g in groups])

    batch = crops[0].shape[0]
    parts, seqlens = [], []
    for group in groups:  # consecutive crops of one resolution share one patch embedding call
        tokens = _embed(vit, torch.cat(group))  # [n·B, T, D], crop-major
        n, (T, D) = len(group), tokens.shape[1:]
        parts.append(tokens.view(n, batch, T, D).transpose(0, 1).reshape(batch, n * T, D))
        seqlens += [T] * n
    x = torch.cat(parts, dim=1)  # [B, S, D]: sample b's crops in crop order
    attend = _sdpa_attend(seqlens, x.device) if backend == "sdpa" else _xformers_attend(seqlens, batch, x.device)
    for blk in vit.blocks:
        x = x + _drop_path(blk.drop_path1, blk.ls1(attend(blk.attn, blk.norm1(x))), seqlens)
        x = x + _drop_path(blk.drop_path2, blk.ls2(blk.mlp(blk.norm2(x))), seqlens)
    starts = _segment_starts(tuple(seqlens), x.device)
    cls = x[:, starts].transpose(0, 1).reshape(len(seqlens) * batch, -1)  # [n·B, D], crop-major
    # timm: norm over all tokens, then pool the CLS token; the norm is per token, so only the CLS rows need it
    return vit.forward_head(vit.norm(cls).unsqueeze(1))


def _embed(vit: VisionTransformer, images: Tensor) -> Tensor:
    """``[N, 3, H, W] → [N, T, D]``: timm's forward_features up to the blocks (position embedding
    interpolated to this grid, CLS token prepended)."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def _drop_path(module: nn.Module, residual: Tensor, seqlens: list[int]) -> Tensor:
    """Stochastic depth with one draw per (sample, crop): ``residual [B, S, D]`` times a keep mask."""
    if not isinstance(module, DropPath) or not module.training or module.drop_prob == 0.0:
        return module(residual)  # Identity, or DropPath in eval: the identity
    keep = 1.0 - module.drop_prob
    mask = residual.new_empty(residual.shape[0], len(seqlens)).bernoulli_(keep)  # [B, n]
    if keep > 0.0 and module.scale_by_keep:
        mask.div_(keep)
    return residual * mask[:, _segment_ids(tuple(seqlens), residual.device)].unsqueeze(-1)


@functools.lru_cache(maxsize=64)
def _segment_ids(seqlens: tuple[int, ...], device: torch.device) -> Tensor:
    """``[S]``: the crop each packed token belongs to."""
    with torch.inference_mode(False):  # cached: must stay usable by autograd if first made under inference_mode
        return torch.repeat_interleave(torch.arange(len(seqlens), device=device), torch.tensor(seqlens, device=device))


@functools.lru_cache(maxsize=64)
def _segment_starts(seqlens: tuple[int, ...], device: torch.device) -> Tensor:
    """``[n]``: position of each crop's CLS token in the packed sequence."""
    with torch.inference_mode(False):
        return torch.tensor([0, *itertools.accumulate(seqlens)][:-1], device=device)


@functools.lru_cache(maxsize=64)
def _block_mask(seqlens: tuple[int, ...], device: torch.device) -> Tensor:
    """``[S, S]`` bool, True where two tokens belong to the same crop (SDPA: True = attend)."""
    ids = _segment_ids(seqlens, device)
    with torch.inference_mode(False):
        return ids[:, None] == ids[None, :]


def _sdpa_attend(seqlens: list[int], device: torch.device) -> Callable[[Attention, Tensor], Tensor]:
    mask = _block_mask(tuple(seqlens), device)
    return lambda attn, x: attn(x, attn_mask=mask)  # timm's Attention: SDPA (or its math path) with the mask


@functools.lru_cache(maxsize=64)
def _xformers_bias(seqlens: tuple[int, ...], device: torch.device):
    from xformers.ops import fmha

    with torch.inference_mode(False):
        return fmha.BlockDiagonalMask.from_seqlens(list(seqlens), device=device)


def _xformers_attend(seqlens: list[int], batch: int, device: torch.device) -> Callable[[Attention, Tensor], Tensor]:
    """timm's Attention.forward with the SDPA call replaced by xformers on ``[1, B·S, heads, head_dim]``."""
    from xformers.ops import memory_efficient_attention

    bias = _xformers_bias(tuple(seqlens) * batch, device)

    def attend(attn: Attention, x: Tensor) -> Tensor:  # [B, S, C] -> [B, S, C]
        B, S, _ = x.shape
        q, k, v = attn.qkv(x).reshape(1, B * S, 3, attn.num_heads, attn.head_dim).unbind(2)
        q, k = attn.q_norm(q), attn.k_norm(k)  # they normalise head_dim only, so the layout does not matter
        out = memory_efficient_attention(q, k, v, attn_bias=bias, p=attn.attn_drop.p if attn.training else 0.0,
                                         scale=attn.scale)
        out = attn.norm(out.reshape(B, S, attn.attn_dim))
        if attn.gate is not None:
            out = out * attn.gate(x).sigmoid()
        return attn.proj_drop(attn.proj(out))

    return attend


# --------------------------------------------------------------------------------------------
# The module and the switch
# --------------------------------------------------------------------------------------------


class PackedViT(VisionTransformer):
    """timm's `VisionTransformer` whose ``forward`` also takes a list of crops (packed; module docstring).

    Made by `set_multicrop`, which swaps the class of a built ViT in place; a tensor input runs
    timm's forward unchanged. ``multicrop_attention`` holds ``attention=`` ("auto", "sdpa" or
    "xformers"), resolved on every call for the crops' device.
    """

    multicrop_attention: str = "auto"

    def forward(self, x: Tensor | Sequence[Tensor], attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if isinstance(x, Tensor):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        crops = list(x)
        device = crops[0].device if crops else "cpu"
        return packed_forward(self, crops, resolve_attention(self.multicrop_attention, device))


def set_multicrop(student: nn.Module, multicrop: str = "per_resolution", attention: str = "auto") -> nn.Module:
    """Apply ``multicrop=`` and ``attention=`` to ``student.backbone`` (or to ``student`` itself when it
    is the ViT) in place, and return ``student``: ``return set_multicrop(build(...), cfg.multicrop, cfg.attention)``.

    ``packed`` needs a timm ViT of standard blocks pooled by its CLS token (what models/backbones.py
    builds); ``per_resolution`` leaves any backbone as it is (and turns a `PackedViT` back).
    """
    if multicrop not in MULTICROP:
        raise ValueError(f"multicrop={multicrop!r} is not valid; choose one of: {', '.join(MULTICROP)}")
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r} is not valid; choose one of: {', '.join(ATTENTION)}")
    vit = getattr(student, "backbone", student)
    if multicrop == "per_resolution":
        if isinstance(vit, PackedViT):
            vit.__class__ = VisionTransformer
            del vit.multicrop_attention
        return student
    _check_packable(vit)
    vit.__class__ = PackedViT
    vit.multicrop_attention = attention
    return student


def _check_packable(vit: nn.Module) -> None:
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"multicrop=packed packs ViT tokens; the backbone is a {type(vit).__name__}: "
                         "use multicrop=per_resolution (ResNets) or a vit_* model")
    problems = []
    if vit.cls_token is None or vit.global_pool != "token" or vit.attn_pool is not None:
        problems.append("features are not the CLS token")
    if not vit.dynamic_img_size:
        problems.append("dynamic_img_size is off (the position embedding cannot follow the crop size)")
    if any(type(b) is not Block or type(b.attn) is not Attention for b in vit.blocks):
        problems.append("blocks other than timm's pre-norm Block with its Attention")
    if problems:
        raise ValueError(f"multicrop=packed supports the ViTs of models/backbones.py; this one: {'; '.join(problems)}. "
                         "Use multicrop=per_resolution")
