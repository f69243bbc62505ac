"""Barlow Twins (models/barlow.py): loss vs. the loop reference, closed forms, the objective on a
tiny model, and 2 gloo ranks against one process on the concatenated batch."""

from __future__ import annotations

import pytest
import torch

from genssl.models.barlow import (BarlowConfig, BarlowObjective, barlow_twins_loss, barlow_twins_loss_reference,
                                  build_barlow_student)
from genssl.tests.models.ssl_dist_workers_b import (B_LOCAL, WORLD, TinyBackbone, barlow_batch, barlow_objective_run,
                                                     global_crops, spawn, tiny_student, _progress)


@pytest.mark.parametrize("n,d,lambd", [(7, 5, 0.37), (11, 3, 0.0051), (2, 9, 1.3)])
def test_loss_and_gradients_match_reference(n, d, lambd):
    g = torch.Generator().manual_seed(n * d)
    z1 = (torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    z2 = (torch.randn(n, d, generator=g, dtype=torch.float64) + z1.detach() * 0.5).requires_grad_(True)
    loss, on, off = barlow_twins_loss(z1, z2, lambd=lambd)
    ref, ref_on, ref_off = barlow_twins_loss_reference(z1, z2, lambd=lambd)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(on, ref_on)
    torch.testing.assert_close(off, ref_off)
    grad_out = torch.tensor(0.7, dtype=torch.float64)  # a grad_output != 1
    got = torch.autograd.grad(loss, (z1, z2), grad_out)
    want = torch.autograd.grad(ref, (z1, z2), grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_closed_forms():
    # Identical views: C_ii = var / (var + eps) exactly, so on_diag = Σ_i (eps / (var_i + eps))².
    z = torch.randn(9, 4, dtype=torch.float64)
    eps = 0.1
    var = z.var(0, unbiased=False)
    _, on, _ = barlow_twins_loss(z, z, eps=eps)
    torch.testing.assert_close(on, ((eps / (var + eps)) ** 2).sum())
    # Standardisation: per-dimension affine maps of a view change nothing (up to eps).
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    scale, shift = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    a = barlow_twins_loss(z1, z2, eps=1e-12)[0]
    b = barlow_twins_loss(z1 * scale + shift, z2, eps=1e-12)[0]
    torch.testing.assert_close(a, b)
    # Orthogonal standardised columns on both views (a ±1 Hadamard design): C = I, L = 0.
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)[:, 1:]
    loss, on, off = barlow_twins_loss(h, h, eps=1e-12)
    assert abs(float(loss)) < 1e-9 and abs(float(off)) < 1e-9


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="barlow.lambd"):
        BarlowConfig(lambd=-1).validate()
    with pytest.raises(ValueError, match="barlow.hidden_dim"):
        BarlowConfig(hidden_dim=0).validate()
    student, cfg = tiny_student("barlow")
    with pytest.raises(ValueError, match="n_global=2"):
        BarlowObjective(student, cfg, n_global=3, epochs=1, dtype=torch.float32)
    objective = BarlowObjective(student, cfg, n_global=2, epochs=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="n_local=0"):
        objective.training_loss(student, (global_crops([8, 8, 8], 4, 0, torch.float32), None), _progress(0))


def test_student_layout():
    student = build_barlow_student(TinyBackbone(), BarlowConfig(hidden_dim=12, out_dim=10))
    linears = [m for m in student.projector if isinstance(m, torch.nn.Linear)]
    bns = [m for m in student.projector if isinstance(m, torch.nn.BatchNorm1d)]
    assert [l.out_features for l in linears] == [12, 12, 10] and all(l.bias is None for l in linears)
    assert len(bns) == 2 and student.predictor is None  # BN + ReLU on the first two, plain last linear


def test_objective_on_tiny_model():
    student, cfg = tiny_student("barlow")
    objective = BarlowObjective(student, cfg, n_global=2, epochs=1, dtype=torch.float32)
    assert objective.teacher is None and objective.late_parameters(student) == []
    crops = global_crops([8, 8], 6, seed=3, dtype=torch.float32)
    loss, terms = objective.training_loss(student, (crops, torch.arange(6)), _progress(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(terms) == {"on_diag", "off_diag"} and not any(t.requires_grad for t in terms.values())
    torch.testing.assert_close(loss.detach(), terms["on_diag"] + cfg.lambd * terms["off_diag"])
    (z1, _), (z2, _) = student(crops[0]), student(crops[1])  # one call per view: BN statistics per view
    torch.testing.assert_close(loss, barlow_twins_loss(z1, z2, lambd=cfg.lambd)[0])
    joint, _ = student(crops)
    assert not torch.allclose(torch.cat([z1, z2]), joint)  # (which differs from one call on both)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.backbone[0].weight.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    res = spawn("barlow", tmp_path, WORLD)
    b = barlow_batch(WORLD)
    a = b["a"].clone().requires_grad_(True)
    x1, x2 = b["x1"].clone().requires_grad_(True), b["x2"].clone().requires_grad_(True)
    loss, on, off = barlow_twins_loss(x1 @ a, x2 @ a, lambd=0.3)
    da, dx1, dx2 = torch.autograd.grad(loss, (a, x1, x2))
    for r in range(WORLD):
        # Every rank holds the global loss ...
        torch.testing.assert_close(res[r]["loss"], loss.detach())
        torch.testing.assert_close(res[r]["on_diag"], on.detach())
        torch.testing.assert_close(res[r]["off_diag"], off.detach())
        # ... and W × the global gradient of its own rows.
        rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        torch.testing.assert_close(res[r]["dx1"], WORLD * dx1[rows])
        torch.testing.assert_close(res[r]["dx2"], WORLD * dx2[rows])
    # DeepSpeed averages the ranks' gradients of a shared weight: that is the single-process one.
    torch.testing.assert_close(sum(res[r]["da"] for r in range(WORLD)) / WORLD, da)
    # The objective with the trainer's global BatchNorms: same loss, averaged gradients = one process.
    single = barlow_objective_run(world=1, rank=0)
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["objective"]["loss"], single["loss"])
    assert set(single["grads"]) == set(res[0]["objective"]["grads"])
    for name, grad in single["grads"].items():
        mean = sum(res[r]["objective"]["grads"][name] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mean, grad, msg=name)
