"""GenView's quality-driven contrastive (QDC) weights: a frozen scorer rates each positive pair (docs/METHODS.md §2.4).

- Li et al., "GenView: Enhancing View Quality with Pretrained Generative Model for Self-Supervised
  Learning", ECCV 2024, https://arxiv.org/abs/2403.12003 (§3.4, Eq. 9–12; App. A)
- official code: github.com/xiaojieli0903/genview, mmpretrain/models/selfsup/mocov3.py
  (`make_foreground_softmask`, `aggregate_feature`, `calculate_sim`, `calculate_weight`; the same in simsiam.py)

A frozen encoder gives both augmented views of pair i a token grid ``F_{i,v}`` ``[h, w, C]``. Their
projection on the scorer's PC-1 (``generators/foreground.ForegroundPCA``), min–max normalised per view,
is a soft foreground map ``a``; ``1 − a`` the background map. Each map, normalised to sum 1, pools the
tokens, and the pair's quality and weight are::

    z^f = Σ a·F / Σ a,    z^b = Σ (1 − a)·F / Σ (1 − a)
    q_i = cos(z^f_{i,1}, z^f_{i,2}) − cos(z^b_{i,1}, z^b_{i,2})
    w_i = B·softmax(q)_i          (temperature 1 = the official γ = 1; no gradient)
    L   = (1/B) Σ_i w_i ℓ_i       (the base method's per-pair loss, same w_i in both directions)

A pair whose foregrounds agree and whose backgrounds differ gets more weight. The softmax runs over
each rank's own batch, as the official code (its ``calculate_weight`` sees the per-GPU batch), so the
weights average to 1 on every rank. The weights go to the contrastive losses' ``weights=``
(``models/contrastive.py``, one fused kernel) and as per-sample weights to BYOL, SimSiam and SwAV.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genssl.generators.foreground import ForegroundPCA, TokenEncoder
from genssl.models.contrastive import qdc_weights

__all__ = ["set_quality_scorer", "quality_weights", "QDCScorer", "qdc_scores", "qdc_scores_reference", "qdc_weights"]

_EPS = 1e-7  # the official code's guard in the min–max and sum normalisations


def _pooled(tokens: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground / background pooled features ``[B, C]`` of tokens ``[B, h, w, C]``."""
    flat = tokens.flatten(1, 2)                                       # [B, hw, C]
    s = flat @ direction.to(flat)                                     # [B, hw] projection on PC-1
    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
    a = (s - lo) / (hi - lo + _EPS)                                   # soft foreground map in [0, 1]
    fg = a / (a.sum(1, keepdim=True) + _EPS)
    bg = (1 - a) / ((1 - a).sum(1, keepdim=True) + _EPS)
    return torch.einsum("bn,bnc->bc", fg, flat), torch.einsum("bn,bnc->bc", bg, flat)


def qdc_scores(tokens1: torch.Tensor, tokens2: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Pair quality ``q`` ``[B]`` from the two views' tokens ``[B, h, w, C]`` (grids may differ) and PC-1 ``[C]``.

    The PCA mean is not needed: a constant shift of the projection cancels in the min–max map.
    """
    if tokens1.dim() != 4 or tokens2.dim() != 4 or tokens1.shape[0] != tokens2.shape[0] \
            or tokens1.shape[-1] != tokens2.shape[-1] or tokens1.shape[-1] != direction.numel():
        raise ValueError(f"tokens1 and tokens2 must be [B, h, w, C] with the same B and C = {direction.numel()} "
                         f"(the PCA's), got {tuple(tokens1.shape)} and {tuple(tokens2.shape)}")
    f1, b1 = _pooled(tokens1, direction)
    f2, b2 = _pooled(tokens2, direction)
    return F.cosine_similarity(f1, f2, dim=1, eps=1e-8) - F.cosine_similarity(b1, b2, dim=1, eps=1e-8)


def qdc_scores_reference(tokens1: torch.Tensor, tokens2: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``q``, one pair and one view at a time, token by token (tests only)."""

    def pooled(t):                                                    # t [h, w, C]
        toks = [t[r, c] for r in range(t.shape[0]) for c in range(t.shape[1])]
        s = [float(x @ direction) for x in toks]
        lo, hi = min(s), max(s)
        a = [(v - lo) / (hi - lo + _EPS) for v in s]
        sa, sb = sum(a) + _EPS, sum(1 - v for v in a) + _EPS
        zf = sum(v / sa * x for v, x in zip(a, toks))
        zb = sum((1 - v) / sb * x for v, x in zip(a, toks))
        return zf, zb

    def cos(x, y):
        return (x @ y) / (x.norm() * y.norm()).clamp_min(1e-8)

    q = []
    for i in range(tokens1.shape[0]):
        (f1, b1), (f2, b2) = pooled(tokens1[i]), pooled(tokens2[i])
        q.append(cos(f1, f2) - cos(b1, b2))
    return torch.stack(q)


class QDCScorer(nn.Module):
    """``weights(view1, view2) -> w [B]``: the frozen scorer's QDC weights of B positive pairs.

    Args:
        encoder: the frozen scorer (``generators/foreground.TokenEncoder``; the paper: CLIP ConvNeXt-B,
            genssl's default: the stage-1 encoder).
        pca: PC-1 of the scorer's tokens (``generators/foreground.fit_foreground_pca`` on a sample of
            the data set, sign fixed centre > border).
        input_mean, input_std: how the views reaching :meth:`weights` are normalised (the training
            crops' statistics); ``None`` when they already carry the encoder's own normalisation.
    """

    def __init__(self, encoder: TokenEncoder, pca: ForegroundPCA, input_mean: Sequence[float] | None = None,
                 input_std: Sequence[float] | None = None):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("direction", pca.direction.detach().float().clone(), persistent=False)
        self.input_mean, self.input_std = input_mean, input_std

    @torch.no_grad()
    def scores(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B]`` (float32) of the pairs (view1[i], view2[i]), views ``[B, 3, H, W]``."""
        if view1.shape[0] != view2.shape[0]:
            raise ValueError(f"the two views must hold the same pairs, got batches {view1.shape[0]} and {view2.shape[0]}")
        t1 = self.encoder(view1, self.input_mean, self.input_std)
        t2 = self.encoder(view2, self.input_mean, self.input_std)
        return qdc_scores(t1, t2, self.direction).float()

    @torch.no_grad()
    def weights(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """``w = B·softmax(q)`` ``[B]`` (float32, detached, mean 1)."""
        return qdc_weights(self.scores(view1, view2))

    forward = weights


def set_quality_scorer(objective: nn.Module, scorer: QDCScorer | None) -> None:
    """Make ``objective`` weight its pairs by ``scorer``'s QDC weights (``None``: unweighted again).

    The scorer is frozen and not part of training: it is kept out of the objective's module tree so
    it is neither checkpointed, moved by ``.to()``, nor converted to a synchronised BatchNorm.
    """
    object.__setattr__(objective, "quality_scorer", scorer)


def quality_weights(objective: nn.Module, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor | None:
    """QDC weights ``[B]`` of the pairs (view1[i], view2[i]) when ``objective`` has a scorer, else None."""
    scorer = getattr(objective, "quality_scorer", None)
    return None if scorer is None else scorer.weights(view1, view2)
