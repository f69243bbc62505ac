"""DINO head, multi-crop wrapper, loss (vs. the loop reference) and the cosine schedule."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from genssl.models.backbones import build_backbone
from genssl.models.schedules import cosine_schedule
from genssl.models.dino import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    dino_loss_reference,
)

# ---------------------------------------------------------------------------------- head


@pytest.mark.parametrize("nlayers,use_bn", [(1, False), (3, False), (3, True)])
def test_head_shapes(nlayers: int, use_bn: bool) -> None:
    head = DINOHead(16, out_dim=64, hidden_dim=32, bottleneck_dim=8, nlayers=nlayers, use_bn=use_bn)
    assert head(torch.randn(5, 16)).shape == (5, 64)
    assert head.last_layer.weight_v.shape == (64, 8)
    assert head.last_layer.weight_g.shape == (64, 1)


def test_norm_last_layer_fixes_g() -> None:
    head = DINOHead(16, out_dim=64, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    g = head.last_layer.weight_g
    assert not g.requires_grad and torch.equal(g, torch.ones(64, 1))
    assert all(p is not g for p in head.parameters())
    assert "last_layer.weight_g" in head.state_dict()  # same keys as the reference checkpoints
    head(torch.randn(4, 16)).square().sum().backward()
    assert g.grad is None and head.last_layer.weight_v.grad is not None
    assert head.last_layer_parameters() == [head.last_layer.weight_v]


def test_trainable_g_when_not_normalised() -> None:
    head = DINOHead(16, out_dim=64, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    head(torch.randn(4, 16)).square().sum().backward()
    assert head.last_layer.weight_g.grad is not None
    assert len(head.last_layer_parameters()) == 2


def test_weight_norm_matches_torch() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    lin = torch.nn.Linear(8, 32, bias=False)
    lin = torch.nn.utils.parametrizations.weight_norm(lin, dim=0)
    with torch.no_grad():
        lin.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        lin.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(6, 8)
    torch.testing.assert_close(head.last_layer(x), lin(x))
    # unit-norm rows when g is fixed to 1
    fixed = DINOHead(16, out_dim=32, hidden_dim=32, bottleneck_dim=8)
    torch.testing.assert_close(fixed.last_layer.weight().norm(dim=1), torch.ones(32))


# ---------------------------------------------------------------------------------- wrapper


def test_multicrop_wrapper_order_equals_per_crop_runs() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", img_size=16, patch_size=8)
    model = MultiCropWrapper(backbone, DINOHead(192, out_dim=32, hidden_dim=32, bottleneck_dim=8)).eval()
    B = 2
    sizes = [16, 16, 8, 8, 8, 16]  # the last group shows that grouping is by consecutive crops
    crops = [torch.randn(B, 3, s, s) for s in sizes]
    with torch.no_grad():
        out = model(crops)
        expected = torch.cat([model.head(model.forward_backbone(c)) for c in crops])
    assert out.shape == (len(sizes) * B, 32)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    calls: list[tuple[int, ...]] = []
    backbone.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(crops)
    assert calls == [(2 * B, 3, 16, 16), (3 * B, 3, 8, 8), (B, 3, 16, 16)]


# ---------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("n_global,n_crops", [(2, 2), (2, 5), (2, 10), (1, 3), (3, 4)])
def test_loss_matches_reference_float64(n_global: int, n_crops: int) -> None:
    torch.manual_seed(n_global * 10 + n_crops)
    B, D = 3, 17
    loss_fn = DINOLoss(D, n_global=n_global, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, D))
    center = loss_fn.center.double().clone()
    s = (3 * torch.randn(n_crops * B, D, dtype=torch.float64)).requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    t = 3 * torch.randn(n_global * B, D, dtype=torch.float64)

    loss = loss_fn(s, t, teacher_temp=0.04)
    ref = dino_loss_reference(s_ref, t, center, 0.04, 0.1, n_global)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-10, atol=1e-12)


def test_loss_gradcheck() -> None:
    torch.manual_seed(0)
    loss_fn = DINOLoss(5, n_global=2, student_temp=0.2)
    loss_fn.center.copy_(torch.randn(1, 5))
    t = torch.randn(4, 5, dtype=torch.float64)
    s = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, t, 0.07, update_center=False), (s,))


def test_teacher_gets_no_gradient() -> None:
    loss_fn = DINOLoss(8, n_global=2)
    s = torch.randn(8, 8, requires_grad=True)
    t = torch.randn(4, 8, requires_grad=True)
    loss_fn(s, t, 0.04).backward()
    assert t.grad is None and s.grad is not None


def test_center_update_formula() -> None:
    torch.manual_seed(0)
    loss_fn = DINOLoss(6, n_global=2, center_momentum=0.9)
    assert loss_fn.center.dtype == torch.float32 and loss_fn.center.shape == (1, 6)
    assert "center" in dict(loss_fn.named_buffers())
    c = torch.zeros(1, 6)
    for _ in range(3):
        t = torch.randn(4, 6)
        loss_fn(torch.randn(6, 6), t, 0.04)
        c = 0.9 * c + 0.1 * t.mean(0, keepdim=True)
        torch.testing.assert_close(loss_fn.center, c)
    before = loss_fn.center.clone()
    loss_fn(torch.randn(6, 6), torch.randn(4, 6), 0.04, update_center=False)
    assert torch.equal(loss_fn.center, before)


def test_pieces_compose_to_the_loss() -> None:
    torch.manual_seed(1)
    B, D = 4, 9
    loss_fn = DINOLoss(D, n_global=2)
    loss_fn.center.copy_(torch.randn(1, D))
    s, t = torch.randn(3 * B, D, dtype=torch.float64), torch.randn(2 * B, D, dtype=torch.float64)
    q = loss_fn.teacher_probs(t, 0.04).chunk(2)
    torch.testing.assert_close(q[0].sum(-1), torch.ones(B, dtype=torch.float64))
    sc = s.chunk(3)
    pairs = [loss_fn.cross_entropy(q[i], sc[j]) for i in range(2) for j in range(3) if i != j]
    torch.testing.assert_close(loss_fn(s, t, 0.04), torch.stack(pairs).mean())
    assert loss_fn.cross_entropy(q[0], sc[1], reduction="none").shape == (B,)


def test_low_precision_inputs_compute_in_float32() -> None:
    torch.manual_seed(0)
    loss_fn = DINOLoss(64, n_global=2)
    s, t = torch.randn(8, 64).bfloat16(), torch.randn(4, 64).bfloat16()
    loss = loss_fn(s, t, 0.04, update_center=False)
    assert loss.dtype == torch.float32
    ref = dino_loss_reference(s.float(), t.float(), loss_fn.center, 0.04, 0.1, 2)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss_fn.update_center(t)
    assert loss_fn.center.dtype == torch.float32


def test_loss_shape_errors() -> None:
    loss_fn = DINOLoss(8, n_global=2)
    with pytest.raises(ValueError, match="multiple of n_global"):
        loss_fn(torch.randn(8, 8), torch.randn(3, 8), 0.04)
    with pytest.raises(ValueError, match="multiple of the batch size"):
        loss_fn(torch.randn(7, 8), torch.randn(4, 8), 0.04)
    with pytest.raises(ValueError, match="n_crops >= n_global"):
        loss_fn(torch.randn(2, 8), torch.randn(4, 8), 0.04)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        loss_fn(torch.randn(8, 5), torch.randn(4, 5), 0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn(torch.randn(8, 8), torch.randn(4, 8), 0.0)


def _center_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        loss_fn = DINOLoss(5, n_global=1, center_momentum=0.5)
        g = torch.Generator().manual_seed(rank)
        rows = 2 + rank  # uneven batches: the centre is the mean over all rows
        t = torch.randn(rows, 5, generator=g)
        loss_fn(torch.randn(2 * rows, 5, generator=g), t, 0.04)
        torch.save(loss_fn.center, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_center_is_all_reduced(tmp_path) -> None:
    worker = importlib.import_module("genssl.tests.models.test_dino")._center_worker
    out = str(tmp_path / "center")
    mp.spawn(worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    teachers = [torch.randn(2 + r, 5, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    expected = 0.5 * torch.cat(teachers).mean(0, keepdim=True)
    for r in range(2):
        torch.testing.assert_close(torch.load(f"{out}.{r}"), expected)


# ---------------------------------------------------------------------------------- schedule


def test_cosine_schedule_endpoints_and_warmup() -> None:
    s = cosine_schedule(1.0, 0.1, total_steps=100, warmup_steps=10, start_warmup=0.01)
    assert s.shape == (100,) and s.dtype == np.float64
    assert s[0] == pytest.approx(0.01) and s[9] == pytest.approx(1.0) and s[10] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diff(s[:10]), (1.0 - 0.01) / 9)
    assert np.all(np.diff(s[10:]) <= 0)
    # like DINO's cosine_scheduler, the last step is one step short of `final`
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 89 / 90)))
    assert s[-1] == pytest.approx(0.1, abs=1e-3)
    no_warm = cosine_schedule(0.996, 1.0, total_steps=50)
    assert no_warm[0] == pytest.approx(0.996) and np.all(np.diff(no_warm) >= 0)
    assert len(cosine_schedule(1.0, 0.0, total_steps=5, warmup_steps=5)) == 5
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total_steps=5, warmup_steps=6)


def test_a_uniform_student_output_is_reported_as_a_collapse() -> None:
    """`DINOObjective.watch_collapse`: entropy 1 for a uniform output, a warning after COLLAPSE_STEPS of
    them in a row (and only then), the count reset by one informative step."""
    from genssl.models.objectives import COLLAPSE_STEPS, DINOConfig, DINOObjective, build_dino_student

    cfg = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, drop_path_rate=0.0)
    objective = DINOObjective(build_dino_student("resnet18", 32, 16, cfg, 2, 8), cfg, 2, 1, torch.float32)
    uniform, peaked = torch.zeros(6, 64), torch.randn(6, 64) * 10
    assert float(objective.watch_collapse(uniform)) == pytest.approx(1.0)
    assert float(objective.watch_collapse(peaked)) < 0.9  # resets the count
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(COLLAPSE_STEPS - 1):
            objective.watch_collapse(uniform)
        assert not caught
        objective.watch_collapse(uniform)
        objective.watch_collapse(uniform)
    assert len(caught) == 1 and "head collapsed" in str(caught[0].message)
