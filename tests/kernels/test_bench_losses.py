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
    assert {r["dtype"] for r in report["results"]} == {"fp32", "bf16"}
    for r in report["results"]:
        assert r["kernel"]["status"] == "ok" and r["reference"]["status"] == "ok"
        assert r["kernel"]["fwd_bwd_ms"] > 0 and r["speedup_fwd_bwd"] > 0
        assert r["loss_abs_diff"] < (1e-4 if r["dtype"] == "fp32" else 5e-2)
    assert report["bf16_matmul"]["tflops"] > 0


def test_oom_detection():
    import torch

    assert losses._is_oom(RuntimeError("CUDA out of memory. Tried to allocate 16.00 GiB"))
    assert losses._is_oom(torch.cuda.OutOfMemoryError("x"))
    assert not losses._is_oom(RuntimeError("shape mismatch"))
