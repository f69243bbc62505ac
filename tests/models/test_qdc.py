"""GenView QDC scores and weights against the per-pair plain-torch reference (docs/METHODS.md §2.4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genssl.generators.foreground import TokenEncoder, fit_foreground_pca
from genssl.models.contrastive import NTXentLoss
from genssl.models.qdc import QDCScorer, qdc_scores, qdc_scores_reference, qdc_weights


def test_scores_equal_reference_float64():
    g = torch.Generator().manual_seed(0)
    t1 = torch.randn(5, 3, 5, 7, generator=g, dtype=torch.float64)
    t2 = torch.randn(5, 4, 3, 7, generator=g, dtype=torch.float64)    # the two views' grids may differ
    direction = F.normalize(torch.randn(7, generator=g, dtype=torch.float64), dim=0)
    q = qdc_scores(t1, t2, direction)
    assert q.shape == (5,) and q.dtype == torch.float64
    torch.testing.assert_close(q, qdc_scores_reference(t1, t2, direction), atol=1e-12, rtol=0)
    # the min–max map ignores the projection's scale, not its sign (which marks the foreground)
    torch.testing.assert_close(qdc_scores(t1, t2, 3.0 * direction), q)
    assert not torch.allclose(qdc_scores(t1, t2, -direction), q)
    with pytest.raises(ValueError, match="C = 7"):
        qdc_scores(t1[..., :6], t2[..., :6], direction)


def test_weights_detached_and_mean_one():
    g = torch.Generator().manual_seed(1)
    t1 = torch.randn(9, 4, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(9, 4, 4, 6, generator=g, dtype=torch.float64)
    q = qdc_scores(t1, t2, F.normalize(torch.randn(6, generator=g, dtype=torch.float64), dim=0))
    assert q.requires_grad                                            # the score itself is differentiable …
    w = qdc_weights(q)
    assert not w.requires_grad                                        # … the weights are not
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(w, (9 * torch.softmax(q.detach(), 0)).float())
    # same weights in both directions of the fused loss: a [B] row weight
    z1, z2 = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)
    assert torch.isfinite(NTXentLoss(0.5)(z1, z2, weights=w))


def _pair_tokens(fg1, bg1, fg2, bg2, h=4, w=4):
    """Two [1, h, w, C] grids: a 2×2 foreground block (channel 0 = 3) in the middle of a background (channel 0 = 0)."""
    def grid(fg, bg):
        t = bg.expand(h, w, bg.numel()).clone()
        t[1:3, 1:3] = fg
        return t[None]
    return grid(fg1, bg1), grid(fg2, bg2)


def test_matching_foregrounds_outweigh_matching_backgrounds():
    e = torch.eye(6, dtype=torch.float64)
    fg_a, fg_b = 3 * e[0] + e[1], 3 * e[0] + e[2]                    # two different objects
    bg_a, bg_b = e[3] + 0.1 * e[5], e[4] + 0.1 * e[5]                # two different scenes
    direction = e[0]
    good = _pair_tokens(fg_a, bg_a, fg_a, bg_b)                      # same object, new scene
    bad = _pair_tokens(fg_a, bg_a, fg_b, bg_a)                       # other object, same scene
    t1 = torch.cat([good[0], bad[0]])
    t2 = torch.cat([good[1], bad[1]])
    q = qdc_scores(t1, t2, direction)
    torch.testing.assert_close(q, qdc_scores_reference(t1, t2, direction), atol=1e-12, rtol=0)
    assert float(q[0]) > 0.9 and float(q[1]) < 0    # cos(fg_a, fg_b) = 0.9: both lie along PC-1
    w = qdc_weights(q)
    assert float(w[0]) > 1.0 > float(w[1])


class _PatchEncoder(nn.Module):
    """A frozen stand-in for the scorer's CNN: per 4×4 patch, channel means and stds, mixed by a fixed 1×1 conv."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(6, 8, 1, bias=False)
        nn.init.normal_(self.mix.weight, generator=torch.Generator().manual_seed(3))

    def forward_features(self, x):
        m = F.avg_pool2d(x, 4)
        sd = (F.avg_pool2d(x * x, 4) - m * m).clamp_min(0).sqrt()
        return self.mix(torch.cat([m, 4 * sd], 1))                    # [B, 8, h, w]


def _scene(colour, grey=0.5, texture=0.35, seed=0, size=32):
    """A flat coloured square in the middle of a grey sign-noise texture (level ``grey``, amplitude ``texture``)."""
    g = torch.Generator().manual_seed(seed)
    img = grey + texture * torch.sign(torch.randn(1, size, size, generator=g)).expand(3, size, size).clone()
    img[:, 10:22, 10:22] = torch.tensor(colour).view(3, 1, 1)
    return img


def test_scorer_on_images():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    enc = TokenEncoder(_PatchEncoder(), mean, std)
    norm = lambda x: (x - 0.5) / 0.25  # noqa: E731 - the training crops' normalisation here equals the encoder's
    colours = [(0.9, 0.2, 0.2), (0.2, 0.9, 0.2), (0.2, 0.2, 0.9), (0.9, 0.9, 0.2)]
    backgrounds = [(0.5, 0.35), (0.3, 0.1), (0.6, 0.2)]
    sample = [norm(torch.stack([_scene(c, *bg, seed=s) for c in colours for s, bg in enumerate(backgrounds)]))]
    pca = fit_foreground_pca(enc, sample)
    assert pca.mask(enc(sample[0]))[:, 3:5, 3:5].all()               # the object's tokens are foreground
    scorer = QDCScorer(enc, pca, input_mean=mean, input_std=std)
    # pair 0: same object, another scene; pair 1: another object, the same scene
    v1 = norm(torch.stack([_scene(colours[0], 0.5, 0.35, seed=10), _scene(colours[0], 0.5, 0.35, seed=11)]))
    v2 = norm(torch.stack([_scene(colours[0], 0.3, 0.1, seed=12), _scene(colours[2], 0.5, 0.35, seed=11)]))
    q = scorer.scores(v1, v2)
    assert float(q[0]) > 0.1 > -0.1 > float(q[1]), q
    w = scorer.weights(v1, v2)
    assert w.shape == (2,) and not w.requires_grad
    assert float(w[0]) > 1.0 > float(w[1])
    want = qdc_weights(qdc_scores(enc(v1), enc(v2), pca.direction.float()))
    torch.testing.assert_close(w, want)
    with pytest.raises(ValueError, match="same pairs"):
        scorer.weights(v1, v2[:1])
