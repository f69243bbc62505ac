"""bench/losses.py --quick runs on the CPU and writes its JSON and plot."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from genssl.bench import losses  # noqa: E402


@pytest.mark.timeout(300)
def test_bench_quick_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    path = losses.main(["--quick", "--sizes", "40", "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path)])
    report = json.loads(path.read_text())
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


def test_oom_detection():
    import torch

    assert losses._is_oom(RuntimeError("CUDA out of memory. Tried to allocate 16.00 GiB"))
    assert losses._is_oom(torch.cuda.OutOfMemoryError("x"))
    assert not losses._is_oom(RuntimeError("shape mismatch"))
