"""Benchmark of the fused contrastive loss vs the materialising torch reference.

Measures forward and forward+backward time (median over repeats; CUDA events on a GPU,
``time.perf_counter`` on the CPU) and the peak memory allocated beyond the inputs
(``torch.cuda.max_memory_allocated`` minus what was allocated before the step; it includes the two
gradient tensors). Problem: NT-Xent labels (pairs), ``q`` and ``k`` separate [M, D] leaves,
``self_offset=0``, M = N. Throughput counts ``8*M*N*D`` FLOPs per forward+backward (S in the
forward, S again, dq and dk in the backward) and is compared with the bf16 matmul rate measured on
the same device by this script (a large bf16 matmul).

Usage::

    python -m genssl.bench.losses                 # default grid: M=N in {4096,16384,65536}, D in {128,256},
                                                  # bf16 and fp32 (needs a GPU)
    python -m genssl.bench.losses --quick         # tiny shapes, runs on the CPU (Triton interpreter when
                                                  # TRITON_INTERPRET=1, else the reference) to prove the script

Writes ``bench/results/<YYYY-MM-DD>-<device>-losses.json`` (``...-losses-quick.json`` with --quick)
and a PNG plot beside it. A reference run that does not fit in memory is recorded as "OOM".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from genssl.kernels import contrastive_loss, contrastive_loss_reference
from genssl.kernels.contrastive import interpret_mode, interpreter_ready, triton_available

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, (RuntimeError, MemoryError)) and "out of memory" in str(err).lower()


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times


def measure_matmul_tflops(device: torch.device, n: int, repeats: int = 10) -> float:
    """bf16 [n x n] @ [n x n] throughput on ``device`` (TFLOP/s, median)."""
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    ms = statistics.median(_Timer(device)(lambda: a @ b, repeats, warmup=3))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def _problem(M: int, D: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1).to(device=device, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1).to(device=device, dtype=dtype)
    half = M // 2
    labels = torch.cat([torch.arange(half), torch.arange(M - half)]).to(device)
    return q.requires_grad_(True), k.requires_grad_(True), labels


def bench_one(fn, M: int, D: int, dtype, device, temperature: float, repeats: int, warmup: int) -> dict:
    """Forward and forward+backward medians (ms), peak extra memory (bytes), loss value."""
    q, k, labels = _problem(M, D, dtype, device)
    cuda = device.type == "cuda"

    def fwd():
        with torch.no_grad():
            return fn(q, k, labels, labels, temperature=temperature, self_offset=0)

    def fwd_bwd():
        loss = fn(q, k, labels, labels, temperature=temperature, self_offset=0)
        torch.autograd.grad(loss, (q, k))
        return loss

    timer = _Timer(device)
    out = {}
    try:
        fwd_bwd()  # first call: compilation / autotuning (not timed)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        loss = fwd_bwd()
        if cuda:
            torch.cuda.synchronize(device)
            out["peak_extra_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
        else:
            out["peak_extra_bytes"] = None
        out["loss"] = float(loss.detach())
        del loss
        out["fwd_ms"] = statistics.median(timer(fwd, repeats, warmup))
        out["fwd_bwd_ms"] = statistics.median(timer(fwd_bwd, repeats, warmup))
    except BaseException as err:  # noqa: BLE001 - OOM of the reference is a result, not a crash
        if not _is_oom(err):
            raise
        out = {"status": "OOM", "error": str(err).splitlines()[0][:200]}
    finally:
        del q, k
        gc.collect()  # drop the frames of an OOM traceback before releasing the cache
        if cuda:
            torch.cuda.empty_cache()
    out.setdefault("status", "ok")
    return out


def kernel_backend(device: torch.device) -> str:
    if triton_available(device):
        return "triton-interpreter" if (interpret_mode() and interpreter_ready()) else "triton"
    return "reference (no triton path on this device)"


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 256)
    mm_tflops = measure_matmul_tflops(device, matmul_n)
    print(f"device {_device_name(device)}: bf16 matmul {matmul_n}^3 = {mm_tflops:.2f} TFLOP/s; kernel backend "
          f"{kernel_backend(device)}", flush=True)
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for D in args.dims:
            for M in args.sizes:
                rec = {"M": M, "N": M, "D": D, "dtype": dname}
                rec["kernel"] = bench_one(contrastive_loss, M, D, dtype, device, args.temperature, args.repeats,
                                          args.warmup)
                if args.no_reference:
                    rec["reference"] = {"status": "skipped"}
                else:
                    rec["reference"] = bench_one(contrastive_loss_reference, M, D, dtype, device, args.temperature,
                                                 args.repeats, args.warmup)
                flops = 8.0 * M * M * D
                kr, rr = rec["kernel"], rec["reference"]
                if kr["status"] == "ok":
                    kr["tflops"] = flops / (kr["fwd_bwd_ms"] * 1e-3) / 1e12
                    kr["frac_of_bf16_matmul"] = kr["tflops"] / mm_tflops
                if rr["status"] == "ok":
                    rr["tflops"] = flops / (rr["fwd_bwd_ms"] * 1e-3) / 1e12
                if kr["status"] == "ok" and rr["status"] == "ok":
                    rec["speedup_fwd_bwd"] = rr["fwd_bwd_ms"] / kr["fwd_bwd_ms"]
                    rec["loss_abs_diff"] = abs(kr["loss"] - rr["loss"])
                rows.append(rec)
                print(_fmt(rec), flush=True)
    return {
        "benchmark": "contrastive_loss (NT-Xent labels, q,k separate, self_offset=0, M=N)",
        "date": _dt.date.today().isoformat(),
        "device": _device_name(device),
        "device_type": device.type,
        "kernel_backend": kernel_backend(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": sys.version.split()[0],
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "flops_per_step": "8*M*N*D",
        "bf16_matmul": {"n": matmul_n, "tflops": mm_tflops},
        "results": rows,
    }


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:  # pragma: no cover
        return None


def _fmt(rec: dict) -> str:
    def one(r):
        if r["status"] != "ok":
            return r["status"]
        mem = "" if r.get("peak_extra_bytes") is None else f", +{r['peak_extra_bytes'] / 2**20:.0f} MiB"
        tf = f", {r['tflops']:.3g} TFLOP/s" if "tflops" in r else ""
        return f"fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms{tf}{mem}"
    s = f"M=N={rec['M']:>6} D={rec['D']:>4} {rec['dtype']:>4} | kernel: {one(rec['kernel'])} | reference: " \
        f"{one(rec['reference'])}"
    if "speedup_fwd_bwd" in rec:
        s += f" | speed-up {rec['speedup_fwd_bwd']:.2f}x"
    return s


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = sorted({(r["dtype"], r["D"]) for r in report["results"]})
    for i, (dname, D) in enumerate(groups):
        rs = sorted((r for r in report["results"] if r["dtype"] == dname and r["D"] == D), key=lambda r: r["M"])
        color = f"C{i}"
        xs = [r["M"] for r in rs]
        kt = [r["kernel"].get("fwd_bwd_ms", math.nan) for r in rs]
        rt = [r["reference"].get("fwd_bwd_ms", math.nan) for r in rs]
        ax_t.plot(xs, kt, "-o", color=color, label=f"kernel {dname} D={D}")
        ax_t.plot(xs, rt, "--s", color=color, alpha=0.7, label=f"reference {dname} D={D}")
        oom = [r["M"] for r in rs if r["reference"]["status"] == "OOM"]
        if oom:
            top = max((v for v in kt + rt if not math.isnan(v)), default=1.0)
            ax_t.plot(oom, [top * 1.5] * len(oom), "x", color=color, markersize=10)
        ax_f.plot(xs, [r["kernel"].get("frac_of_bf16_matmul", math.nan) * 100 for r in rs], "-o", color=color,
                  label=f"kernel {dname} D={D}")
    ax_t.set_xscale("log", base=2)
    ax_f.set_xscale("log", base=2)
    ax_t.set(yscale="log", xlabel="M = N", ylabel="forward+backward (ms, median)",
             title=f"{report['device']} (x = reference OOM)")
    ax_f.set(xlabel="M = N", ylabel="% of measured bf16 matmul TFLOP/s (8MND)",
             title=f"bf16 matmul {report['bf16_matmul']['tflops']:.1f} TFLOP/s")
    ax_t.legend(fontsize=7)
    ax_f.legend(fontsize=7)
    ax_t.grid(True, which="both", alpha=0.3)
    ax_f.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes that run on the CPU (proves the script)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="M = N values")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="feature dimensions D")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the bf16 matmul used as the peak")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    if a.quick:
        a.sizes = a.sizes or [64, 96]
        a.dims = a.dims or [32]
        a.dtypes = a.dtypes or ["fp32", "bf16"]
        a.repeats = a.repeats or 2
        a.warmup = 1 if a.warmup is None else a.warmup
    else:
        a.sizes = a.sizes or [4096, 16384, 65536]
        a.dims = a.dims or [128, 256]
        a.dtypes = a.dtypes or ["bf16", "fp32"]
        a.repeats = a.repeats or 10
        a.warmup = 3 if a.warmup is None else a.warmup
    return a


def main(argv=None) -> Path:
    args = parse_args(argv)
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}-{_slug(report['device'])}-losses" + ("-quick" if args.quick else "")
    path = args.out_dir / f"{stem}.json"
    report["config"]["out_dir"] = str(args.out_dir)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    if not args.no_plot:
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return path


if __name__ == "__main__":
    main()
