"""MoCo v3: the symmetric 2τ-scaled loss (fused kernel module) against the loop reference in float64
and float32, the objective on a tiny model, the official ResNet / ViT heads, errors, and 2 gloo
ranks == one process."""

from __future__ import annotations

import pytest
import torch

from genssl.models.contrastive import MoCoV3Loss
from genssl.models.mocov3 import MoCoV3Config, MoCoV3Objective, build_mocov3_student, mocov3_loss_reference
from genssl.models.simclr import SimCLRConfig, build_simclr_student
from genssl.tests.models.ssl_dist_workers import B_LOCAL, TinyBackbone, build, global_crops, progress, spawn
from genssl.tests.models.conftest import random_leaves


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n,d,tau", [(9, 13, 0.2), (5, 7, 1.0), (1, 4, 0.5)])
def test_symmetric_loss_matches_reference(dtype, tol, n, d, tau):
    q1, q2, k1, k2 = random_leaves((n, d), (n, d), (n, d), (n, d), seed=n + d, dtype=dtype)
    loss = MoCoV3Loss(tau).symmetric(q1, q2, k1, k2)
    grads = torch.autograd.grad(loss, (q1, q2, k1, k2))
    ref_in = [t.detach().double().requires_grad_(True) for t in (q1, q2, k1, k2)]
    ref = mocov3_loss_reference(*ref_in, tau)
    ref_grads = torch.autograd.grad(ref, ref_in)
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_reference_closed_form():
    """q = k orthonormal: each term is 2τ·(−1/τ + log(e^{1/τ} + N − 1))."""
    z, tau = torch.eye(3, dtype=torch.float64), 0.2
    term = 2 * tau * (-1 / tau + torch.log(torch.exp(torch.tensor(1 / tau, dtype=torch.float64)) + 2))
    torch.testing.assert_close(mocov3_loss_reference(z, z, z, z, tau), 2 * term)


def test_objective_on_tiny_model():
    student, objective = build("mocov3")
    x1, x2 = global_crops(1)
    loss, terms = objective.training_loss(student, ([x1, x2], torch.arange(B_LOCAL)), progress())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(terms) == {"loss_contrastive"} and not terms["loss_contrastive"].requires_grad
    # queries = the student's predictions (one call per view), keys = the teacher's projections
    with torch.no_grad():
        q1, q2 = student(x1)[1], student(x2)[1]
        t = objective.teacher.module
        k1, k2 = t.projector(t.backbone(x1)), t.projector(t.backbone(x2))
    assert q1.shape == k1.shape == (B_LOCAL, 7)
    ref = mocov3_loss_reference(q1.double(), q2.double(), k1.double(), k2.double(), 0.5)
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.backbone.net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.teacher.parameters())
    assert not hasattr(objective, "step_kept") and objective.late_parameters(student) == []
    assert all(k.startswith("teacher.") for k in objective.state_dict())


def test_official_heads():
    backbone = TinyBackbone(embed_dim=32)
    s = build_mocov3_student(backbone, MoCoV3Config(hidden_dim=64, out_dim=16))
    assert [type(m).__name__ for m in s.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert [type(m).__name__ for m in s.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in list(s.projector) + list(s.predictor) if isinstance(m, torch.nn.Linear))
    assert s.projector[-1].affine is False
    vit = build_mocov3_student(backbone, MoCoV3Config(hidden_dim=64, out_dim=16, proj_layers=3, pred_last_bn=True))
    assert sum(isinstance(m, torch.nn.Linear) for m in vit.projector) == 3
    assert isinstance(vit.predictor[-1], torch.nn.BatchNorm1d) and vit.predictor[-1].affine is False
    d = MoCoV3Config()
    assert (d.hidden_dim, d.out_dim, d.temperature) == (4096, 256, 1.0)


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="mocov3.temperature"):
        MoCoV3Config(temperature=-1).validate()
    with pytest.raises(ValueError, match="mocov3.proj_layers"):
        MoCoV3Config(proj_layers=0).validate()
    no_predictor = build_simclr_student(TinyBackbone(), SimCLRConfig(hidden_dim=8, out_dim=4))
    with pytest.raises(ValueError, match="predictor"):
        MoCoV3Objective(no_predictor, MoCoV3Config(), 2, 1, torch.float32)
    student, objective = build("mocov3")
    with pytest.raises(ValueError, match="n_global=2"):
        MoCoV3Objective(student, MoCoV3Config(), 1, 1, torch.float32)
    with pytest.raises(ValueError, match="two equal-shape crops"):
        objective.training_loss(student, (global_crops(1)[:1], torch.arange(B_LOCAL)), progress())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Keys gathered from both ranks, SyncBN in student and teacher: the ranks' mean loss and mean
    gradient (DeepSpeed's average) equal one process on the concatenated batch."""
    res = spawn("mocov3", tmp_path)
    student, objective = build("mocov3")
    loss, _ = objective.training_loss(student, (global_crops(2), torch.arange(2 * B_LOCAL)), progress())
    loss.backward()
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    for i, p in enumerate(student.parameters()):
        torch.testing.assert_close((res[0]["grads"][i] + res[1]["grads"][i]) / 2, p.grad, rtol=1e-4, atol=1e-5)
