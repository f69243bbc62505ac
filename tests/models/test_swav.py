"""SwAV (models/swav.py): Sinkhorn codes and the swapped-prediction loss vs. their references, the
objective on a tiny model (queue moves only in step_kept, prototypes are the late parameters), and
2 gloo ranks against one process on the concatenated batch."""

from __future__ import annotations

import math

import pytest
import torch

from genssl.models.swav import (SwAVConfig, SwAVObjective, SwAVPrototypes, build_swav_student, sinkhorn_knopp,
                                sinkhorn_knopp_reference, swav_loss, swav_loss_reference)
from genssl.tests.models.ssl_dist_workers_b import (B_LOCAL, K, SWAV_QUEUE, SWAV_STEPS, WORLD, TinyBackbone,
                                                     global_crops, spawn, swav_batch, swav_objective_run,
                                                     tiny_student, _progress)


@pytest.mark.parametrize("n,k,iterations", [(13, 7, 3), (5, 11, 1), (9, 4, 0), (3, 3, 10)])
def test_sinkhorn_matches_reference(n, k, iterations):
    g = torch.Generator().manual_seed(n * k)
    scores = torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 1
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=iterations)
    torch.testing.assert_close(codes, sinkhorn_knopp_reference(scores, 0.05, iterations))
    assert codes.shape == (n, k) and (codes >= 0).all()
    if iterations:
        torch.testing.assert_close(codes.sum(1), torch.ones(n, dtype=torch.float64))  # an assignment per sample
    # Many iterations balance the prototypes too: each gets n/k of the samples.
    balanced = sinkhorn_knopp(scores, epsilon=0.5, iterations=200)
    torch.testing.assert_close(balanced.sum(0), torch.full((k,), n / k, dtype=torch.float64))


