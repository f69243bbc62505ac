"""StableRep: the multi-positive loss (fused kernel module) against the row-by-row reference of the
paper's Algorithm 1 in float64 on odd, ragged shapes (value and gradients), closed forms, the objective
on a tiny model, errors, and 2 gloo ranks == one process on the concatenated batch."""

from __future__ import annotations

import math

import pytest
import torch

from genssl.models.contrastive import MultiPositiveLoss, NTXentLoss
from genssl.models.stablerep import (StableRepConfig, StableRepObjective, build_stablerep_student,
                                     stablerep_loss_reference, view_labels)
from genssl.tests.models.conftest import random_leaves
from genssl.tests.models.ssl_dist_workers import TinyBackbone, progress
from genssl.tests.models.stablerep_dist_workers import N_LOCAL, V, build, global_batch, spawn


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("labels,d,tau", [
    ([3, 3, 3, 8, 8, 8, 8, 1, 1, 5, 5, 5, 5, 5], 13, 0.1),  # ragged groups of 3, 4, 2, 5
    ([0, 1, 2, 0, 1, 2, 0, 1, 2], 7, 0.5),                   # 3 sources x 3 views, view-major
    ([4, 4, 9], 3, 1.0),                                      # a row with no positive contributes 0
])
def test_loss_matches_reference(dtype, tol, labels, d, tau):
    labels = torch.tensor(labels)
    (f,) = random_leaves((len(labels), d), seed=len(labels) * d, dtype=dtype)
    loss = MultiPositiveLoss(tau)(f, labels)
    (grad,) = torch.autograd.grad(2.5 * loss, f)  # grad_output != 1
    r = f.detach().double().requires_grad_(True)
    ref = stablerep_loss_reference(r, labels, tau)
    (ref_grad,) = torch.autograd.grad(2.5 * ref, r)
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)


def test_reference_closed_forms():
    """m identical views per source, sources orthogonal: ℓ = −1/τ + log((m−1)e^{1/τ} + (N−m)) for every row;
    m = 2 is NT-Xent."""
    tau, n_src, m = 0.5, 3, 4
    z = torch.eye(n_src, dtype=torch.float64).repeat(m, 1)  # view-major
    labels = view_labels(torch.arange(n_src), m)
    want = -1 / tau + math.log((m - 1) * math.exp(1 / tau) + (n_src * m - m))
    torch.testing.assert_close(stablerep_loss_reference(z, labels, tau), torch.tensor(want, dtype=torch.float64))
    z1, z2 = random_leaves((5, 6), (5, 6), seed=1)
    torch.testing.assert_close(stablerep_loss_reference(torch.cat([z1, z2]), view_labels(torch.arange(5), 2), 0.2),
                               NTXentLoss(0.2)(z1, z2))


def test_view_labels_are_view_major():
    assert view_labels(torch.tensor([7, 2]), 3).tolist() == [7, 2, 7, 2, 7, 2]


def test_objective_on_tiny_model():
    student, objective = build()
    views, idx = global_batch(1)
    loss, terms = objective.training_loss(student, (views, idx), progress())
    assert objective.teacher is None and loss.dim() == 0 and torch.isfinite(loss)
    assert set(terms) == {"loss_contrastive"} and not terms["loss_contrastive"].requires_grad
    with torch.no_grad():
        z, p = student(views)
    assert p is None and z.shape == (V * N_LOCAL, 7)
    # the objective's loss is the reference on the student's projections, labelled by source index
    torch.testing.assert_close(loss.detach().double(),
                               stablerep_loss_reference(z.double(), view_labels(idx, V), 0.2), rtol=1e-5, atol=1e-5)
    # ...and not on labels that read the rows source-major (the views of one source are not consecutive)
    wrong = stablerep_loss_reference(z.double(), torch.arange(V * N_LOCAL) // V, 0.2)  # source-major: wrong
    assert not torch.allclose(loss.detach().double(), wrong, rtol=1e-3)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert objective.state_dict() == {} and objective.late_parameters(student) == []


def test_official_projector_layout():
    head = build_stablerep_student(TinyBackbone(embed_dim=768), StableRepConfig()).projector
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU",
                                                "Linear"]
    assert (head[0].out_features, head[3].out_features, head[6].out_features) == (4096, 4096, 256)
    assert head[6].bias is not None


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="stablerep.temperature"):
        StableRepConfig(temperature=0).validate()
    with pytest.raises(ValueError, match="stablerep.num_layers"):
        StableRepConfig(num_layers=0).validate()
    student, objective = build()
    with pytest.raises(ValueError, match="stablerep.m >= 2"):
        StableRepObjective(student, StableRepConfig(), 1, 1, torch.float32)
    views, idx = global_batch(1)
    with pytest.raises(ValueError, match=f"{V} equal-shape views"):
        objective.training_loss(student, (views[:2], idx), progress())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_ranks_equal_one_process(tmp_path):
    """The bare loss: the ranks' mean value == one process, each rank's row gradient == W x one process's
    (cross-rank positives included). The objective: mean loss and mean gradient (what DeepSpeed applies)
    == one process on the concatenated batch, BatchNorm synchronised as the trainer does."""
    both = spawn("both", tmp_path)
    rows, res = [r["rows"] for r in both], [r["objective"] for r in both]
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(10, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 3, 0, 3, 1])
    want = stablerep_loss_reference(feats, labels, 0.3)
    want.backward()
    torch.testing.assert_close((rows[0]["loss"] + rows[1]["loss"]) / 2, want.detach())
    torch.testing.assert_close(torch.cat([rows[0]["grad"], rows[1]["grad"]]), 2 * feats.grad)

    student, objective = build()
    loss, _ = objective.training_loss(student, global_batch(2), progress())
    loss.backward()
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    for i, p in enumerate(student.parameters()):
        torch.testing.assert_close((res[0]["grads"][i] + res[1]["grads"][i]) / 2, p.grad, rtol=1e-4, atol=1e-5)
