"""Triton contrastive loss (interpreter on CPU) against the float64 materialising reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from genssl.kernels import contrastive as C  # noqa: E402
from genssl.kernels import contrastive_loss, contrastive_loss_reference  # noqa: E402
from genssl.kernels.contrastive import contrastive_loss_triton  # noqa: E402

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")

pytestmark = pytest.mark.skipif(
    not C.triton_available(torch.device("cpu")) and not torch.cuda.is_available(),
    reason="Triton interpreter unusable: TRITON_INTERPRET=1 must be set before triton is first imported "
           "(tests/kernels/conftest.py sets it; a test module imported earlier may have imported triton)")

# max |err| <= RTOL * max|ref| + ATOL, per dtype (gradients of bf16/fp16 go through a rounded dS tile)
TOL = {
    torch.float32: dict(loss=(1e-5, 1e-5), grad=(2e-5, 1e-6)),
    torch.float16: dict(loss=(1e-4, 1e-4), grad=(3e-3, 1e-4)),
    torch.bfloat16: dict(loss=(1e-4, 1e-4), grad=(3e-2, 1e-3)),
}
# On the GPU fp32 dots run as 3xTF32 (error ~1e-6 relative per product, not exact like numpy).
TOL_GPU = {**TOL, torch.float32: dict(loss=(1e-4, 1e-4), grad=(5e-4, 1e-5))}


def _labels_ragged(n, m, gen, singletons=2):
    """Groups of m consecutive rows, a short last group and some singleton labels (no positive)."""
    lab = torch.arange(n) // m
    lab[-singletons:] = 10_000 + torch.arange(singletons)
    return lab[torch.randperm(n, generator=gen)]


def make_case(pattern, M, N, D, dtype, seed=0):
    """Returns dict(q, k, q_labels, k_labels, self_offset, weights, shared) for a label pattern."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=gen), dim=-1)  # noqa: E731
    w = None
    shared = False
    if pattern == "ntxent":  # two views, k = q, self excluded; M = N = 2B
        B = M // 2
        q = rnd(2 * B, D)
        k = q
        ql = kl = torch.cat([torch.arange(B), torch.arange(B)])
        so, shared = 0, True
    elif pattern == "stablerep":  # m = 3 ragged groups, k = q, self excluded, singletons have no positive
        q = rnd(M, D)
        k = q
        ql = kl = _labels_ragged(M, 3, gen)
        so, shared = 0, True
    elif pattern == "mocov2":  # k = [keys; queue], queue labels -1
        B, K = M, N - M
        q = rnd(B, D)
        k = torch.cat([rnd(B, D), rnd(K, D)])
        ql = torch.arange(B)
        kl = torch.cat([torch.arange(B), torch.full((K,), -1)])
        so = None
    elif pattern == "mocov3":  # local rows vs all-gathered keys of 'rank' r: positive at column r*M + i
        r0 = N - M
        q = rnd(M, D)
        k = rnd(N, D)
        ql = torch.arange(M) + r0
        kl = torch.arange(N)
        so = None
    elif pattern == "offset":  # multi-GPU NT-Xent/StableRep: local rows are columns r0..r0+M of k
        r0 = N - M
        k = rnd(N, D)
        q = k[r0:r0 + M].clone()
        kl = _labels_ragged(N, 3, gen, singletons=3)
        ql = kl[r0:r0 + M].clone()
        so = r0
    elif pattern == "random":  # random labels (rows without positives), weights, self offset, M != N
        q = rnd(M, D)
        k = rnd(N, D)
        ql = torch.randint(0, 6, (M,), generator=gen)
        kl = torch.randint(0, 6, (N,), generator=gen)
        ql[:3] = 99  # matches nothing
        so = (N - M) // 2
        w = torch.rand(M, generator=gen) * 2
    else:
        raise AssertionError(pattern)
    q = (q * 2.0).to(dtype)  # not unit norm: exercises larger logits
    k = q if shared else (k * 2.0).to(dtype)
    return dict(q=q, k=k, q_labels=ql, k_labels=kl, self_offset=so, weights=w, shared=shared)


