"""bench/losses.py --quick runs on the CPU and writes its JSON and plot; its method problems are the
methods' loss calls (SimCLR, MoCo v2, MoCo v3 label patterns checked against textbook cross-entropy)."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from genssl.bench import losses  # noqa: E402
from genssl.kernels import contrastive_loss_reference  # noqa: E402


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        path = losses.main(["--quick", "--sizes", "40", "--repeats", "1", "--warmup", "0", "--out-dir", str(out)])
    return path, json.loads(path.read_text())


@pytest.mark.timeout(300)
def test_bench_quick_writes_json_and_plot(quick_report):
    path, report = quick_report
    assert path.name.endswith("-losses-quick.json") and path.with_suffix(".png").stat().st_size > 0
    assert report["kernel_backend"] == "triton-interpreter"
    assert [(r["dtype"], r["M"], r["D"]) for r in report["results"]] == [("fp32", 40, 32), ("bf16", 40, 32)]
    assert report["bf16_matmul"]["n"] == 256  # the CPU matmul size
    for r in report["results"]:
        kernel, reference = r["kernel"], r["reference"]
        assert kernel["status"] == "ok" and reference["status"] == "ok"
        # the derived columns are what their names say, from the measured times
        assert r["speedup_fwd_bwd"] == pytest.approx(reference["fwd_bwd_ms"] / kernel["fwd_bwd_ms"])
        assert kernel["tflops"] == pytest.approx(8 * 40 * 40 * 32 / (kernel["fwd_bwd_ms"] * 1e-3) / 1e12)
        assert kernel["frac_of_bf16_matmul"] == pytest.approx(kernel["tflops"] / report["bf16_matmul"]["tflops"])
        assert r["loss_abs_diff"] < (1e-4 if r["dtype"] == "fp32" else 5e-2)


@pytest.mark.timeout(300)
def test_bench_quick_runs_every_method_problem(quick_report):
    _, report = quick_report
    rows = report["methods"]
    expected = [(d, p.name) for d in ("fp32", "bf16") for m in losses.QUICK_METHOD_PROBLEMS.values() for p in m]
    assert [(r["dtype"], r["problem"]) for r in rows] == expected
    assert {r["method"] for r in rows} == {"simclr", "mocov2", "mocov3"}
    for r in rows:
        kernel, reference = r["kernel"], r["reference"]
        assert kernel["status"] == "ok" and reference["status"] == "ok"
        factor = 8 if r["method"] == "simclr" else 6  # MoCo: no gradient to the keys / queue, so no dk
        assert r["flops_per_step"] == f"{factor}*M*N*D"
        assert kernel["tflops"] == pytest.approx(factor * r["M"] * r["N"] * r["D"] / (kernel["fwd_bwd_ms"] * 1e-3) / 1e12)
        assert r["speedup_fwd_bwd"] == pytest.approx(reference["fwd_bwd_ms"] / kernel["fwd_bwd_ms"])
        assert r["loss_abs_diff"] < (1e-4 if r["dtype"] == "fp32" else 5e-2)
        assert kernel["loss"] > 0  # random features: about log(N), never the 0 of a row without positive


def test_method_problems_have_the_papers_shapes():
    shapes = {m: [(p.shape, p.M, p.N, p.D, p.temperature) for p in ps] for m, ps in losses.METHOD_PROBLEMS.items()}
    assert shapes == {
        "simclr": [({"B": b}, 2 * b, 2 * b, 128, 0.1) for b in (256, 1024, 4096)],
        "mocov2": [({"B": 256, "K": 65536}, 256, 256 + 65536, 128, 0.2)],
        "mocov3": [({"B": 512, "W": 8}, 512, 8 * 512, 256, 0.2)],
    }


def _textbook(problem, q, k):
    """The method's loss as a plain cross-entropy over its logits (independent of the label patterns)."""
    B, tau = problem.shape["B"], problem.temperature
    logits = q @ k.T / tau
    if problem.method == "simclr":  # [z1; z2] vs itself, self excluded, positive = the other view
        logits = logits.masked_fill(torch.eye(2 * B, dtype=torch.bool), float("-inf"))
        target = (torch.arange(2 * B) + B) % (2 * B)
    elif problem.method == "mocov2":  # [keys; queue], positive = key i
        target = torch.arange(B)
    else:  # mocov3, rank W-1 of W: positive = this rank's key i among all ranks' keys
        target = torch.arange(B) + (problem.shape["W"] - 1) * B
    return F.cross_entropy(logits, target)


@pytest.mark.parametrize("problem", [p for ps in losses.QUICK_METHOD_PROBLEMS.values() for p in ps],
                         ids=lambda p: p.name)
def test_method_problem_is_the_methods_loss(problem):
    q, k, q_labels, k_labels, self_offset, leaves = problem.inputs(torch.float64, torch.device("cpu"), seed=3)
    assert (q.shape, k.shape) == ((problem.M, problem.D), (problem.N, problem.D))
    assert (q is k) == problem.shared and all(t.requires_grad for t in leaves) and (problem.shared or not k.requires_grad)
    loss = contrastive_loss_reference(q, k, q_labels, k_labels, temperature=problem.temperature, self_offset=self_offset)
    want = _textbook(problem, q.detach(), k.detach())
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


def test_methods_flag_selects_problems():
    assert losses.parse_args(["--quick"]).methods == ["simclr", "mocov2", "mocov3"]
    assert losses.parse_args(["--quick", "--methods", "mocov3"]).methods == ["mocov3"]
    assert losses.parse_args(["--quick", "--methods"]).methods == []
    with pytest.raises(SystemExit):
        losses.parse_args(["--methods", "byol"])


def test_oom_detection():
    assert losses._is_oom(RuntimeError("CUDA out of memory. Tried to allocate 16.00 GiB"))
    assert losses._is_oom(torch.cuda.OutOfMemoryError("x"))
    assert not losses._is_oom(RuntimeError("shape mismatch"))
