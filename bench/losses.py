"""Benchmark of the fused contrastive loss vs the materialising torch reference.

Measures forward and forward+backward time (median over repeats, the repeats kept as
``fwd_times_ms`` / ``fwd_bwd_times_ms``; CUDA events on a GPU, ``time.perf_counter`` on the CPU) and the peak memory allocated beyond the inputs
(``torch.cuda.max_memory_allocated`` minus what was allocated before the step; it includes the
gradient tensors). Throughput is compared with the bf16 matmul rate measured on the same device by
this script (a large bf16 matmul).

Two sets of problems, each timed for the kernel (:func:`genssl.kernels.contrastive_loss`) and the
PyTorch eager reference (:func:`genssl.kernels.contrastive_loss_reference`) on the same inputs:

* ``results``, the size grid: NT-Xent labels (pairs), ``q`` and ``k`` separate [M, D] leaves,
  ``self_offset=0``, M = N; ``8*M*N*D`` FLOPs per forward+backward (S in the forward, S again, dq and
  dk in the backward).
* ``methods``, the shapes of the methods that call the loss (docs/METHODS.md §5; label patterns as
  ``genssl.models.contrastive``), rows in the same schema plus ``problem``, ``method`` and ``shape``:

  - SimCLR NT-Xent (Chen et al., 2020, https://arxiv.org/abs/2002.05709): ``z = [z1; z2]`` [2B, 128]
    is both ``q`` and ``k`` (one leaf), labels ``[0..B-1, 0..B-1]``, self excluded (``self_offset=0``),
    tau 0.1; B = 256, 1024, 4096 (the paper's batch sweep); ``8*M*N*D`` FLOPs, M = N = 2B.
  - MoCo v2 (Chen et al., 2020, https://arxiv.org/abs/2003.04297): B = 256 queries [B, 128] against
    ``[keys; queue]`` [B + 65,536, 128], queue labels -1 (negatives only), tau 0.2; keys and queue
    carry no gradient (momentum encoder), so ``6*M*N*D`` FLOPs (no dk).
  - MoCo v3 (Chen et al., 2021, https://arxiv.org/abs/2104.02057): one rank's B = 512 queries
    [B, 256] against the all-gathered keys of W = 8 ranks [W*B, 256] (simulated in one process: the
    rank's positives at columns ``rank*B + i``), tau 0.2, keys without gradient: ``6*M*N*D`` FLOPs.

Usage::

    python -m genssl.bench.losses                 # default grid: M=N in {4096,16384,65536}, D in {128,256},
                                                  # bf16 and fp32 (needs a GPU)
    python -m genssl.bench.losses --quick         # tiny shapes, runs on the CPU (Triton interpreter when
                                                  # TRITON_INTERPRET=1, else the reference) to prove the script
    python -m genssl.bench.losses --methods mocov2 # the grid and one method's shapes (--methods alone: none)

Writes ``bench/results/<YYYY-MM-DD>-<device>-losses.json`` (``...-losses-quick.json`` with --quick)
and a PNG plot beside it. A reference run that does not fit in memory is recorded as "OOM".
"""

from __future__ import annotations

import argparse
import dataclasses
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

from genssl.engine.atomic import write_text_atomic
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


def _unit_rows(g: torch.Generator, n: int, D: int, dtype, device) -> torch.Tensor:
    """[n, D] random unit rows (the losses L2-normalise their features first)."""
    return torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1).to(device=device, dtype=dtype)