def run(fn, case, temperature, reduction, dtype=None, seed=1):
    """Loss and gradients (w.r.t. q and k; the same tensor when shared) of fn on case."""
    q = case["q"].detach().clone()
    if dtype is not None:
        q = q.to(dtype)
    q.requires_grad_(True)
    if case["shared"]:
        k = q
    else:
        k = case["k"].detach().clone()
        if dtype is not None:
            k = k.to(dtype)
        k.requires_grad_(True)
    loss = fn(q, k, case["q_labels"], case["k_labels"], temperature=temperature, weights=case["weights"],
              self_offset=case["self_offset"], reduction=reduction)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gq = torch.autograd.grad((loss * g.to(loss.dtype)).sum(), [q] if case["shared"] else [q, k])
    return loss, gq


def assert_close(got, ref, rtol_atol, what):
    rtol, atol = rtol_atol
    got = got.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs().max().item()
    bound = rtol * ref.abs().max().item() + atol
    assert err <= bound, f"{what}: max err {err:.3e} > {bound:.3e}"


def check_against_reference(case, dtype, temperature=0.1, reduction="mean"):
    loss, grads = run(contrastive_loss_triton, case, temperature, reduction)
    ref_loss, ref_grads = run(contrastive_loss_reference, case, temperature, reduction, dtype=torch.float64)
    assert loss.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    for g in grads:
        assert g.dtype == dtype
    assert_close(loss, ref_loss, TOL[dtype]["loss"], "loss")
    for name, g, rg in zip(("dq", "dk"), grads, ref_grads):
        assert_close(g, rg, TOL[dtype]["grad"], name)


PATTERNS = ["ntxent", "stablerep", "mocov2", "mocov3", "offset", "random"]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_fp32_matches_reference_odd_shapes(pattern, reduction):
    case = make_case(pattern, 37, 53, 19, torch.float32, seed=hash(pattern) % 1000)
    check_against_reference(case, torch.float32, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["stablerep", "random"])
def test_low_precision_matches_reference(pattern, dtype):
    case = make_case(pattern, 37, 53, 19, dtype, seed=3)
    check_against_reference(case, dtype, reduction="none")


@pytest.mark.parametrize("pattern,M,N,D", [("random", 130, 200, 70), ("ntxent", 130, 130, 70),
                                           ("mocov2", 96, 160, 64)])
def test_fp32_larger_shapes(pattern, M, N, D):
    case = make_case(pattern, M, N, D, torch.float32, seed=5)
    check_against_reference(case, torch.float32, temperature=0.07)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_d_chunked_path(dtype):
    """D > MAX_SINGLE_D: chunked contraction and split gradient output (with masked D tails)."""
    D = 300
    assert C._d_plan(D, True)["SINGLE_D"] is False
    case = make_case("random", 20, 45, D, dtype, seed=7)
    check_against_reference(case, dtype, temperature=0.2)


def test_single_d_boundary():
    """D = 256 is the largest single-chunk D; D = 257 takes the chunked path."""
    assert C._d_plan(256, True)["SINGLE_D"] and not C._d_plan(257, True)["SINGLE_D"]
    case = make_case("offset", 9, 21, 257, torch.float32, seed=8)
    check_against_reference(case, torch.float32, temperature=0.5)


@pytest.mark.parametrize("pattern,D", [("random", 19), ("stablerep", 300)])
def test_poisoned_outputs_are_overwritten(monkeypatch, pattern, D):
    """Every output buffer starts as NaN; finite, correct results prove every element is written."""
    monkeypatch.setattr(C, "POISON_OUTPUTS", True)
    assert torch.isnan(C._new((3,), torch.float32, torch.device("cpu"))).all()
    case = make_case(pattern, 37, 53, D, torch.float32, seed=11)
    check_against_reference(case, torch.float32, reduction="none")
    # the saved statistics too
    q, k = case["q"], case["k"]
    ql, kl = case["q_labels"], case["k_labels"]
    loss, lse2, cnt = C._launch_forward(q, k, ql, kl, C._LOG2E / 0.1, case["self_offset"], True)
    assert torch.isfinite(loss).all() and torch.isfinite(lse2).all() and torch.isfinite(cnt).all()


