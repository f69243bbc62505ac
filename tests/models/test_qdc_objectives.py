"""GenView's QDC weights reach the two-view objectives (models/qdc.py `set_quality_scorer`).

For every method the weighted loss is linear in the per-pair weights, ``L(w) = Σ_j w_j·L(B·e_j)/B``
(pair j weighted alone), equals the unweighted loss for w = 1, and the scorer sees the two views of
each pair in order. BYOL, SimSiam and SwAV also match their float64 references with weights.
"""

from __future__ import annotations

import pytest
import torch

from genssl.models import byol, mocov2, mocov3, simclr, simsiam, swav
from genssl.engine.trainer import Progress
from genssl.models.qdc import set_quality_scorer
from genssl.tests.models.ssl_dist_workers import TinyBackbone

B = 6
PROGRESS = Progress(global_step=0, epoch=0, step_in_epoch=0, steps_per_epoch=1, total_steps=1)
BUILD = {
    "simclr": lambda: (simclr, simclr.SimCLRConfig(hidden_dim=16, out_dim=8), "SimCLRObjective", "build_simclr_student"),
    "mocov2": lambda: (mocov2, mocov2.MoCoV2Config(hidden_dim=16, out_dim=8, queue_size=10, shuffle_bn_groups=2),
                       "MoCoV2Objective", "build_mocov2_student"),
    "mocov3": lambda: (mocov3, mocov3.MoCoV3Config(hidden_dim=16, out_dim=8), "MoCoV3Objective", "build_mocov3_student"),
    "byol": lambda: (byol, byol.BYOLConfig(hidden_dim=16, out_dim=8, predictor_hidden_dim=16), "BYOLObjective",
                     "build_byol_student"),
    "simsiam": lambda: (simsiam, simsiam.SimSiamConfig(hidden_dim=16, out_dim=8, predictor_hidden_dim=4),
                        "SimSiamObjective", "build_simsiam_student"),
    "swav": lambda: (swav, swav.SwAVConfig(hidden_dim=16, out_dim=8, n_prototypes=5), "SwAVObjective", "build_swav_student"),
}


class FixedWeights:
    """A scorer that returns given weights and records the views it was shown."""

    def __init__(self, weights: torch.Tensor):
        self.w, self.seen = weights, []

    def weights(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        self.seen.append((view1, view2))
        return self.w


def _objective(method: str):
    module, cfg, objective, build = BUILD[method]()
    torch.manual_seed(0)
    student = getattr(module, build)(TinyBackbone(), cfg)  # float32: the EMA teacher is kept in float32
    return student, getattr(module, objective)(student, cfg, 2, 1, torch.float32)


def _loss(method: str, weights: torch.Tensor | None, crops) -> torch.Tensor:
    student, objective = _objective(method)
    if weights is not None:
        set_quality_scorer(objective, FixedWeights(weights))
    torch.manual_seed(1)  # MoCo v2's shuffled BN groups
    loss, _ = objective.training_loss(student, (crops, None), PROGRESS)
    return loss


@pytest.mark.parametrize("method", list(BUILD))
def test_weighted_loss_is_linear_in_the_pair_weights(method: str) -> None:
    g = torch.Generator().manual_seed(3)
    crops = [torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float32) for _ in range(2)]
    unweighted = _loss(method, None, crops)
    torch.testing.assert_close(_loss(method, torch.ones(B, dtype=torch.float32), crops), unweighted)
    w = torch.rand(B, generator=g, dtype=torch.float32) + 0.1
    w = w * B / w.sum()
    alone = torch.stack([_loss(method, B * torch.eye(B, dtype=torch.float32)[j], crops) for j in range(B)])
    torch.testing.assert_close(_loss(method, w, crops), (w * alone).sum() / B)
    assert not torch.allclose(alone, alone[0].expand(B)), "every pair weighted alone gave the same loss"


def test_the_scorer_sees_each_pairs_two_views_in_order() -> None:
    student, objective = _objective("simclr")
    scorer = FixedWeights(torch.ones(B, dtype=torch.float32))
    set_quality_scorer(objective, scorer)
    crops = [torch.randn(B, 3, 8, 8, dtype=torch.float32) for _ in range(2)]
    objective.training_loss(student, (crops, None), None)
    (v1, v2), = scorer.seen
    assert v1 is crops[0] and v2 is crops[1]
    assert "quality_scorer" not in dict(objective.named_modules()) and not any(
        "quality" in k for k in objective.state_dict())  # frozen scorer: not checkpointed, not trained


@pytest.mark.parametrize("loss, reference", [(byol.byol_loss, byol.byol_loss_reference),
                                             (simsiam.simsiam_loss, simsiam.simsiam_loss_reference)])
def test_weighted_regression_losses_match_their_references(loss, reference) -> None:
    g = torch.Generator().manual_seed(5)
    p = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    w = torch.rand(7, generator=g, dtype=torch.float64) * 2
    got, want = loss(p, z, w), reference(p, z, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, p)[0], torch.autograd.grad(want, p)[0])


def test_simclr_weight_j_scores_pair_j_in_both_directions() -> None:
    """A weight on pair j alone gives (ℓ_j + ℓ_{j+B})/2, the NT-Xent rows of pair j's two views."""
    g = torch.Generator().manual_seed(7)
    crops = [torch.randn(B, 3, 8, 8, generator=g) for _ in range(2)]
    student, objective = _objective("simclr")
    z, _ = student(crops)  # what the objective's one call computes: [2B, D]
    zn = torch.nn.functional.normalize(z.detach().double(), dim=1)
    s = zn @ zn.T / objective.cfg.temperature
    rows = torch.stack([torch.logsumexp(torch.cat([s[i, :i], s[i, i + 1:]]), 0) - s[i, (i + B) % (2 * B)]
                        for i in range(2 * B)])
    for j in (0, 3):
        got = _loss("simclr", B * torch.eye(B)[j], crops)
        torch.testing.assert_close(got.double(), (rows[j] + rows[j + B]) / 2, rtol=1e-5, atol=1e-5)


def test_weighted_swav_loss_matches_its_reference() -> None:
    g = torch.Generator().manual_seed(9)
    b, k, n_crops = 5, 7, 4
    scores = torch.randn(n_crops * b, k, generator=g, dtype=torch.float64, requires_grad=True)
    codes = torch.softmax(torch.randn(2 * b, k, generator=g, dtype=torch.float64), 1)
    w = torch.rand(b, generator=g, dtype=torch.float64) * 2
    got, _ = swav.swav_loss(scores, codes, 2, 0.1, w)
    want = swav.swav_loss_reference(scores, codes, 2, 0.1, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, scores)[0], torch.autograd.grad(want, scores)[0])
