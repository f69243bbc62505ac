"""Contrastive loss modules against textbook implementations (materialised logits + cross entropy),
single process and on 2 gloo ranks. The kernel runs in the Triton interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from genssl.models.contrastive import MoCoV2Loss, MoCoV3Loss, MultiPositiveLoss, NTXentLoss, qdc_weights  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    # The kernel runs in the Triton interpreter when triton was imported with TRITON_INTERPRET=1
    # (this module sets it before importing genssl); otherwise the torch reference runs. The
    # modules are checked against textbook implementations either way.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------- textbooks
def ntxent_textbook(z1, z2, tau, w=None):
    """SimCLR: cross entropy over the 2B x 2B similarity matrix with the diagonal removed."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    B = z1.shape[0]
    sim = z @ z.t() / tau
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(B) + B, torch.arange(B)])
    ce = F.cross_entropy(sim, target, reduction="none")
    if w is not None:
        ce = ce * torch.cat([w, w])
    return ce.mean()


def stablerep_textbook(f, labels, tau):
    """StableRep's compute_cross_entropy(p, logits) with p uniform over the positives (self masked)."""
    z = F.normalize(f, dim=1)
    n = z.shape[0]
    logits = z @ z.t() / tau
    self_mask = torch.eye(n, dtype=torch.bool)
    logits = logits.masked_fill(self_mask, -1e9)
    mask = (labels[:, None] == labels[None, :]) & ~self_mask
    p = mask.double() / mask.sum(1, keepdim=True).clamp(min=1)
    return -(p * F.log_softmax(logits, dim=1)).sum(1).mean()


