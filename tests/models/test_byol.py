"""BYOL (models/byol.py): loss vs. the loop reference, closed forms, heads, and the objective on a
tiny model (target = EMA teacher's projector, never its predictor; no gradient into the target)."""

from __future__ import annotations

import pytest
import torch

from genssl.models.byol import BYOLConfig, BYOLObjective, build_byol_student, byol_loss, byol_loss_reference
from genssl.models.heads import backbone_over_crops
from genssl.tests.models.ssl_dist_workers_b import TinyBackbone, global_crops, tiny_student, _progress


@pytest.mark.parametrize("n,d", [(7, 5), (13, 3), (1, 11)])
def test_loss_and_gradients_match_reference(n, d):
    g = torch.Generator().manual_seed(n + d)
    p = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    z = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    loss, ref = byol_loss(p, z), byol_loss_reference(p, z)
    torch.testing.assert_close(loss, ref)
    grad_out = torch.tensor(1.3, dtype=torch.float64)
    (dp,) = torch.autograd.grad(loss, p, grad_out, retain_graph=True)
    (dp_ref,) = torch.autograd.grad(ref, p, grad_out)
    torch.testing.assert_close(dp, dp_ref)
    # The target is a stop-gradient: nothing reaches z.
    assert torch.autograd.grad(loss, z, allow_unused=True)[0] is None


def test_closed_forms():
    z = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(byol_loss(3 * z, z), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(byol_loss(-z, z), torch.tensor(4.0, dtype=torch.float64))
    e = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(byol_loss(e, e.roll(1, 0)), torch.tensor(2.0, dtype=torch.float64))  # orthogonal


def test_heads_and_errors():
    student = build_byol_student(TinyBackbone(), BYOLConfig(hidden_dim=12, out_dim=5, predictor_hidden_dim=7))
    for head, dims in ((student.projector, [12, 5]), (student.predictor, [7, 5])):
        assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == dims
        assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head) == 1  # BN on the hidden layer only
    with pytest.raises(ValueError, match="byol.predictor_hidden_dim"):
        BYOLConfig(predictor_hidden_dim=0).validate()
    with pytest.raises(ValueError, match="n_global=2"):
        BYOLObjective(student, BYOLConfig(), n_global=1, epochs=1, dtype=torch.float32)
    cfg = BYOLConfig(hidden_dim=12, out_dim=5, predictor_hidden_dim=7)
    objective = BYOLObjective(student, cfg, n_global=2, epochs=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="n_local=0"):
        objective.training_loss(student, (global_crops([8, 8, 4], 3, 0, torch.float32), None), _progress(0))


def test_objective_on_tiny_model():
    student, cfg = tiny_student("byol")
    objective = BYOLObjective(student, cfg, n_global=2, epochs=1, dtype=torch.float32)
    assert objective.late_parameters(student) == []
    target = objective.teacher.module
    with torch.no_grad():  # the target differs from the online network, as after some EMA steps
        for p in target.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for p in target.predictor.parameters():
            p.fill_(float("nan"))  # a predictor the target must never use
    crops = global_crops([8, 8], 6, seed=2, dtype=torch.float32)
    loss, terms = objective.training_loss(student, (crops, torch.arange(6)), _progress(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and 0 <= loss.item() <= 8
    assert set(terms) == {"loss_view1", "loss_view2"} and not any(t.requires_grad for t in terms.values())
    # The loss is the swapped, symmetrised regression of the online predictions onto the target projections.
    with torch.no_grad():  # one call per view, as the official code (BN statistics per view)
        t1, t2 = (target.projector(backbone_over_crops(target.backbone, view)) for view in crops)
    (_, p1), (_, p2) = student(crops[0]), student(crops[1])
    expected = byol_loss(p1, t2) + byol_loss(p2, t1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss.detach(), terms["loss_view1"] + terms["loss_view2"])
    loss.backward()
    assert student.backbone[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    # The engine's EMA step moves the target towards the online network.
    before = target.backbone[0].weight.clone()
    objective.teacher.update(student, momentum=0.5)
    torch.testing.assert_close(target.backbone[0].weight, 0.5 * before + 0.5 * student.backbone[0].weight)
