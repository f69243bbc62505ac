"""SimCLR: NT-Xent (fused kernel module) against the loop reference in float64 and float32, the
objective on a tiny model, the v1 projector, config/crop errors, and 2 gloo ranks == one process."""

from __future__ import annotations

import pytest
import torch

from genssl.models.contrastive import NTXentLoss
from genssl.models.simclr import SimCLRConfig, SimCLRObjective, build_simclr_student, simclr_loss_reference
from genssl.tests.models.ssl_dist_workers import B_LOCAL, TinyBackbone, build, global_crops, progress, spawn
from genssl.tests.models.conftest import random_leaves


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n,d,tau", [(7, 13, 0.1), (11, 5, 0.5), (1, 3, 1.0)])
def test_ntxent_matches_reference(dtype, tol, n, d, tau):
    z1, z2 = random_leaves((n, d), (n, d), seed=n * d, dtype=dtype)
    loss = NTXentLoss(tau)(z1, z2)
    grads = torch.autograd.grad(loss, (z1, z2))
    r1, r2 = (z.detach().double().requires_grad_(True) for z in (z1, z2))
    ref = simclr_loss_reference(r1, r2, tau)
    ref_grads = torch.autograd.grad(ref, (r1, r2))
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_reference_closed_form():
    """Identical views, orthogonal images: ℓ = −1/τ + log(e^{1/τ} + 2N − 2)."""
    z = torch.eye(4, dtype=torch.float64)
    tau = 0.5
    want = -1 / tau + torch.log(torch.exp(torch.tensor(1 / tau, dtype=torch.float64)) + 6)
    torch.testing.assert_close(simclr_loss_reference(z, z.clone(), tau), want)


def test_objective_on_tiny_model():
    student, objective = build("simclr")
    crops = global_crops(1)
    loss, terms = objective.training_loss(student, (crops, torch.arange(B_LOCAL)), progress())
    assert objective.teacher is None and loss.dim() == 0 and torch.isfinite(loss)
    assert set(terms) == {"loss_contrastive"} and not terms["loss_contrastive"].requires_grad
    # the objective's loss is NT-Xent of the student's projections of the two views
    with torch.no_grad():
        z, p = student(crops)
    assert p is None and z.shape == (2 * B_LOCAL, 7)
    torch.testing.assert_close(loss.detach().double(), simclr_loss_reference(z[:B_LOCAL].double(), z[B_LOCAL:].double(), 0.3),
                               rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.backbone.net[0].weight.grad.abs().sum() > 0
    assert objective.state_dict() == {} and objective.late_parameters(student) == []
    assert not hasattr(objective, "step_kept")


def test_v1_projector_layout():
    backbone = TinyBackbone(embed_dim=2048)
    head = build_simclr_student(backbone, SimCLRConfig()).projector
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (2048, 2048, 128)
    assert head[0].bias is None and head[3].bias is None  # BN follows: a bias would cancel
    v2 = build_simclr_student(backbone, SimCLRConfig(num_layers=3, last_bn=False)).projector
    assert [type(m).__name__ for m in v2][-1] == "Linear" and v2[-1].bias is not None


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="simclr.temperature"):
        SimCLRConfig(temperature=0).validate()
    with pytest.raises(ValueError, match="simclr.num_layers"):
        SimCLRConfig(num_layers=0).validate()
    student, objective = build("simclr")
    with pytest.raises(ValueError, match="n_global=2"):
        SimCLRObjective(student, SimCLRConfig(), 3, 1, torch.float32)
    crops = global_crops(1) + [torch.randn(B_LOCAL, 3, 4, 4)]  # a local crop
    with pytest.raises(ValueError, match="n_local=0"):
        objective.training_loss(student, (crops, torch.arange(B_LOCAL)), progress())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Ranks' mean loss == one process on the concatenated batch; the ranks' mean gradient (what
    DeepSpeed applies) == its gradient. BatchNorm synchronised as the trainer does."""
    res = spawn("simclr", tmp_path)
    student, objective = build("simclr")
    crops = global_crops(2)
    loss, _ = objective.training_loss(student, (crops, torch.arange(2 * B_LOCAL)), progress())
    loss.backward()
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0]["term"], res[0]["loss"])
    for i, p in enumerate(student.parameters()):
        torch.testing.assert_close((res[0]["grads"][i] + res[1]["grads"][i]) / 2, p.grad, rtol=1e-4, atol=1e-5)
