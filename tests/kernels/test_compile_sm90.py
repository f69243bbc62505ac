"""The contrastive kernels compile for an H100 (sm_90a) with the GPU-path flags — no GPU needed:
Triton lowers to PTX and runs its bundled ptxas. Catches GPU-only compile errors in CPU CI."""

import os
import subprocess
import sys

import pytest
import torch

from genssl.kernels import contrastive as C

triton = pytest.importorskip("triton")

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _signature(kind, dtype):
    sig = {"Q": _PTR[dtype], "K": _PTR[dtype], "QL": "*i64", "KL": "*i64"}
    if kind == "fwd":
        sig.update(LOSS="*fp32", LSE2="*fp32", CNT="*fp32")
    else:
        sig.update(LSE2="*fp32", C="*fp32", CW="*fp32")
        sig["DQ" if kind == "dq" else "DK"] = _PTR[dtype]
    for name in ("M", "N", "D", "stride_q", "stride_k", "stride_dq", "stride_dk", "self_offset", "size_bucket"):
        sig[name] = "i32"
    sig["scale2"] = "fp32"
    return sig


def _compile(kind, dtype, D, has_self, cfg):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = {"fwd": C._fwd_jit, "dq": C._dq_jit, "dk": C._dk_jit}[kind]
    plan = C._d_plan(D, False, dtype)
    const = dict(HAS_SELF=has_self, BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"],
                 BLOCK_D=plan["BLOCK_D"], BLOCK_DO=plan["BLOCK_DO"], SINGLE_D=plan["SINGLE_D"],
                 **C._dot_flags(dtype, False))
    base = _signature(kind, dtype)
    sig = {a: ("constexpr" if a in const else base[a]) for a in fn.arg_names}
    constexprs = {(fn.arg_names.index(a),): const[a] for a in fn.arg_names if a in const}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _compile_first_config(kind, dtype, D, has_self):
    tiles = {"fwd": C._FWD_TILES, "dq": C._DQ_TILES, "dk": C._DK_TILES}[kind]
    plan = C._d_plan(D, False, dtype)
    kept = C._make_prune(kind)(C._configs(tiles), {"Q": torch.empty(1, dtype=dtype)}, **plan,
                               **C._dot_flags(dtype, False))
    compiled = _compile(kind, dtype, D, has_self, kept[0])
    assert compiled.asm.get("cubin"), "no cubin"
    assert compiled.metadata.shared <= 228 * 1024, f"shared memory {compiled.metadata.shared}"
    return compiled.metadata.shared


def _main(argv):
    """Subprocess entry: compile ``kind:dtype:D:self|noself`` specs; the interpreter must be off."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for spec in argv:
        kind, dt, D, selfness = spec.split(":")
        smem = _compile_first_config(kind, dtypes[dt], int(D), selfness == "self")
        print(spec, "ok, shared", smem, flush=True)


SPECS = ["fwd:bf16:256:self", "dq:bf16:256:self", "dk:bf16:256:self", "dq:fp16:1000:noself",
         "fwd:fp32:256:self", "dk:fp32:128:noself"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kernels_compile_for_sm90(tmp_path):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is not available")
    # A fresh process: compiling needs triton imported without TRITON_INTERPRET, and a fresh cache
    # makes it really compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    code = "import sys; from genssl.tests.kernels.test_compile_sm90 import _main; _main(sys.argv[1:])"
    res = subprocess.run([sys.executable, "-c", code, *SPECS], env=env, capture_output=True, text=True,
                         timeout=580)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert res.stdout.count(" ok, shared") == len(SPECS)