def mocov2_textbook(q, k, queue, tau):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ torch.cat([k, queue]).t() / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def mocov3_textbook(q, k, tau, w=None):
    """MoCo v3 Alg. 1: ctr(q, k) = CrossEntropyLoss(q k^T / tau, arange) * 2 tau."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    ce = F.cross_entropy(q @ k.t() / tau, torch.arange(q.shape[0]), reduction="none")
    if w is not None:
        ce = ce * w
    return ce.mean() * 2 * tau


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).float().requires_grad_(True) for s in shapes]


# ---------------------------------------------------------------------------------- single process
def test_qdc_weights():
    s = torch.tensor([0.3, -1.0, 2.0, 0.0], requires_grad=True)
    w = qdc_weights(s)
    _close(w, 4 * torch.softmax(s.detach(), 0))
    assert not w.requires_grad and abs(w.sum().item() - 4) < 1e-5
    with pytest.raises(ValueError, match="scores"):
        qdc_weights(torch.zeros(2, 2))


@pytest.mark.parametrize("weighted", [False, True])
def test_ntxent_matches_textbook(weighted):
    z1, z2 = _leaves((17, 24), (17, 24), seed=1)
    w = qdc_weights(torch.randn(17)) if weighted else None
    loss = NTXentLoss(temperature=0.1)(z1, z2, weights=w)
    g = torch.autograd.grad(loss, (z1, z2))
    a1, a2 = (t.detach().double().requires_grad_(True) for t in (z1, z2))
    ref = ntxent_textbook(a1, a2, 0.1, None if w is None else w.double())
    rg = torch.autograd.grad(ref, (a1, a2))
    _close(loss, ref)
    for x, y in zip(g, rg):
        _close(x, y)


def test_multipositive_matches_textbook_ragged_groups():
    (f,) = _leaves((31, 20), seed=2)
    labels = torch.tensor([i // 3 for i in range(27)] + [100, 101, 9, 9])  # m=3, singletons, a pair
    labels = labels[torch.randperm(31, generator=torch.Generator().manual_seed(0))]
    loss = MultiPositiveLoss(temperature=0.1)(f, labels)
    (g,) = torch.autograd.grad(loss, f)
    a = f.detach().double().requires_grad_(True)
    ref = stablerep_textbook(a, labels, 0.1)
    (rg,) = torch.autograd.grad(ref, a)
    _close(loss, ref)
    _close(g, rg)


def test_multipositive_m2_is_ntxent():
    z1, z2 = _leaves((9, 16), (9, 16), seed=3)
    lab = torch.cat([torch.arange(9), torch.arange(9)])
    _close(MultiPositiveLoss(0.2)(torch.cat([z1, z2]), lab), NTXentLoss(0.2)(z1, z2))


def test_mocov2_matches_textbook_and_updates_queue():
    torch.manual_seed(0)
    moco = MoCoV2Loss(dim=16, queue_size=23, temperature=0.2)
    q, k = _leaves((10, 16), (10, 16), seed=4)
    queue0 = moco.queue.clone()
    loss = moco(q, k)
    (g,) = torch.autograd.grad(loss, q)
    a = q.detach().double().requires_grad_(True)
    ref = mocov2_textbook(a, k.detach().double(), queue0.double(), 0.2)
    (rg,) = torch.autograd.grad(ref, a)
    _close(loss, ref)
    _close(g, rg)
    kn = F.normalize(k.detach(), dim=1)
    _close(moco.queue[:10], kn)
    _close(moco.queue[10:], queue0[10:])
    assert int(moco.queue_ptr) == 10
    # wrap around: 10 + 10 + 10 > 23
    moco(q, k)
    moco(q, k * 2)
    assert int(moco.queue_ptr) == 30 % 23
    _close(moco.queue[20:23], F.normalize(k.detach() * 2, dim=1)[:3])
    _close(moco.queue[:7], F.normalize(k.detach() * 2, dim=1)[3:])
    # update_queue=False leaves it alone; weights scale rows
    before = moco.queue.clone()
    w = torch.rand(10)
    lw = moco(q, k, weights=w, update_queue=False)
    assert torch.equal(before, moco.queue)
    logits = F.normalize(q.detach(), dim=1) @ torch.cat([F.normalize(k.detach(), dim=1), before]).t() / 0.2
    _close(lw, (F.cross_entropy(logits, torch.arange(10), reduction="none") * w).mean())


def test_mocov3_matches_textbook_symmetric_and_weighted():
    q1, q2, k1, k2 = _leaves((12, 16), (12, 16), (12, 16), (12, 16), seed=5)
    w = qdc_weights(torch.randn(12))
    m = MoCoV3Loss(temperature=0.2)
    loss = m.symmetric(q1, q2, k1.detach(), k2.detach(), weights=w)
    g = torch.autograd.grad(loss, (q1, q2))
    a1, a2 = (t.detach().double().requires_grad_(True) for t in (q1, q2))
    wd = w.double()
    ref = mocov3_textbook(a1, k2.detach().double(), 0.2, wd) + mocov3_textbook(a2, k1.detach().double(), 0.2, wd)
    rg = torch.autograd.grad(ref, (a1, a2))
    _close(loss, ref)
    for x, y in zip(g, rg):
        _close(x, y)
    _close(m(q1, k2), mocov3_textbook(q1.detach().double(), k2.detach().double(), 0.2))


def test_bf16_features_run_and_return_float32():
    z1, z2 = (t.detach().to(torch.bfloat16).requires_grad_(True) for t in _leaves((8, 32), (8, 32), seed=6))
    loss = NTXentLoss(0.1)(z1, z2)
    d1, _ = torch.autograd.grad(loss, (z1, z2))
    assert loss.dtype == torch.float32 and d1.dtype == torch.bfloat16
    ref = ntxent_textbook(z1.detach().double(), z2.detach().double(), 0.1)
    assert abs(loss.item() - ref.item()) < 2e-2


def test_module_argument_errors():
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="z1 and z2"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="weights"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(4, 3), weights=torch.ones(3))
    with pytest.raises(ValueError, match="labels"):
        MultiPositiveLoss()(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="query and key"):
        MoCoV2Loss(dim=3, queue_size=8)(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="query and key"):
        MoCoV3Loss()(torch.randn(4, 3), torch.randn(5, 3))


# ---------------------------------------------------------------------------------- 2 gloo ranks
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_modules_on_two_gloo_ranks(tmp_path):
    """Each rank returns the mean over its rows; the ranks' average is the single-process loss and
    each rank's gradient is W x the single-process gradient of its rows (so DDP's average is exact)."""
    from genssl.tests.kernels.dist_workers import M_LOCAL, global_batch, spawn

    W = 2
    res = spawn("modules", tmp_path, W)
    b = global_batch(W)
    sl = lambda t, r: t[r * M_LOCAL:(r + 1) * M_LOCAL]  # noqa: E731
    mean = lambda key: sum(res[r][key] for r in range(W)) / W  # noqa: E731
    # NT-Xent with QDC weights
    z1, z2 = (b["views"][i].clone().requires_grad_(True) for i in range(2))
    w = qdc_weights(b["qdc"])
    loss = NTXentLoss(0.1)(z1, z2, weights=w)
    d1, d2 = torch.autograd.grad(loss, (z1, z2))
    _close(mean("ntx_loss"), loss)
    for r in range(W):
        _close(res[r]["ntx_d1"] / W, sl(d1, r))
        _close(res[r]["ntx_d2"] / W, sl(d2, r))
    # StableRep multi-positive with labels spanning ranks
    f = b["views"][0].clone().requires_grad_(True)
    loss = MultiPositiveLoss(0.1)(f, b["labels"])
    (df,) = torch.autograd.grad(loss, f)
    _close(mean("mp_loss"), loss)
    for r in range(W):
        _close(res[r]["mp_df"] / W, sl(df, r))
    # MoCo v3 symmetric: queries vs keys of all ranks
    q1, q2 = (b["views"][i].clone().requires_grad_(True) for i in range(2))
    loss = MoCoV3Loss(0.2).symmetric(q1, q2, b["mv_keys"][0], b["mv_keys"][1], weights=w)
    g1, g2 = torch.autograd.grad(loss, (q1, q2))
    _close(mean("v3_loss"), loss)
    for r in range(W):
        _close(res[r]["v3_d1"] / W, sl(g1, r))
        _close(res[r]["v3_d2"] / W, sl(g2, r))
    # MoCo v2: per-rank loss on local keys + queue; all ranks enqueue the gathered keys in rank order
    for r in range(W):
        q0 = res[r]["v2_queue0"]
        _close(res[r]["v2_loss"], mocov2_textbook(sl(b["views"][0], r), sl(b["mv_keys"][0], r), q0, 0.2))
        keys = F.normalize(b["mv_keys"][0], dim=1)
        _close(res[r]["v2_queue1"][:W * M_LOCAL], keys)
        assert torch.equal(res[r]["v2_queue1"], res[0]["v2_queue1"])
        assert int(res[r]["v2_ptr1"]) == W * M_LOCAL
