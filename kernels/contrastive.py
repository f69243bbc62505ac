"""Fused, streaming contrastive loss: one kernel for NT-Xent, multi-positive (StableRep), MoCo v2/v3.

Public entry point: :func:`contrastive_loss` (contract in docs/KERNELS.md and below). The O(M*N)
part is a single streaming log-sum-exp over column tiles (FlashAttention / Inf-CL style); the
positive term is accumulated in the same pass. Nothing of size M x N is ever written: the forward
saves two floats per row (log-sum-exp and positive count) and the backward recomputes the logit
tiles.

Kernels (all deterministic, no atomics):

* ``_fwd_kernel``  grid = row blocks. Streams column tiles of ``k``; per row keeps the online max /
  sum of ``exp2`` (fp32), the sum of positive logits and the positive count. Writes ``loss_i``,
  ``lse_i`` (base 2) and ``|P(i)|``.
* ``_dq_kernel``   grid = (row blocks, D-output chunks). Recomputes ``S`` tiles, forms
  ``dS = c_i p_ij - [j in P(i)] c_i/|P(i)|`` and accumulates ``dq = dS k``.
* ``_dk_kernel``   grid = (column blocks, D-output chunks). Same tiles transposed, ``dk = dS^T q``.

``c_i = g_i w_i / temperature`` (zero for rows without a positive) is formed in torch; ``g_i`` is
the incoming gradient of row ``i`` (``1/M`` for ``reduction="mean"``).

Feature dimension: ``D <= 256`` (``MAX_SINGLE_D``; 128 for fp32) uses one ``BLOCK_D = next_pow2(D)``
chunk, the query tile is loaded once per program and the column tile loaded for ``S`` is reused for the
gradient product. Larger ``D`` loops over ``BLOCK_D = 64`` contraction chunks and splits the
gradient output over a second grid axis of ``BLOCK_DO``-wide chunks (each chunk recomputes ``S``;
see docs/KERNELS.md for the cost). Any ``M``, ``N`` (masked edges).

Dispatch (decided per call): CUDA tensors run the compiled Triton kernels (autotuned on ``D``, dtype
and a size bucket); with ``TRITON_INTERPRET=1`` (set before triton was imported, and still set), CPU
(and CUDA) tensors run the same kernels in the Triton interpreter; CPU tensors otherwise run the
plain-torch reference, so CPU training works everywhere. float64 always runs the reference.
"""

from __future__ import annotations

import os

import torch

from .contrastive_reference import (
    check_contrastive_inputs,
    contrastive_loss_reference,
    contrastive_rows_reference,
    reduce_rows,
)

try:  # Triton is a hard dependency on GPU hosts, but keep CPU-only installs importable.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["contrastive_loss", "contrastive_loss_reference", "contrastive_loss_triton", "triton_available",
           "MAX_SINGLE_D"]

_LOG2E = 1.4426950408889634

#: Largest feature dimension handled with a single, register-resident D chunk (bf16/fp16; fp32
#: tiles are twice as large, so fp32 switches to the chunked path above MAX_SINGLE_D_FP32).
MAX_SINGLE_D = 256
MAX_SINGLE_D_FP32 = 128
#: Contraction chunk and gradient-output chunk (bf16/fp16, fp32) used above those.
LARGE_D_BLOCK_D = 64
LARGE_D_BLOCK_DO = 256
LARGE_D_BLOCK_DO_FP32 = 128
#: Fixed tiles under the interpreter (autotuning there would be very slow); tests may change them.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_DO_LARGE": 128}
#: Debug switch for tests: fill every output buffer with NaN before the kernels run, to prove
#: that every element is written.
POISON_OUTPUTS = False


