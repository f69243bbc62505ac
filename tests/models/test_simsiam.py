"""SimSiam (models/simsiam.py): loss vs. the loop reference, closed forms, the paper's heads, and the
objective on a tiny model (stop-gradient on z, no teacher)."""

from __future__ import annotations

import pytest
import torch

from genssl.models.simsiam import (SimSiamConfig, SimSiamObjective, build_simsiam_student, simsiam_loss,
                                   simsiam_loss_reference)
from genssl.tests.models.ssl_dist_workers_b import TinyBackbone, global_crops, tiny_student, _progress


@pytest.mark.parametrize("n,d", [(7, 5), (13, 3), (1, 11)])
def test_loss_and_gradients_match_reference(n, d):
    g = torch.Generator().manual_seed(n * 3 + d)
    p = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    z = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    loss, ref = simsiam_loss(p, z), simsiam_loss_reference(p, z)
    torch.testing.assert_close(loss, ref)
    grad_out = torch.tensor(0.6, dtype=torch.float64)
    (dp,) = torch.autograd.grad(loss, p, grad_out, retain_graph=True)
    (dp_ref,) = torch.autograd.grad(ref, p, grad_out)
    torch.testing.assert_close(dp, dp_ref)
    assert torch.autograd.grad(loss, z, allow_unused=True)[0] is None  # stop-gradient


def test_closed_forms():
    z = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(simsiam_loss(2 * z, z), torch.tensor(-1.0, dtype=torch.float64))
    torch.testing.assert_close(simsiam_loss(-z, z), torch.tensor(1.0, dtype=torch.float64))


def test_heads_follow_the_paper():
    student = build_simsiam_student(TinyBackbone(), SimSiamConfig(hidden_dim=12, out_dim=9, predictor_hidden_dim=4))
    proj, pred = list(student.projector), list(student.predictor)
    assert [m.out_features for m in proj if isinstance(m, torch.nn.Linear)] == [12, 12, 9]
    bns = [m for m in proj if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 3 and bns[-1] is proj[-1] and not bns[-1].affine and bns[0].affine  # BN on every layer
    assert [m.out_features for m in pred if isinstance(m, torch.nn.Linear)] == [4, 9]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in pred) == 1 and isinstance(pred[-1], torch.nn.Linear)
    with pytest.raises(ValueError, match="simsiam.hidden_dim"):
        SimSiamConfig(hidden_dim=0).validate()
    with pytest.raises(ValueError, match="n_global=2"):
        SimSiamObjective(student, SimSiamConfig(), n_global=4, epochs=1, dtype=torch.float32)


def test_objective_on_tiny_model():
    student, cfg = tiny_student("simsiam")
    objective = SimSiamObjective(student, cfg, n_global=2, epochs=1, dtype=torch.float32)
    assert objective.teacher is None and objective.late_parameters(student) == []
    crops = global_crops([8, 8], 6, seed=4, dtype=torch.float32)
    loss, terms = objective.training_loss(student, (crops, torch.arange(6)), _progress(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and -1 <= loss.item() <= 1
    assert set(terms) == {"loss_view1", "loss_view2", "z_std"} and not any(t.requires_grad for t in terms.values())
    (z1, p1), (z2, p2) = student(crops[0]), student(crops[1])  # one call per view: BN statistics per view
    torch.testing.assert_close(loss, 0.5 * (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)))
    loss.backward()
    assert student.backbone[0].weight.grad.abs().sum() > 0
    assert student.predictor[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="n_local=0"):
        objective.training_loss(student, (crops[:1], None), _progress(0))