def test_small_tiles_many_programs(monkeypatch):
    """Tiles smaller than the data in both directions (edge masks on rows, columns and D)."""
    monkeypatch.setitem(C.INTERPRET_CONFIG, "BLOCK_M", 16)
    monkeypatch.setitem(C.INTERPRET_CONFIG, "BLOCK_N", 16)
    case = make_case("offset", 37, 53, 19, torch.float32, seed=12)
    check_against_reference(case, torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # computed, then masked
def test_extreme_logits_do_not_overflow():
    """Rows whose logits are all very negative (padded columns would get p = 2^260) and a self
    column far above the row's log-sum-exp (p_self = e^300): both must be masked, not overflow."""
    gen = torch.Generator().manual_seed(20)
    v = torch.nn.functional.normalize(torch.randn(37, 19, generator=gen), dim=1) * 3
    k = -v[torch.arange(53) % 37] + 0.01 * torch.randn(53, 19, generator=gen)
    lab = torch.arange(53) % 37
    case = dict(q=v, k=k, q_labels=lab[:37], k_labels=lab, self_offset=None, weights=None, shared=False)
    check_against_reference(case, torch.float32, temperature=0.05, reduction="none")
    z = torch.nn.functional.normalize(torch.randn(37, 19, generator=gen), dim=1) * 2
    ql = torch.arange(37) // 2
    case = dict(q=z, k=z, q_labels=ql, k_labels=ql, self_offset=0, weights=None, shared=True)
    check_against_reference(case, torch.float32, temperature=0.01, reduction="none")


def test_rows_without_positive_have_zero_loss_and_gradient():
    case = make_case("random", 37, 53, 19, torch.float32, seed=13)
    loss, (dq, dk) = run(contrastive_loss_triton, case, 0.1, "none")
    no_pos = torch.tensor([not bool((case["k_labels"] == case["q_labels"][i]).any()) for i in range(37)])
    assert no_pos[:3].all()
    assert (loss[no_pos] == 0).all()
    assert (dq[no_pos] == 0).all()


def test_no_valid_column_and_no_positive_anywhere():
    q = torch.randn(1, 8, requires_grad=True)
    loss = contrastive_loss_triton(q, q, torch.tensor([0]), torch.tensor([0]), temperature=0.1, self_offset=0)
    (dq,) = torch.autograd.grad(loss, q)
    assert loss.item() == 0.0 and torch.equal(dq, torch.zeros_like(dq))
    k = torch.randn(5, 8, requires_grad=True)
    loss = contrastive_loss_triton(q, k, torch.tensor([1]), torch.full((5,), 2), temperature=0.1)
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert loss.item() == 0.0 and not dq.any() and not dk.any()


def test_weights_are_constants_and_scale_rows():
    case = make_case("random", 37, 53, 19, torch.float32, seed=14)
    w = case["weights"].clone().requires_grad_(True)
    q, k = case["q"], case["k"]
    rows = contrastive_loss(q, k, case["q_labels"], case["k_labels"], temperature=0.1, self_offset=2,
                            reduction="none")
    rows_w = contrastive_loss(q, k, case["q_labels"], case["k_labels"], temperature=0.1, self_offset=2,
                              weights=w, reduction="none")
    mean_w = contrastive_loss(q, k, case["q_labels"], case["k_labels"], temperature=0.1, self_offset=2,
                              weights=w)
    torch.testing.assert_close(rows_w, rows * w.detach())
    torch.testing.assert_close(mean_w, (rows * w.detach()).sum() / 37)
    assert not rows_w.requires_grad


def test_ntxent_equals_cross_entropy_textbook():
    """NT-Xent through the kernel == SimCLR's cross-entropy on the masked similarity matrix."""
    B, D, tau = 21, 19, 0.2
    gen = torch.Generator().manual_seed(15)
    z = torch.nn.functional.normalize(torch.randn(2 * B, D, generator=gen), dim=1)
    lab = torch.cat([torch.arange(B), torch.arange(B)])
    loss = contrastive_loss_triton(z, z, lab, lab, temperature=tau, self_offset=0)
    sim = (z @ z.t()) / tau
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(B) + B, torch.arange(B)])
    ref = torch.nn.functional.cross_entropy(sim, target)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_promote_and_return_grads_in_input_dtypes():
    gen = torch.Generator().manual_seed(16)
    q = torch.randn(17, 24, generator=gen).requires_grad_(True)
    k = torch.randn(29, 24, generator=gen).to(torch.bfloat16).requires_grad_(True)
    ql, kl = torch.randint(0, 4, (17,), generator=gen), torch.randint(0, 4, (29,), generator=gen)
    loss = contrastive_loss(q, k, ql, kl, temperature=0.3)
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert loss.dtype == torch.float32 and dq.dtype == torch.float32 and dk.dtype == torch.bfloat16
    ref = contrastive_loss_reference(q.double(), k.double(), ql, kl, temperature=0.3)
    assert abs(loss.item() - ref.item()) < 1e-4


