"""Worker functions for the 2-rank gloo tests (importable by spawned processes as
``genssl.tests.kernels.dist_workers``). Each scenario builds the same global batch on every rank
from a fixed seed, runs on this rank's slice and returns tensors that the parent compares with a
single-process run on the concatenated batch (see ``global_batch``)."""

from __future__ import annotations

from pathlib import Path

import torch

from genssl.tests import dist_spawn

M_LOCAL = 13
D = 19


def global_batch(world: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = world * M_LOCAL
    return dict(
        z=torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1) * 2,
        keys=torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1) * 2,
        labels=torch.randint(0, 7, (n,), generator=g),  # groups spanning ranks, some singletons
        weights=torch.rand(n, generator=g) * 2,
        x=torch.randn(world * 3, 4, generator=g),
        coeff=torch.randn(world, world * 3, 4, generator=g),
        views=torch.randn(2, n, D, generator=g),  # module tests: two views [n, D] each
        mv_keys=torch.randn(2, n, D, generator=g),
        qdc=torch.randn(n, generator=g),
    )


def _local(t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    return t[rank * n:(rank + 1) * n].clone()


def scenario_kernel(rank: int, world: int) -> dict:
    from genssl.kernels import distributed_contrastive_loss, gather_with_grad

    from genssl.kernels.contrastive import triton_available

    b = global_batch(world)
    sl = lambda t: _local(t, rank, M_LOCAL)  # noqa: E731
    out = {"triton": torch.tensor(triton_available(torch.device("cpu")))}
    # gather_with_grad: forward = all-gather, backward = sum over ranks of this rank's slice
    x = _local(b["x"], rank, 3).requires_grad_(True)
    y = gather_with_grad(x)
    out["gather_y"] = y.detach()
    (out["gather_dx"],) = torch.autograd.grad((y * b["coeff"][rank]).sum(), x)
    # NT-Xent / StableRep pattern: k_local is q_local, self excluded, weights
    z = sl(b["z"]).requires_grad_(True)
    loss = distributed_contrastive_loss(z, z, sl(b["labels"]), sl(b["labels"]), temperature=0.2,
                                        weights=sl(b["weights"]), exclude_self=True)
    out["self_loss"] = loss.detach()
    (out["self_dz"],) = torch.autograd.grad(loss, z)
    rows = distributed_contrastive_loss(z, z, sl(b["labels"]), sl(b["labels"]), temperature=0.2,
                                        exclude_self=True, reduction="none")
    out["self_rows"] = rows.detach()
    # MoCo v3 pattern: queries vs gathered keys, positive at the global diagonal, no exclusion
    q = sl(b["z"]).requires_grad_(True)
    k = sl(b["keys"]).requires_grad_(True)
    ids = torch.arange(M_LOCAL) + rank * M_LOCAL
    loss = distributed_contrastive_loss(q, k, ids, ids, temperature=0.1, exclude_self=False)
    out["v3_loss"] = loss.detach()
    out["v3_dq"], out["v3_dk"] = torch.autograd.grad(loss, (q, k))
    return out


def scenario_modules(rank: int, world: int) -> dict:
    from genssl.models.contrastive import MoCoV2Loss, MoCoV3Loss, MultiPositiveLoss, NTXentLoss, qdc_weights

    b = global_batch(world)
    sl = lambda t: _local(t, rank, M_LOCAL)  # noqa: E731
    out = {}
    z1 = sl(b["views"][0]).requires_grad_(True)
    z2 = sl(b["views"][1]).requires_grad_(True)
    w = sl(qdc_weights(b["qdc"]))
    loss = NTXentLoss(temperature=0.1)(z1, z2, weights=w)
    out["ntx_loss"] = loss.detach()
    out["ntx_d1"], out["ntx_d2"] = torch.autograd.grad(loss, (z1, z2))
    f = sl(b["views"][0]).requires_grad_(True)
    loss = MultiPositiveLoss(temperature=0.1)(f, sl(b["labels"]))
    out["mp_loss"] = loss.detach()
    (out["mp_df"],) = torch.autograd.grad(loss, f)
    q1 = sl(b["views"][0]).requires_grad_(True)
    q2 = sl(b["views"][1]).requires_grad_(True)
    k1, k2 = sl(b["mv_keys"][0]), sl(b["mv_keys"][1])
    loss = MoCoV3Loss(temperature=0.2).symmetric(q1, q2, k1, k2, weights=w)
    out["v3_loss"] = loss.detach()
    out["v3_d1"], out["v3_d2"] = torch.autograd.grad(loss, (q1, q2))
    torch.manual_seed(0)  # same initial queue on every rank
    moco = MoCoV2Loss(dim=D, queue_size=40, temperature=0.2)
    out["v2_queue0"] = moco.queue.clone()
    loss = moco(sl(b["views"][0]), sl(b["mv_keys"][0]))
    out["v2_loss"] = loss.detach()
    out["v2_queue1"] = moco.queue.clone()
    out["v2_ptr1"] = moco.queue_ptr.clone()
    return out


SCENARIOS = {"kernel": scenario_kernel, "modules": scenario_modules}


def spawn(scenario: str, tmp_path: Path, world: int = 2) -> list[dict]:
    """Run ``SCENARIOS[scenario]`` on ``world`` gloo ranks; each rank's results."""
    return dist_spawn.spawn(__name__, scenario, tmp_path, world)
