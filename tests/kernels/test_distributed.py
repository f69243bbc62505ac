"""2-rank gloo: gather_with_grad and distributed_contrastive_loss equal the single-process loss
on the concatenated batch (loss summed over ranks; gradients per rank = slices of the global ones)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from genssl.kernels import contrastive_loss, distributed_contrastive_loss, gather_with_grad  # noqa: E402
from genssl.tests.kernels.dist_workers import M_LOCAL, global_batch, spawn  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORLD = 2


def _slice(t, r, n=M_LOCAL):
    return t[r * n:(r + 1) * n]


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


def close(a, b, what, tol=2e-5):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"{what}: max err {err:.3e}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_gloo_equals_single_process(tmp_path):
    res = spawn("kernel", tmp_path, WORLD)
    b = global_batch(WORLD)
    assert all(bool(r["triton"]) for r in res), "ranks did not run the Triton (interpreter) path"
    # gather_with_grad
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["gather_y"], b["x"])
        torch.testing.assert_close(res[r]["gather_dx"], b["coeff"].sum(0)[r * 3:(r + 1) * 3])
    # k = q, exclude self: sum over ranks of the losses == single-process loss; grads = global slices
    z = b["z"].clone().requires_grad_(True)
    loss = contrastive_loss(z, z, b["labels"], b["labels"], temperature=0.2, weights=b["weights"], self_offset=0)
    (dz,) = _grads(loss, z)
    close(sum(res[r]["self_loss"] for r in range(WORLD)), loss.detach(), "self loss")
    for r in range(WORLD):
        close(res[r]["self_dz"], _slice(dz, r), f"self dz rank {r}")
    rows = contrastive_loss(b["z"], b["z"], b["labels"], b["labels"], temperature=0.2, self_offset=0,
                            reduction="none")
    close(torch.cat([res[r]["self_rows"] for r in range(WORLD)]), rows, "rows (reduction=none)")
    # MoCo v3 pattern
    q = b["z"].clone().requires_grad_(True)
    k = b["keys"].clone().requires_grad_(True)
    ids = torch.arange(WORLD * M_LOCAL)
    loss = contrastive_loss(q, k, ids, ids, temperature=0.1)
    dq, dk = _grads(loss, q, k)
    close(sum(res[r]["v3_loss"] for r in range(WORLD)), loss.detach(), "v3 loss")
    for r in range(WORLD):
        close(res[r]["v3_dq"], _slice(dq, r), f"v3 dq rank {r}")
        close(res[r]["v3_dk"], _slice(dk, r), f"v3 dk rank {r}")


def test_single_process_fallbacks():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    z = torch.randn(8, 5)
    lab = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    a = distributed_contrastive_loss(z, z, lab, lab, temperature=0.1)
    b = contrastive_loss(z, z, lab, lab, temperature=0.1, self_offset=0)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exclude_self"):
        distributed_contrastive_loss(z, z[:7], lab, lab[:7], temperature=0.1)
    with pytest.raises(ValueError, match="reduction"):
        distributed_contrastive_loss(z, z, lab, lab, temperature=0.1, reduction="sum")