if triton is not None:
    # The kernels are plain functions wrapped twice below: a JITFunction (GPU, autotuned) and an
    # InterpretedFunction (CPU under TRITON_INTERPRET=1). The choice is made per call, so the GPU
    # path does not depend on TRITON_INTERPRET at import time (the interpreter path does: see
    # interpreter_ready()).
    #
    # UPCAST (interpreter only): the Triton 3.x interpreter multiplies bf16 dot operands as raw
    # uint16 bits, so there bf16 tiles are converted to fp32 right after loading (and the gradient
    # tile is rounded to bf16 first). Products of bf16 values are exact in fp32, so this reproduces
    # a bf16 MMA with fp32 accumulation. On the GPU, UPCAST is False.

    try:
        from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
    except Exception:  # pragma: no cover - interpreter missing in this triton build
        _InterpretedFunction = None

    class _DeviceFunction(triton.JITFunction):
        """A device helper of the kernels, usable from both wrappings.

        Compiled kernels call it like any ``@triton.jit`` function (the compiler inlines it). An
        interpreted kernel is plain Python and calls the object itself: that runs the helper
        interpreted. (``@triton.jit`` would pick one of the two at import time, from
        TRITON_INTERPRET.)
        """

        def __init__(self, fn):
            super().__init__(fn)
            self._interpreted = None if _InterpretedFunction is None else _InterpretedFunction(fn)
            self._interp_body = None

        def __call__(self, *args, **kwargs):
            # Reached only from an interpreted kernel, which has already set triton.language up for
            # the interpreter (same module), so run the helper's rewritten body directly: calling the
            # InterpretedFunction would patch triton.language again on every call (interpreted
            # kernels ran ~1.6x slower that way).
            if self._interp_body is None:
                self._interp_body = self._interpreted.rewrite()
            return self._interp_body(*args, **kwargs)

    # ------------------------------------------------------------------------ device helpers
    @_DeviceFunction
    def _tile_index(start, BLOCK: tl.constexpr, limit):
        """Indices ``start + [0, BLOCK)``, their bound mask and their int64 copy (for addresses)."""
        idx = start + tl.arange(0, BLOCK)
        return idx, idx < limit, idx.to(tl.int64)

    @_DeviceFunction
    def _load_tile(X, idx64, idx_ok, stride, offs, offs_ok, UPCAST: tl.constexpr):
        """The tile ``X[idx, offs]`` of a row-major matrix, zero outside the masks (``offs_ok`` is a
        [1, len(offs)] row)."""
        t = tl.load(X + idx64[:, None] * stride + offs[None, :], mask=idx_ok[:, None] & offs_ok, other=0.0)
        if UPCAST:
            t = t.to(tl.float32)
        return t

    @_DeviceFunction
    def _store_tile(X, idx64, idx_ok, stride, offs, offs_ok, t):
        """Stores ``t`` (in X's dtype) to ``X[idx, offs]`` inside the masks (``offs_ok``: [1, len(offs)])."""
        tl.store(X + idx64[:, None] * stride + offs[None, :], t.to(X.dtype.element_ty), mask=idx_ok[:, None] & offs_ok)

    @_DeviceFunction
    def _full_d_tile(X, idx64, idx_ok, stride, D, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                     UPCAST: tl.constexpr):
        """SINGLE_D: the whole feature rows ``X[idx, :]`` as one tile. Chunked D: None (loaded by chunks)."""
        t = None
        if SINGLE_D:
            offs_d = tl.arange(0, BLOCK_D)
            t = _load_tile(X, idx64, idx_ok, stride, offs_d, offs_d[None, :] < D, UPCAST)
        return t

    @_DeviceFunction
    def _logit_tile(A, a_idx64, a_ok, stride_a, a, B, b_idx64, b_ok, stride_b, D,
                    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                    SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """Unscaled logits ``A[a_idx] . B[b_idx]^T`` [BLOCK_A, BLOCK_B] in fp32, and the tile of B they
        loaded. SINGLE_D: one dot of the resident full-D tile ``a`` and the full-D tile ``b``, which is
        returned for reuse by the gradient product. Chunked D: a loop over BLOCK_D chunks of both
        (``a`` is None and None is returned for ``b``)."""
        # (Both branches return: the compiler accepts a literal None in a returned tuple, not a
        # variable holding None.)
        if SINGLE_D:
            b = _full_d_tile(B, b_idx64, b_ok, stride_b, D, BLOCK_D, SINGLE_D, UPCAST)
            return tl.dot(a, tl.trans(b), input_precision=PREC), b
        else:
            offs_d = tl.arange(0, BLOCK_D)
            s = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_ok = dd < D
                ac = _load_tile(A, a_idx64, a_ok, stride_a, dd, d_ok[None, :], UPCAST)
                bc = _load_tile(B, b_idx64, b_ok, stride_b, dd, d_ok[None, :], UPCAST)
                s += tl.dot(ac, tl.trans(bc), input_precision=PREC)
            return s, None

    @_DeviceFunction
    def _row_coeffs(QL, LSE2, C, CW, rows, row_ok):
        """Per-row backward inputs: label, lse (base 2), c and cw. Padded rows get lse = +inf and
        c = cw = 0, so that their dS is exactly 0."""
        qlab = tl.load(QL + rows, mask=row_ok, other=0)
        lse2 = tl.load(LSE2 + rows, mask=row_ok, other=float("inf"))
        c = tl.load(C + rows, mask=row_ok, other=0.0)
        cw = tl.load(CW + rows, mask=row_ok, other=0.0)
        return qlab, lse2, c, cw

    @_DeviceFunction
    def _overlap(lo_a, hi_a, lo_b, hi_b):
        """Whether the ranges [lo_a, hi_a) and [lo_b, hi_b) intersect. A tile crosses the excluded band
        j = i + self_offset when its columns overlap its rows shifted by self_offset."""
        return (lo_a < hi_b) & (hi_a > lo_b)

    @_DeviceFunction
    def _tile_needs_mask(row0, n0, N, self_offset, HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
        """Whether the [BLOCK_M, BLOCK_N] tile at (row0, n0) has padded columns or self columns."""
        needs_mask = n0 + BLOCK_N > N
        if HAS_SELF:
            needs_mask = needs_mask | _overlap(n0, n0 + BLOCK_N, row0 + self_offset, row0 + BLOCK_M + self_offset)
        return needs_mask

    @_DeviceFunction
    def _valid_mask(rows, cols, col_ok, self_offset, HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """[BLOCK_M, BLOCK_N] mask of the valid columns of each row: in bounds and, with HAS_SELF,
        not the row's self column."""
        valid = tl.broadcast_to(col_ok[None, :], [BLOCK_M, BLOCK_N])
        if HAS_SELF:
            valid = valid & (cols[None, :] != rows[:, None] + self_offset)
        return valid

    @_DeviceFunction
    def _grad_product(ds, b, B, b_idx64, b_ok, stride_b, offs_o, o_ok, SINGLE_D: tl.constexpr,
                      PREC: tl.constexpr, UPCAST: tl.constexpr):
        """``ds . B[b_idx, offs_o]`` (fp32) for a ``ds`` already rounded to the input dtype. SINGLE_D
        reuses the full-D tile ``b`` loaded for the logits; chunked D loads the output chunk."""
        if UPCAST:
            ds = ds.to(tl.float32)
        if SINGLE_D:
            g = tl.dot(ds, b, input_precision=PREC)
        else:
            bo = _load_tile(B, b_idx64, b_ok, stride_b, offs_o, o_ok[None, :], UPCAST)
            g = tl.dot(ds, bo, input_precision=PREC)
        return g

    # ------------------------------------------------------------------------------- kernels
    # Masks are applied only to the tiles that need them (a runtime branch per tile): the last
    # column tile (padded columns) and, with HAS_SELF, the tiles crossed by the band j = i + self_offset.
    # Padded rows (i >= M) need no mask: their loads are zero, their c = 0 and lse = +inf make dS = 0,
    # and their outputs are not stored.

    def _fwd_kernel(Q, K, QL, KL, LOSS, LSE2, CNT,
                    M, N, D, stride_q, stride_k, scale2, self_offset, size_bucket,
                    HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr, PREC: tl.constexpr,
                    UPCAST: tl.constexpr):
        row0 = tl.program_id(0) * BLOCK_M
        rows, row_ok, rows64 = _tile_index(row0, BLOCK_M, M)
        qlab = tl.load(QL + rows, mask=row_ok, other=0)
        q = _full_d_tile(Q, rows64, row_ok, stride_q, D, BLOCK_D, SINGLE_D, UPCAST)  # None if chunked
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max (base 2); finite: no inf - inf
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s2 - m_i)
        psum = tl.zeros([BLOCK_M], tl.float32)  # sum of positive logits (unscaled q.k)
        pcnt = tl.zeros([BLOCK_M], tl.float32)  # number of positives
        for n0 in range(0, N, BLOCK_N):
            cols, col_ok, cols64 = _tile_index(n0, BLOCK_N, N)
            s, kt = _logit_tile(Q, rows64, row_ok, stride_q, q, K, cols64, col_ok, stride_k, D,
                                BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, PREC, UPCAST)
            klab = tl.load(KL + cols, mask=col_ok, other=0)
            pos = klab[None, :] == qlab[:, None]
            if _tile_needs_mask(row0, n0, N, self_offset, HAS_SELF, BLOCK_M, BLOCK_N):
                valid = _valid_mask(rows, cols, col_ok, self_offset, HAS_SELF, BLOCK_M, BLOCK_N)
                s_m = tl.where(valid, s, float("-inf"))
                pos = pos & valid
            else:
                s_m = s
            m_new = tl.maximum(m_i, tl.max(s_m, axis=1) * scale2)  # scale2 = log2(e)/tau > 0
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s_m * scale2 - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            psum += tl.sum(tl.where(pos, s, 0.0), axis=1)
            pcnt += tl.sum(pos.to(tl.float32), axis=1)
        # l_i >= 1 for any row with a valid column; the clamp only keeps fully masked rows finite
        # (they have no positive, so their lse is never used).
        lse2 = m_i + tl.log2(tl.maximum(l_i, 1.0e-30))
        loss = tl.where(pcnt > 0.0, (lse2 - psum * scale2 / tl.maximum(pcnt, 1.0)) * 0.6931471805599453, 0.0)
        tl.store(LOSS + rows, loss, mask=row_ok)
        tl.store(LSE2 + rows, lse2, mask=row_ok)
        tl.store(CNT + rows, pcnt, mask=row_ok)

    def _dq_kernel(Q, K, QL, KL, LSE2, C, CW, DQ,
                   M, N, D, stride_q, stride_k, stride_dq, scale2, self_offset, size_bucket,
                   HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, SINGLE_D: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
        # dS_ij = c_i p_ij - [j in P(i)] cw_i  with  c_i = g_i w_i / tau,  cw_i = c_i / |P(i)|
        # (both 0 and lse = +inf for rows without a positive: their dS is exactly 0).
        row0 = tl.program_id(0) * BLOCK_M
        pid_d = tl.program_id(1)
        rows, row_ok, rows64 = _tile_index(row0, BLOCK_M, M)
        offs_o, o_ok, _ = _tile_index(pid_d * BLOCK_DO, BLOCK_DO, D)
        qlab, lse2, c, cw = _row_coeffs(QL, LSE2, C, CW, rows, row_ok)
        q = _full_d_tile(Q, rows64, row_ok, stride_q, D, BLOCK_D, SINGLE_D, UPCAST)  # None if chunked
        acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols, col_ok, cols64 = _tile_index(n0, BLOCK_N, N)
            s, kt = _logit_tile(Q, rows64, row_ok, stride_q, q, K, cols64, col_ok, stride_k, D,
                                BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, PREC, UPCAST)
            klab = tl.load(KL + cols, mask=col_ok, other=0)
            p = tl.exp2(s * scale2 - lse2[:, None])
            ds = c[:, None] * p - tl.where(klab[None, :] == qlab[:, None], cw[:, None], 0.0)
            # padded columns (their p can overflow when every logit of the row is very negative)
            # and the self column (its p can exceed 1) are zeroed before the product.
            if _tile_needs_mask(row0, n0, N, self_offset, HAS_SELF, BLOCK_M, BLOCK_N):
                valid = _valid_mask(rows, cols, col_ok, self_offset, HAS_SELF, BLOCK_M, BLOCK_N)
                ds = tl.where(valid, ds, 0.0)
            ds = ds.to(Q.dtype.element_ty)  # MMA operand in the input dtype (as FlashAttention)
            acc += _grad_product(ds, kt, K, cols64, col_ok, stride_k, offs_o, o_ok, SINGLE_D, PREC, UPCAST)
        _store_tile(DQ, rows64, row_ok, stride_dq, offs_o, o_ok[None, :], acc)

    def _dk_kernel(Q, K, QL, KL, LSE2, C, CW, DK,
                   M, N, D, stride_q, stride_k, stride_dk, scale2, self_offset, size_bucket,
                   HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, SINGLE_D: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
        # Same dS tiles as _dq_kernel, transposed: dS^T [BLOCK_N, BLOCK_M]; dk = dS^T q.
        # Padded rows give dS = 0 (c = cw = 0, lse = +inf, q = 0); padded columns are not stored.
        col0 = tl.program_id(0) * BLOCK_N
        pid_d = tl.program_id(1)
        cols, col_ok, cols64 = _tile_index(col0, BLOCK_N, N)
        offs_o, o_ok, _ = _tile_index(pid_d * BLOCK_DO, BLOCK_DO, D)
        klab = tl.load(KL + cols, mask=col_ok, other=0)
        kt = _full_d_tile(K, cols64, col_ok, stride_k, D, BLOCK_D, SINGLE_D, UPCAST)  # None if chunked
        acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows, row_ok, rows64 = _tile_index(m0, BLOCK_M, M)
            qlab, lse2, c, cw = _row_coeffs(QL, LSE2, C, CW, rows, row_ok)
            st, qt = _logit_tile(K, cols64, col_ok, stride_k, kt, Q, rows64, row_ok, stride_q, D,
                                 BLOCK_N, BLOCK_M, BLOCK_D, SINGLE_D, PREC, UPCAST)  # S^T [BLOCK_N, BLOCK_M]
            p = tl.exp2(st * scale2 - lse2[None, :])
            ds = c[None, :] * p - tl.where(klab[:, None] == qlab[None, :], cw[None, :], 0.0)
            if HAS_SELF:
                if _overlap(m0 + self_offset, m0 + BLOCK_M + self_offset, col0, col0 + BLOCK_N):
                    ds = tl.where(cols[:, None] != rows[None, :] + self_offset, ds, 0.0)
            ds = ds.to(K.dtype.element_ty)  # dS^T tile as an MMA operand
            acc += _grad_product(ds, qt, Q, rows64, row_ok, stride_q, offs_o, o_ok, SINGLE_D, PREC, UPCAST)
        _store_tile(DK, cols64, col_ok, stride_dk, offs_o, o_ok[None, :], acc)

    # size_bucket is not read by the kernels: it only enters the autotuning key, so that tiles tuned
    # on a small batch are not reused on a large one (the best tile depends on the grid size).
    _fwd_jit = triton.JITFunction(_fwd_kernel, do_not_specialize=["size_bucket"])
    _dq_jit = triton.JITFunction(_dq_kernel, do_not_specialize=["size_bucket"])
    _dk_jit = triton.JITFunction(_dk_kernel, do_not_specialize=["size_bucket"])
    if _InterpretedFunction is not None:
        _fwd_interp = _InterpretedFunction(_fwd_kernel)
        _dq_interp = _InterpretedFunction(_dq_kernel)
        _dk_interp = _InterpretedFunction(_dk_kernel)
    else:  # pragma: no cover - interpreter missing in this triton build
        _fwd_interp = _dq_interp = _dk_interp = None

    # ---------------------------------------------------------------- GPU autotuning (not interpreted)
    # (BLOCK_M, BLOCK_N, num_warps, num_stages). Configs whose tiles cannot fit the registers
    # are pruned before benchmarking (_make_prune); shared-memory overflow is skipped by the autotuner.
    _FWD_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                  (64, 128, 4, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 3), (32, 64, 4, 3)]
    _DQ_TILES = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3),
                 (32, 64, 4, 2), (128, 32, 8, 3), (32, 32, 4, 2)]
    _DK_TILES = [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3),
                 (64, 32, 4, 2), (32, 128, 8, 3), (32, 32, 4, 2)]

    def _configs(tiles):
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in tiles]

    def _regs_per_thread(elems: int, elem_bytes: int, num_warps: int) -> float:
        return elems * elem_bytes / 4.0 / (32 * num_warps)

    def _make_prune(kind: str):
        def prune(configs, named_args, **kwargs):
            elt = named_args["Q"].element_size()
            bd = kwargs["BLOCK_D"]
            bdo = kwargs.get("BLOCK_DO", bd)
            # fp32 tiles: 3xTF32 splits every operand in two (ptxas: spills above 64x64), an exact FMA
            # dot ("ieee") needs even more registers. Fewer configs also keep the compile time down.
            max_tile = None
            if elt == 4:
                max_tile = 64 * 32 if kwargs.get("PREC") == "ieee" else 64 * 64
            keep = []
            for cfg in configs:
                bm, bn, w = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps
                if max_tile is not None and bm * bn > max_tile:
                    continue
                regs = _regs_per_thread(bm * bn, 4, w) * 2  # S tile (+ its exp) in fp32
                if kind == "fwd":
                    regs += _regs_per_thread(bm * bd, elt, w)
                elif kind == "dq":
                    regs += _regs_per_thread(bm * bdo, 4, w) + _regs_per_thread(bm * bd, elt, w)
                else:
                    regs += _regs_per_thread(bn * bdo, 4, w) + _regs_per_thread(bn * bd, elt, w)
                if regs <= 192:
                    keep.append(cfg)
            if not keep:  # always keep the smallest tile
                keep = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] / c.num_warps)]
            return keep
        return prune

    _KEY = ["D", "HAS_SELF", "BLOCK_D", "BLOCK_DO", "size_bucket"]  # + tensor dtypes (added by triton)
    _fwd_tuned = triton.autotune(_configs(_FWD_TILES), key=["D", "HAS_SELF", "BLOCK_D", "size_bucket"],
                                 prune_configs_by={"early_config_prune": _make_prune("fwd")})(_fwd_jit)
    _dq_tuned = triton.autotune(_configs(_DQ_TILES), key=_KEY,
                                prune_configs_by={"early_config_prune": _make_prune("dq")})(_dq_jit)
    _dk_tuned = triton.autotune(_configs(_DK_TILES), key=_KEY,
                                prune_configs_by={"early_config_prune": _make_prune("dk")})(_dk_jit)


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` is set (read at call time, like the dispatch)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def interpreter_ready() -> bool:
    """Whether the Triton interpreter can run our kernels in this process.

    Triton's own library functions (``tl.sum``, ``tl.max``...) are built as interpreted functions only
    if ``TRITON_INTERPRET=1`` was set when ``triton.language`` was first imported; otherwise the
    interpreter cannot call them. Our kernels are wrapped for both modes and picked per call.
    """
    if triton is None or _fwd_interp is None:
        return False
    return type(tl.standard.sum).__name__ == "InterpretedFunction"


def triton_available(device: torch.device) -> bool:
    """Whether :func:`contrastive_loss` runs the Triton kernels for tensors on ``device``.

    CUDA: the compiled kernels (the interpreter instead when ``TRITON_INTERPRET=1`` and it is
    usable). CPU: the interpreter when ``TRITON_INTERPRET=1`` is set now *and* was set before triton
    was imported (:func:`interpreter_ready`); otherwise the torch reference runs.
    """
    if triton is None:
        return False
    device = torch.device(device)
    if interpret_mode() and interpreter_ready():
        return device.type in ("cpu", "cuda")
    return device.type == "cuda"


def _use_interpreter() -> bool:
    return interpret_mode() and interpreter_ready()


# ------------------------------------------------------------------------------------ launchers
def _d_plan(D: int, interp: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Feature-dimension tiling: one register-resident chunk, or chunked contraction + split output."""
    fp32 = dtype == torch.float32
    bd = max(16, triton.next_power_of_2(D))
    # The interpreter uses the bf16/fp16 thresholds for every dtype (no registers to spill there).
    if bd <= (MAX_SINGLE_D_FP32 if fp32 and not interp else MAX_SINGLE_D):
        return {"BLOCK_D": bd, "BLOCK_DO": bd, "SINGLE_D": True}
    if interp:
        bdo = INTERPRET_CONFIG["BLOCK_DO_LARGE"]
    else:
        bdo = LARGE_D_BLOCK_DO_FP32 if fp32 else LARGE_D_BLOCK_DO
    return {"BLOCK_D": LARGE_D_BLOCK_D, "BLOCK_DO": min(bdo, bd), "SINGLE_D": False}


def _size_bucket(rows: int, cols: int) -> int:
    """Autotuning bucket: log2 of the parallel dimension (capped) and of the streamed one (coarse)."""
    r = min(max(rows - 1, 1).bit_length(), 17)
    c = min(max(cols - 1, 1).bit_length(), 17)
    return r * 32 + c // 2


def _dot_flags(dtype: torch.dtype, interp: bool) -> dict:
    # fp32 inputs follow torch's matmul precision setting: "highest" (default) -> 3xTF32 on tensor
    # cores (error ~1e-6 relative, like fp32 FMA, at a fraction of the FMA cost: an exact FMA dot
    # spills heavily at D >= 128); "high"/"medium" -> 1xTF32. bf16/fp16 always use tensor cores with
    # fp32 accumulation. The interpreter computes dots with numpy in fp32 regardless.
    prec = "ieee" if interp else "tf32"  # bf16/fp16: Triton's default; the setting only affects fp32
    if dtype == torch.float32 and not interp:
        prec = "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return {"PREC": prec, "UPCAST": bool(interp and dtype == torch.bfloat16)}


def _new(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class _DeviceGuard:
    """Launch on the tensors' GPU even when it is not the current device."""

    def __init__(self, device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _launch_forward(q, k, q_labels, k_labels, scale2: float, self_offset, interp: bool):
    M, D = q.shape
    N = k.shape[0]
    loss = _new((M,), torch.float32, q.device)
    lse2 = _new((M,), torch.float32, q.device)
    cnt = _new((M,), torch.float32, q.device)
    plan = _d_plan(D, interp, q.dtype)
    meta = dict(HAS_SELF=self_offset is not None, BLOCK_D=plan["BLOCK_D"], SINGLE_D=plan["SINGLE_D"],
                **_dot_flags(q.dtype, interp))
    args = (q, k, q_labels, k_labels, loss, lse2, cnt, M, N, D, q.stride(0), k.stride(0), scale2,
            0 if self_offset is None else self_offset, _size_bucket(M, N))
    with _DeviceGuard(q.device):
        if interp:
            bm = INTERPRET_CONFIG["BLOCK_M"]
            _fwd_interp[(triton.cdiv(M, bm),)](*args, BLOCK_M=bm, BLOCK_N=INTERPRET_CONFIG["BLOCK_N"], **meta)
        else:
            _fwd_tuned[lambda m: (triton.cdiv(M, m["BLOCK_M"]),)](*args, **meta)
    return loss, lse2, cnt


def _launch_backward(q, k, q_labels, k_labels, lse2, c, cw, scale2, self_offset, need_dq, need_dk,
                     interp: bool):
    M, D = q.shape
    N = k.shape[0]
    plan = _d_plan(D, interp, q.dtype)
    n_do = triton.cdiv(D, plan["BLOCK_DO"])
    meta = dict(HAS_SELF=self_offset is not None, **plan, **_dot_flags(q.dtype, interp))
    so = 0 if self_offset is None else self_offset
    bm, bn = INTERPRET_CONFIG["BLOCK_M"], INTERPRET_CONFIG["BLOCK_N"]
    dq = dk = None
    with _DeviceGuard(q.device):
        if need_dq:
            dq = _new((M, D), q.dtype, q.device)
            args = (q, k, q_labels, k_labels, lse2, c, cw, dq, M, N, D, q.stride(0), k.stride(0),
                    dq.stride(0), scale2, so, _size_bucket(M, N))
            if interp:
                _dq_interp[(triton.cdiv(M, bm), n_do)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
            else:
                _dq_tuned[lambda m: (triton.cdiv(M, m["BLOCK_M"]), n_do)](*args, **meta)
        if need_dk:
            dk = _new((N, D), k.dtype, k.device)
            args = (q, k, q_labels, k_labels, lse2, c, cw, dk, M, N, D, q.stride(0), k.stride(0),
                    dk.stride(0), scale2, so, _size_bucket(N, M))
            if interp:
                _dk_interp[(triton.cdiv(N, bn), n_do)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
            else:
                _dk_tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]), n_do)](*args, **meta)
    return dq, dk


class _ContrastiveRows(torch.autograd.Function):
    """Per-row unweighted losses ``l_i`` [M] (float32); weights and reduction are applied outside."""

    @staticmethod
    def forward(ctx, q, k, q_labels, k_labels, temperature: float, self_offset, interp: bool):
        scale2 = _LOG2E / temperature
        loss, lse2, cnt = _launch_forward(q, k, q_labels, k_labels, scale2, self_offset, interp)
        ctx.save_for_backward(q, k, q_labels, k_labels, lse2, cnt)
        ctx.temperature = temperature
        ctx.self_offset = self_offset
        ctx.interp = interp
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        q, k, q_labels, k_labels, lse2, cnt = ctx.saved_tensors
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dq or need_dk):
            return None, None, None, None, None, None, None
        active = cnt > 0
        zero = torch.zeros((), dtype=torch.float32, device=cnt.device)
        # c_i = g_i w_i / tau (w_i is already folded into g_i by autograd), cw_i = c_i / |P(i)|.
        # Rows without a positive: c = cw = 0 and lse = +inf, so that their dS is exactly 0.
        c = torch.where(active, grad_rows.float() / ctx.temperature, zero).contiguous()
        cw = (c / cnt.clamp_min(1.0)).contiguous()
        lse2_safe = torch.where(active, lse2, torch.full_like(lse2, float("inf"))).contiguous()
        dq, dk = _launch_backward(q, k, q_labels, k_labels, lse2_safe, c, cw, _LOG2E / ctx.temperature,
                                  ctx.self_offset, need_dq, need_dk, ctx.interp)
        return dq, dk, None, None, None, None, None


def _prepare(q, k, q_labels, k_labels):
    dtype = torch.promote_types(q.dtype, k.dtype)
    q = q.to(dtype).contiguous()
    k = k.to(dtype).contiguous()
    return q, k, q_labels.to(torch.int64).contiguous(), k_labels.to(torch.int64).contiguous()


def contrastive_loss_triton(q, k, q_labels, k_labels, *, temperature, weights=None, self_offset=None,
                            reduction="mean"):
    """:func:`contrastive_loss` forced onto the Triton kernels (GPU or interpreter). Same contract."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    temperature, self_offset = check_contrastive_inputs(q, k, q_labels, k_labels, temperature, weights,
                                                        self_offset, reduction)
    q2, k2, ql, kl = _prepare(q, k, q_labels, k_labels)
    if q2.dtype == torch.float64:
        raise ValueError("q and k must be float32, bfloat16 or float16 for the Triton path (float64: reference)")
    if not triton_available(q2.device):
        raise RuntimeError("the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before triton was "
                           "imported (see interpreter_ready())")
    rows = _ContrastiveRows.apply(q2, k2, ql, kl, temperature, self_offset, _use_interpreter())
    return reduce_rows(rows, weights, reduction)


def contrastive_loss(q, k, q_labels, k_labels, *, temperature, weights=None, self_offset=None, reduction="mean"):
    """Generic contrastive (InfoNCE / multi-positive) loss of rows ``q`` against columns ``k``.

    Args:
        q: [M, D] float32 / bfloat16 / float16 rows (not normalised here).
        k: [N, D] columns, same device (a different float dtype is promoted).
        q_labels: [M] integer labels of the rows; k_labels: [N] integer labels of the columns.
        temperature: > 0; logits are ``s_ij = q_i . k_j / temperature``.
        weights: optional [M] row weights (treated as constants, e.g. GenView QDC weights).
        self_offset: if not None, column ``self_offset + i`` is excluded for row ``i``
            (needs ``0 <= self_offset`` and ``self_offset + M <= N``).
        reduction: ``"mean"`` -> ``(1/M) sum_i w_i l_i`` (scalar); ``"none"`` -> vector ``w_i l_i``.

    ``l_i = logsumexp_{j in V(i)} s_ij - mean_{j in P(i)} s_ij`` with ``V(i)`` the valid columns and
    ``P(i) = {j in V(i): k_labels[j] == q_labels[i]}``; a row with no positive has ``l_i = 0`` and no
    gradient. Label patterns: NT-Xent (k = q, two views share a label, ``self_offset=0``), StableRep
    (m >= 2 views per label), MoCo v2 (k = [keys; queue], queue labels -1, row labels >= 0), MoCo v3 /
    multi-GPU (local rows vs all-gathered columns, ``self_offset = rank * M``).

    Returns float32 (float64 for float64 inputs); gradients flow to ``q`` and ``k`` in their dtypes.
    Raises ``ValueError`` naming the offending argument on bad input.
    """
    temperature, self_offset = check_contrastive_inputs(q, k, q_labels, k_labels, temperature, weights,
                                                        self_offset, reduction)
    dtype = torch.promote_types(q.dtype, k.dtype)
    if dtype == torch.float64 or not triton_available(q.device):
        rows = contrastive_rows_reference(q, k, q_labels, k_labels, temperature, self_offset)
    else:
        q2, k2, ql, kl = _prepare(q, k, q_labels, k_labels)
        rows = _ContrastiveRows.apply(q2, k2, ql, kl, temperature, self_offset, _use_interpreter())
    return reduce_rows(rows, weights, reduction)
