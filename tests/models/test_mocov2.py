"""MoCo v2: the queue loss (fused kernel module) against the loop reference in float64 and float32,
the objective on a tiny model (queue moves only in step_kept, wrap-around, shuffled BN groups,
state_dict round trip), the official head, errors, and the queue on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genssl.models.contrastive import MoCoV2Loss
from genssl.models.mocov2 import MoCoV2Config, MoCoV2Objective, build_mocov2_student, mocov2_loss_reference
from genssl.tests.models.ssl_dist_workers import B_LOCAL, TinyBackbone, build, global_crops, progress, spawn
from genssl.tests.models.conftest import random_leaves


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("b,d,K,tau", [(7, 13, 23, 0.2), (1, 5, 3, 0.07), (12, 9, 31, 1.0)])
def test_loss_matches_reference(dtype, tol, b, d, K, tau):
    torch.manual_seed(b)
    moco = MoCoV2Loss(d, queue_size=K, temperature=tau).to(dtype)
    q, k = random_leaves((b, d), (b, d), seed=b * d, dtype=dtype)
    loss = moco(q, k, update_queue=False)
    grads = torch.autograd.grad(loss, (q, k))
    rq, rk = (t.detach().double().requires_grad_(True) for t in (q, k))
    ref = mocov2_loss_reference(rq, rk, moco.queue.double(), tau)
    ref_grads = torch.autograd.grad(ref, (rq, rk))
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def _step(objective, student, x_q, x_k):
    return objective.training_loss(student, ([x_q, x_k], torch.arange(x_q.shape[0])), progress())


def test_objective_on_tiny_model():
    student, objective = build("mocov2", shuffle_bn_groups=1)
    x_q, x_k = global_crops(1)
    queue0 = objective.loss.queue.clone()
    loss, terms = _step(objective, student, x_q, x_k)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(terms) == {"loss_contrastive"} and not terms["loss_contrastive"].requires_grad
    # one group: queries = student(x_q), keys = teacher(x_k), negatives = the batch's keys + the queue
    with torch.no_grad():
        q, k = student(x_q)[0], objective.teacher(x_k)[0]
    torch.testing.assert_close(loss.detach().double(), mocov2_loss_reference(q.double(), k.double(), queue0.double(), 0.2),
                               rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.backbone.net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.teacher.parameters())
    # running state: untouched by training_loss, the keys enter in step_kept
    assert torch.equal(objective.loss.queue, queue0) and int(objective.loss.queue_ptr) == 0
    objective.step_kept()
    torch.testing.assert_close(objective.loss.queue[:B_LOCAL], F.normalize(k, dim=1))
    assert torch.equal(objective.loss.queue[B_LOCAL:], queue0[B_LOCAL:]) and int(objective.loss.queue_ptr) == B_LOCAL
    with pytest.raises(AssertionError, match="step_kept"):
        objective.step_kept()  # a second commit of the same step is a bug in the caller
    assert objective.late_parameters(student) == []


def test_queue_wraps_around():
    """Queue of 10 (not a multiple of the batch, 3): pointer 3, 6, 9, then 2; the fourth step's keys
    fill rows 9, 0, 1."""
    student, objective = build("mocov2", shuffle_bn_groups=2)
    pending = []
    for step in range(3):
        _step(objective, student, *global_crops(1, step))
        pending.append(objective._pending_keys.clone())
        objective.step_kept()
        assert int(objective.loss.queue_ptr) == [3, 6, 9][step]
    _step(objective, student, *global_crops(1, 3))
    keys = objective._pending_keys.clone()
    objective.step_kept()
    assert int(objective.loss.queue_ptr) == 2
    queue = objective.loss.queue
    torch.testing.assert_close(queue[9], keys[0])
    torch.testing.assert_close(queue[:2], keys[1:])
    torch.testing.assert_close(queue[2:9], torch.cat(pending)[2:9])


def test_shuffled_bn_groups():
    """G groups: queries in contiguous chunks, keys in chunks of a random permutation, back in order."""
    torch.manual_seed(1)
    student, objective = build("mocov2", shuffle_bn_groups=3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 5, 5, generator=g)
    with torch.no_grad():
        q = objective.queries(student, x)
        torch.testing.assert_close(q, torch.cat([student(x[:2])[0], student(x[2:4])[0], student(x[4:])[0]]))
        torch.manual_seed(7)
        k = objective.keys(x)
        torch.manual_seed(7)
        perm = torch.randperm(6)
        k_perm = torch.cat([objective.teacher(c)[0] for c in x[perm].tensor_split(3)])
        torch.testing.assert_close(k[perm], k_perm)
        # the groups matter: one BN group over all six images gives other keys
        assert not torch.allclose(k, objective.teacher(x)[0], atol=1e-3)
    with pytest.raises(ValueError, match="shuffle_bn_groups"):
        objective.queries(student, x[:2])


def test_queue_is_in_state_dict_and_round_trips():
    student, objective = build("mocov2", shuffle_bn_groups=3)
    _step(objective, student, *global_crops(1))
    objective.step_kept()
    state = objective.state_dict()
    assert {"loss.queue", "loss.queue_ptr"} <= set(state) and any(k.startswith("teacher.") for k in state)
    torch.manual_seed(123)  # another random initial queue
    fresh = MoCoV2Objective(student, objective.cfg, 2, 1, torch.float32)
    assert not torch.equal(fresh.loss.queue, objective.loss.queue)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.loss.queue, objective.loss.queue) and int(fresh.loss.queue_ptr) == B_LOCAL


def test_official_head_and_errors():
    s = build_mocov2_student(TinyBackbone(embed_dim=32), MoCoV2Config(hidden_dim=64, out_dim=16))
    assert [type(m).__name__ for m in s.projector] == ["Linear", "ReLU", "Linear"]
    assert s.projector[0].bias is not None and s.projector[2].bias is not None and s.predictor is None
    d = MoCoV2Config()
    assert (d.hidden_dim, d.out_dim, d.queue_size, d.temperature) == (2048, 128, 65536, 0.2)
    for field, value in [("queue_size", 0), ("temperature", 0.0), ("shuffle_bn_groups", 0)]:
        with pytest.raises(ValueError, match=f"mocov2.{field}"):
            MoCoV2Config(**{field: value}).validate()
    student, objective = build("mocov2")
    with pytest.raises(ValueError, match="n_global=2"):
        MoCoV2Objective(student, MoCoV2Config(), 4, 1, torch.float32)
    with pytest.raises(ValueError, match="n_local=0"):
        objective.training_loss(student, (global_crops(1) * 2, torch.arange(B_LOCAL)), progress())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_ranks_share_one_queue(tmp_path):
    """Two kept steps on 2 ranks (global batch 6, queue 10: the second wraps): the queues are
    identical on both ranks, equal to one process's queue on the concatenated batches, and move only
    in step_kept; each rank's loss is the reference on its own queries and keys."""
    res = spawn("mocov2_queue", tmp_path)
    student, objective = build("mocov2", shuffle_bn_groups=1)
    assert torch.equal(res[0]["queue_init"], objective.loss.queue)  # same seed: the trainer's broadcast
    for step in range(2):
        queue_before = objective.loss.queue.clone()
        x_q, x_k = global_crops(2, step)
        with torch.no_grad():
            q, k = student(x_q)[0], objective.teacher(x_k)[0]  # BN over the global batch == SyncBN
        _step(objective, student, x_q, x_k)
        objective.step_kept()
        for r in range(2):
            assert torch.equal(res[r][f"queue{step}"], res[0][f"queue{step}"])
            previous = res[r]["queue_init"] if step == 0 else res[r]["queue0"]
            assert torch.equal(res[r][f"queue_before_kept{step}"], previous)
            rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
            ref = mocov2_loss_reference(q[rows].double(), k[rows].double(), queue_before.double(), 0.2)
            torch.testing.assert_close(res[r][f"loss{step}"].double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res[0][f"queue{step}"], objective.loss.queue, rtol=1e-5, atol=1e-6)
        assert int(res[0][f"ptr{step}"]) == int(objective.loss.queue_ptr) == [6, 2][step]