def test_int32_labels_and_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(17)
    base = torch.randn(24, 40, generator=gen)
    q = base[:, ::2]  # non-contiguous [24, 20]
    k = torch.randn(20, 31, generator=gen).t()  # non-contiguous [31, 20]
    ql = torch.randint(0, 5, (24,), generator=gen, dtype=torch.int32)
    kl = torch.randint(0, 5, (31,), generator=gen, dtype=torch.int32)
    got = contrastive_loss_triton(q, k, ql, kl, temperature=0.5, self_offset=3, reduction="none")
    ref = contrastive_loss_reference(q.double(), k.double(), ql, kl, temperature=0.5, self_offset=3,
                                     reduction="none")
    assert_close(got, ref, TOL[torch.float32]["loss"], "loss")


def test_dispatch_cpu_without_interpreter_uses_reference(monkeypatch):
    case = make_case("stablerep", 37, 37, 19, torch.float32, seed=18)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not C.triton_available(torch.device("cpu"))
    called = []
    monkeypatch.setattr(C._ContrastiveRows, "apply", lambda *a: called.append(1))
    loss_ref, grads_ref = run(contrastive_loss, case, 0.1, "mean")
    assert not called
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert C.triton_available(torch.device("cpu"))
    loss_tri, grads_tri = run(contrastive_loss, case, 0.1, "mean")
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads_tri[0], grads_ref[0], rtol=1e-4, atol=1e-6)


def test_float64_runs_reference():
    case = make_case("mocov2", 10, 30, 8, torch.float64, seed=19)
    loss = contrastive_loss(case["q"], case["k"], case["q_labels"], case["k_labels"], temperature=0.2)
    assert loss.dtype == torch.float64


# ------------------------------------------------------------------------------------ errors
def _args(**over):
    q = torch.randn(6, 4)
    k = torch.randn(9, 4)
    a = dict(q=q, k=k, q_labels=torch.zeros(6, dtype=torch.long), k_labels=torch.zeros(9, dtype=torch.long),
             temperature=0.1, weights=None, self_offset=None, reduction="mean")
    a.update(over)
    return a