@pytest.mark.parametrize("n_crops,n_global,b,k", [(4, 2, 5, 7), (2, 2, 3, 13), (3, 1, 4, 5)])
def test_loss_and_gradients_match_reference(n_crops, n_global, b, k):
    g = torch.Generator().manual_seed(n_crops * b * k)
    scores = (torch.rand(n_crops * b, k, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    codes = torch.softmax(torch.randn(n_global * b, k, generator=g, dtype=torch.float64), dim=1)
    loss, per_global = swav_loss(scores, codes, n_global, temperature=0.1)
    ref = swav_loss_reference(scores, codes, n_global, temperature=0.1)
    torch.testing.assert_close(loss, ref)
    assert per_global.shape == (n_global,)
    grad_out = torch.tensor(0.8, dtype=torch.float64)
    (ds,) = torch.autograd.grad(loss, scores, grad_out, retain_graph=True)
    (ds_ref,) = torch.autograd.grad(ref, scores, grad_out)
    torch.testing.assert_close(ds, ds_ref)


def test_closed_form_and_errors():
    # Uniform scores: every prediction is uniform, the cross-entropy of any code is log K.
    k = 6
    loss, _ = swav_loss(torch.zeros(8, k), torch.softmax(torch.randn(4, k), 1), n_global=2)
    torch.testing.assert_close(loss, torch.tensor(math.log(k)))
    with pytest.raises(ValueError, match="share K"):
        swav_loss(torch.zeros(8, 5), torch.zeros(4, 6), n_global=2)
    with pytest.raises(ValueError, match="n_global"):
        swav_loss(torch.zeros(8, 5), torch.zeros(3, 5), n_global=2)
    with pytest.raises(ValueError, match="V >= max"):
        swav_loss(torch.zeros(2, 5), torch.zeros(2, 5), n_global=1)
    with pytest.raises(ValueError, match="scores must be"):
        sinkhorn_knopp(torch.zeros(3))
    for field, value in (("temperature", 0.0), ("epsilon", -1.0), ("n_prototypes", 0), ("queue_length", -1)):
        with pytest.raises(ValueError, match=f"swav.{field}"):
            SwAVConfig(**{field: value}).validate()


def test_student_prototypes_are_unit_rows():
    student = build_swav_student(TinyBackbone(), SwAVConfig(hidden_dim=12, out_dim=5, n_prototypes=9))
    assert isinstance(student.predictor, SwAVPrototypes)
    proj = [m for m in student.projector if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in proj] == [12, 5] and proj[-1].bias is not None
    with torch.no_grad():
        student.predictor.prototypes.weight_v.mul_(7.0)  # the stored weights' norm does not matter
        z, scores = student(global_crops([8], 4, 0, torch.float32))
    w = torch.nn.functional.normalize(student.predictor.prototypes.weight_v, dim=1)
    torch.testing.assert_close(scores, torch.nn.functional.normalize(z, dim=1) @ w.t())
    assert scores.abs().max() <= 1 + 1e-6


def test_objective_on_tiny_model_queue_moves_only_in_step_kept():
    queue_length = 4
    student, cfg = tiny_student("swav", queue_length=queue_length, epoch_queue_starts=1)
    objective = SwAVObjective(student, cfg, n_global=2, epochs=3, dtype=torch.float32)
    assert objective.teacher is None
    assert objective.late_parameters(student) == [student.predictor.prototypes.weight_v]
    assert {"queue", "queue_filled"} <= set(objective.state_dict())
    b = 2
    batches = [global_crops([8, 8, 4, 4], b, seed=s, dtype=torch.float32) for s in range(4)]

    def step(i, epoch):
        student.zero_grad(set_to_none=True)
        queue = objective.queue.clone()
        loss, terms = objective.training_loss(student, (batches[i], torch.arange(b)), _progress(i, epoch))
        assert torch.equal(objective.queue, queue)  # training_loss never touches the queue
        return loss, terms

    # Epoch 0 < epoch_queue_starts: nothing enters the queue.
    loss, terms = step(0, epoch=0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(terms) == {"loss_crop0", "loss_crop1", "queue_in_use"}
    assert not any(t.requires_grad for t in terms.values())
    torch.testing.assert_close(loss.detach(), (terms["loss_crop0"] + terms["loss_crop1"]) / 2)
    loss.backward()
    assert student.backbone[0].weight.grad.abs().sum() > 0
    assert student.predictor.prototypes.weight_v.grad.abs().sum() > 0
    objective.step_kept()
    assert int(objective.queue_filled) == 0 and not objective.queue.any()
    # Epoch 1: the global crops' normalised projections enter (newest first), once the step is kept.
    for i in (1, 2):
        _, terms = step(i, epoch=1)
        assert float(terms["queue_in_use"]) == 0.0  # not full before this step
        with torch.no_grad():
            z, _ = student(batches[i])  # all crops: the projector's BatchNorm sees what training_loss saw
        objective.step_kept()
        assert int(objective.queue_filled) == min(i * b, queue_length)
        emb = torch.nn.functional.normalize(z[:2 * b], dim=1).view(2, b, -1)
        torch.testing.assert_close(objective.queue[:, :b], emb)
    # Full: the codes now use it (they differ from the batch-only codes).
    with torch.no_grad():
        _, scores = student(batches[3][:2])
    with_queue = objective.codes(scores, student)
    no_queue = torch.cat([sinkhorn_knopp(s, cfg.epsilon, cfg.sinkhorn_iterations) for s in scores.chunk(2)])
    assert not torch.allclose(with_queue, no_queue)
    w = torch.nn.functional.normalize(student.predictor.prototypes.weight_v, dim=1)
    expected = torch.cat([sinkhorn_knopp(torch.cat([objective.queue[i] @ w.t(), s]), cfg.epsilon,
                                         cfg.sinkhorn_iterations)[-b:] for i, s in enumerate(scores.chunk(2))])
    torch.testing.assert_close(with_queue, expected)
    _, terms = step(3, epoch=2)
    assert float(terms["queue_in_use"]) == 1.0
    # A step that is not kept leaves no trace: the next training_loss replaces its pending entries.
    queue = objective.queue.clone()
    step(0, epoch=2)
    step(1, epoch=2)
    objective.step_kept()
    with torch.no_grad():
        z, _ = student(batches[1])
    torch.testing.assert_close(objective.queue[:, :b], torch.nn.functional.normalize(z[:2 * b], dim=1).view(2, b, -1))
    torch.testing.assert_close(objective.queue[:, b:], queue[:, :queue_length - b])


def test_objective_errors():
    student, cfg = tiny_student("swav")
    with pytest.raises(ValueError, match="n_global"):
        SwAVObjective(student, cfg, n_global=0, epochs=1, dtype=torch.float32)
    other, _ = tiny_student("byol")
    with pytest.raises(ValueError, match="build_swav_student"):
        SwAVObjective(other, cfg, n_global=2, epochs=1, dtype=torch.float32)
    objective = SwAVObjective(student, cfg, n_global=2, epochs=1, dtype=torch.float32)
    assert "queue" not in objective.state_dict()  # no queue, no state
    with pytest.raises(ValueError, match="at least 2 crops"):
        objective.training_loss(student, (global_crops([8], 2, 0, torch.float32), None), _progress(0))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    res = spawn("swav", tmp_path, WORLD)
    b = swav_batch(WORLD)
    # Sinkhorn over [queue; batch] split across ranks = one process on all columns.
    codes = sinkhorn_knopp(torch.cat([b["queue_scores"], b["scores"]]), 0.05, 3)[-WORLD * B_LOCAL:]
    torch.testing.assert_close(torch.cat([res[r]["codes"] for r in range(WORLD)]), codes)
    # Loss: the ranks' mean is the global loss, each rank's gradient W × its rows' global gradient.
    scores = b["crop_scores"].clone().requires_grad_(True)
    crop_codes = torch.softmax(scores.detach()[:2 * WORLD * B_LOCAL] * 3, dim=1)
    loss, _ = swav_loss(scores, crop_codes, n_global=2, temperature=0.1)
    (ds,) = torch.autograd.grad(loss, scores)
    torch.testing.assert_close(sum(res[r]["loss"] for r in range(WORLD)) / WORLD, loss.detach())
    ds = ds.view(3, WORLD, B_LOCAL, K)
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["dscores"], WORLD * ds[:, r].reshape(3 * B_LOCAL, K))
    # The objective: codes (with the queue in the last step), loss, averaged gradients and the queue.
    single = swav_objective_run(world=1, rank=0)["steps"]
    assert len(single) == SWAV_STEPS
    assert [float(s["in_use"]) for s in single] == [0.0, 0.0, 0.0, 1.0]
    assert [int(s["filled"]) for s in single] == [0, WORLD * B_LOCAL, SWAV_QUEUE, SWAV_QUEUE]
    for t, s in enumerate(single):
        ranks = [res[r]["objective"]["steps"][t] for r in range(WORLD)]
        per_rank_codes = s["codes"].view(2, WORLD, B_LOCAL, K)
        for r, step in enumerate(ranks):
            torch.testing.assert_close(step["codes"].view(2, B_LOCAL, K), per_rank_codes[:, r], msg=f"codes step {t}")
            torch.testing.assert_close(step["queue"], s["queue"], msg=f"queue step {t}")  # identical on all ranks
            assert torch.equal(step["filled"], s["filled"])
        torch.testing.assert_close(sum(step["loss"] for step in ranks) / WORLD, s["loss"], msg=f"loss step {t}")
        assert set(s["grads"]) == set(ranks[0]["grads"])
        for name, grad in s["grads"].items():
            torch.testing.assert_close(sum(step["grads"][name] for step in ranks) / WORLD, grad, msg=f"{name} step {t}")