def _problem(M: int, D: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = _unit_rows(g, M, D, dtype, device)
    k = _unit_rows(g, M, D, dtype, device)
    half = M // 2
    labels = torch.cat([torch.arange(half), torch.arange(M - half)]).to(device)
    return q.requires_grad_(True), k.requires_grad_(True), labels


def bench_one(fn, M: int, D: int, dtype, device, temperature: float, repeats: int, warmup: int) -> dict:
    """The grid problem: forward and forward+backward medians (ms), peak extra memory (bytes), loss value."""

    def inputs():
        q, k, labels = _problem(M, D, dtype, device)
        return q, k, labels, labels, 0, (q, k)

    return _bench_call(fn, inputs, temperature, device, repeats, warmup)


def _bench_call(fn, inputs, temperature: float, device, repeats: int, warmup: int) -> dict:
    """Times ``fn(q, k, q_labels, k_labels)`` on ``inputs() -> (q, k, q_labels, k_labels, self_offset,
    leaves)``; the backward is taken w.r.t. ``leaves`` (what the method trains). Built here, so that the
    inputs die with this frame before an OOM's cache release."""
    q, k, q_labels, k_labels, self_offset, leaves = inputs()
    cuda = device.type == "cuda"

    def fwd():
        with torch.no_grad():
            return fn(q, k, q_labels, k_labels, temperature=temperature, self_offset=self_offset)

    def fwd_bwd():
        loss = fn(q, k, q_labels, k_labels, temperature=temperature, self_offset=self_offset)
        torch.autograd.grad(loss, leaves)
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
        out["fwd_times_ms"] = timer(fwd, repeats, warmup)
        out["fwd_bwd_times_ms"] = timer(fwd_bwd, repeats, warmup)
        out["fwd_ms"] = statistics.median(out["fwd_times_ms"])
        out["fwd_bwd_ms"] = statistics.median(out["fwd_bwd_times_ms"])
    except BaseException as err:  # noqa: BLE001 - OOM of the reference is a result, not a crash
        if not _is_oom(err):
            raise
        out = {"status": "OOM", "error": str(err).splitlines()[0][:200]}
    finally:
        del q, k, leaves
        gc.collect()  # drop the frames of an OOM traceback before releasing the cache
        if cuda:
            torch.cuda.empty_cache()
    out.setdefault("status", "ok")
    return out


# ------------------------------------------------------------------------------------------------
# the methods' shapes (label patterns of genssl.models.contrastive)


@dataclasses.dataclass(frozen=True)
class MethodProblem:
    """One method's loss call: ``M`` rows vs ``N`` columns of width ``D``.

    ``shared``: the rows are the columns (one leaf, SimCLR), else only the rows get a gradient (the
    columns come from a momentum encoder or a queue). Counted FLOPs per forward+backward:
    ``8*M*N*D`` shared (S, S again, dq and dk), ``6*M*N*D`` otherwise (no dk).
    """

    method: str
    shape: dict  # the method's own sizes: B, and queue K or ranks W
    M: int
    N: int
    D: int
    temperature: float
    shared: bool

    @property
    def name(self) -> str:
        return f"{self.method} " + " ".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def flops(self) -> float:
        return (8.0 if self.shared else 6.0) * self.M * self.N * self.D

    def inputs(self, dtype, device, seed: int = 0):
        """``(q, k, q_labels, k_labels, self_offset, leaves)`` of the method's call."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        B = self.shape["B"]
        if self.method == "simclr":  # z = [z1; z2] is q and k; the two views of sample i share label i
            z = _unit_rows(g, self.M, self.D, dtype, device).requires_grad_(True)
            labels = torch.arange(B).repeat(2).to(device)
            return z, z, labels, labels, 0, (z,)
        q = _unit_rows(g, self.M, self.D, dtype, device).requires_grad_(True)
        k = _unit_rows(g, self.N, self.D, dtype, device)
        if self.method == "mocov2":  # columns [keys; queue]: key i is row i's positive, the queue never matches
            q_labels = torch.arange(B)
            k_labels = torch.cat([torch.arange(B), torch.full((self.N - B,), -1, dtype=torch.long)])
        else:  # mocov3: this rank's rows vs every rank's keys; positives at rank*B + i
            rank = self.shape["W"] - 1
            q_labels = torch.arange(B) + rank * B
            k_labels = torch.arange(self.N)
        return q, k, q_labels.to(device), k_labels.to(device), None, (q,)


def simclr_problem(B: int, D: int = 128) -> MethodProblem:
    return MethodProblem("simclr", {"B": B}, 2 * B, 2 * B, D, 0.1, shared=True)


def mocov2_problem(B: int = 256, K: int = 65536, D: int = 128) -> MethodProblem:
    return MethodProblem("mocov2", {"B": B, "K": K}, B, B + K, D, 0.2, shared=False)


def mocov3_problem(B: int = 512, W: int = 8, D: int = 256) -> MethodProblem:
    return MethodProblem("mocov3", {"B": B, "W": W}, B, W * B, D, 0.2, shared=False)


#: The papers' sizes (docs/METHODS.md §5) and tiny versions for --quick (CPU, Triton interpreter).
METHOD_PROBLEMS = {
    "simclr": [simclr_problem(256), simclr_problem(1024), simclr_problem(4096)],
    "mocov2": [mocov2_problem()],
    "mocov3": [mocov3_problem()],
}
QUICK_METHOD_PROBLEMS = {
    "simclr": [simclr_problem(24, D=32)],
    "mocov2": [mocov2_problem(B=16, K=80, D=32)],
    "mocov3": [mocov3_problem(B=16, W=4, D=64)],
}


def _compare(rec: dict, flops: float, mm_tflops: float) -> dict:
    """Adds the derived columns (TFLOP/s, fraction of the bf16 matmul, speed-up, loss difference)."""
    kr, rr = rec["kernel"], rec["reference"]
    if kr["status"] == "ok":
        kr["tflops"] = flops / (kr["fwd_bwd_ms"] * 1e-3) / 1e12
        kr["frac_of_bf16_matmul"] = kr["tflops"] / mm_tflops
    if rr["status"] == "ok":
        rr["tflops"] = flops / (rr["fwd_bwd_ms"] * 1e-3) / 1e12
    if kr["status"] == "ok" and rr["status"] == "ok":
        rec["speedup_fwd_bwd"] = rr["fwd_bwd_ms"] / kr["fwd_bwd_ms"]
        rec["loss_abs_diff"] = abs(kr["loss"] - rr["loss"])
    return rec


def bench_method(problem: MethodProblem, dname: str, device, args, mm_tflops: float) -> dict:
    """One method problem in one dtype, kernel and reference: a row of ``report["methods"]``."""
    dtype = DTYPES[dname]
    rec = {"problem": problem.name, "method": problem.method, "shape": dict(problem.shape), "M": problem.M,
           "N": problem.N, "D": problem.D, "dtype": dname, "temperature": problem.temperature,
           "grad": "q = k" if problem.shared else "q only",
           "flops_per_step": "8*M*N*D" if problem.shared else "6*M*N*D"}
    rec["kernel"] = _bench_call(contrastive_loss, lambda: problem.inputs(dtype, device), problem.temperature,
                                device, args.repeats, args.warmup)
    if args.no_reference:
        rec["reference"] = {"status": "skipped"}
    else:
        rec["reference"] = _bench_call(contrastive_loss_reference, lambda: problem.inputs(dtype, device),
                                       problem.temperature, device, args.repeats, args.warmup)
    return _compare(rec, problem.flops, mm_tflops)


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
                rows.append(_compare(rec, 8.0 * M * M * D, mm_tflops))
                print(_fmt(rec), flush=True)
    problems = QUICK_METHOD_PROBLEMS if args.quick else METHOD_PROBLEMS
    methods = []
    for dname in args.dtypes:
        for method in args.methods:
            for problem in problems[method]:
                methods.append(bench_method(problem, dname, device, args, mm_tflops))
                print(_fmt(methods[-1]), flush=True)
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
        "methods": methods,
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
    where = f"{rec['problem']} (M={rec['M']}, N={rec['N']}, D={rec['D']})" if "problem" in rec else \
        f"M=N={rec['M']:>6} D={rec['D']:>4}"
    s = f"{where} {rec['dtype']:>4} | kernel: {one(rec['kernel'])} | reference: {one(rec['reference'])}"
    if "speedup_fwd_bwd" in rec:
        s += f" | speed-up {rec['speedup_fwd_bwd']:.2f}x"
    return s


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report.get("methods") or []
    fig, axes = plt.subplots(1, 3 if methods else 2, figsize=(18 if methods else 12, 4.5))
    ax_t, ax_f = axes[0], axes[1]
    if methods:
        _plot_methods(axes[2], methods)
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


def _plot_methods(ax, rows: list[dict]) -> None:
    """Forward+backward time of each method problem and dtype: kernel and reference bars side by side."""
    labels = [f"{r['problem']}\n{r['dtype']}" for r in rows]
    xs = range(len(rows))
    for shift, side, hatch in ((-0.2, "kernel", ""), (0.2, "reference", "//")):
        ax.bar([x + shift for x in xs], [r[side].get("fwd_bwd_ms", math.nan) for r in rows], width=0.4,
               hatch=hatch, alpha=0.8, label=side)
    for x, r in zip(xs, rows):
        if "speedup_fwd_bwd" in r:
            top = max(r["kernel"]["fwd_bwd_ms"], r["reference"]["fwd_bwd_ms"])
            ax.annotate(f"{r['speedup_fwd_bwd']:.2g}x", (x, top), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set(yscale="log", ylabel="forward+backward (ms, median)", title="the methods' shapes (speed-up over bars)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", which="both", alpha=0.3)


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
    p.add_argument("--methods", nargs="*", choices=list(METHOD_PROBLEMS), default=list(METHOD_PROBLEMS),
                   help="the methods whose loss shapes to run after the grid (default: all; --methods alone: none)")
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
    write_text_atomic(path, json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    if not args.no_plot:
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return path


if __name__ == "__main__":
    main()