@pytest.mark.parametrize("over,needle", [
    (dict(q=torch.randn(6)), "q"),
    (dict(k=torch.randn(9, 5)), "D mismatch"),
    (dict(q=torch.randint(0, 3, (6, 4))), "q must be float"),
    (dict(q_labels=torch.zeros(5, dtype=torch.long)), "q_labels"),
    (dict(k_labels=torch.zeros(9)), "k_labels"),
    (dict(q_labels=torch.zeros(6, 1, dtype=torch.long)), "q_labels"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="0.1"), "temperature"),
    (dict(self_offset=-1), "self_offset"),
    (dict(self_offset=4), "self_offset"),
    (dict(self_offset=1.5), "self_offset"),
    (dict(weights=torch.ones(5)), "weights"),
    (dict(reduction="sum"), "reduction"),
    (dict(q=torch.randn(0, 4), q_labels=torch.zeros(0, dtype=torch.long)), "q"),
])
@pytest.mark.parametrize("fn", [contrastive_loss, contrastive_loss_reference])
def test_bad_input_raises_value_error_naming_argument(fn, over, needle):
    a = _args(**over)
    with pytest.raises(ValueError, match=needle):
        fn(a.pop("q"), a.pop("k"), a.pop("q_labels"), a.pop("k_labels"), **a)


def test_self_offset_upper_edge_is_valid():
    a = _args(self_offset=3)  # 3 + 6 == 9 == N
    contrastive_loss(a.pop("q"), a.pop("k"), a.pop("q_labels"), a.pop("k_labels"), **a)


def test_gpu_tiling_plan_and_autotune_prune():
    """The GPU-only tiling logic (exercised here without a GPU): D plans, config pruning, buckets."""
    assert C._d_plan(256, False, torch.bfloat16) == {"BLOCK_D": 256, "BLOCK_DO": 256, "SINGLE_D": True}
    assert C._d_plan(256, False, torch.float32) == {"BLOCK_D": 64, "BLOCK_DO": 128, "SINGLE_D": False}
    assert C._d_plan(1000, False, torch.float16) == {"BLOCK_D": 64, "BLOCK_DO": 256, "SINGLE_D": False}
    assert C._d_plan(19, False, torch.float32)["BLOCK_D"] == 32
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
        assert C._dot_flags(torch.float32, False) == {"PREC": "tf32x3", "UPCAST": False}
        mp.setattr(torch, "get_float32_matmul_precision", lambda: "high")
        assert C._dot_flags(torch.float32, False)["PREC"] == "tf32"
    assert C._dot_flags(torch.bfloat16, True) == {"PREC": "ieee", "UPCAST": True}
    for kind, tiles in (("fwd", C._FWD_TILES), ("dq", C._DQ_TILES), ("dk", C._DK_TILES)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for D in (16, 64, 128, 256, 1024):
                plan = C._d_plan(D, False, dtype)
                kept = C._make_prune(kind)(C._configs(tiles), {"Q": torch.empty(1, dtype=dtype)},
                                           **plan, **C._dot_flags(dtype, False))
                assert kept, (kind, dtype, D)
                if dtype == torch.float32:
                    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept)
    buckets = [C._size_bucket(n, n) for n in (256, 4096, 16384, 65536, 1 << 20)]
    assert buckets == sorted(set(buckets))


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pattern,M,N,D", [("ntxent", 8192, 8192, 128), ("mocov2", 1000, 9000, 256),
                                           ("offset", 3001, 8192, 64), ("random", 777, 1531, 1000)])
def test_gpu_matches_reference(monkeypatch, dtype, pattern, M, N, D):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_case(pattern, M, N, D, dtype, seed=21)
    for key in ("q", "k", "q_labels", "k_labels", "weights"):
        if case[key] is not None:
            case[key] = case[key].cuda()
    loss, grads = run(contrastive_loss, case, 0.1, "none")
    ref_loss, ref_grads = run(contrastive_loss_reference, case, 0.1, "none", dtype=torch.float64)
    tol = TOL_GPU[dtype]
    assert_close(loss, ref_loss, tol["loss"], "loss")
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, rg, tol["grad"], "grad")


@pytest.mark.gpu
@requires_gpu
def test_gpu_poisoned_outputs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(C, "POISON_OUTPUTS", True)
    case = make_case("stablerep", 1001, 1001, 200, torch.bfloat16, seed=22)
    for key in ("q", "k", "q_labels", "k_labels"):
        case[key] = case[key].cuda()
    case["k"] = case["q"]
    loss, grads = run(contrastive_loss, case, 0.1, "none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
