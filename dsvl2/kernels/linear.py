"""``gemv``: every linear layer of a decode step other than attention's own (q‖kv_a, o_proj, the dense MLP,
lm_head), batch invariant. On tensor cores (``_mm_kernel``: the rows in fixed tiles, padded rows masked) at every
batch size by default; on CUDA cores (``_gemv_kernel``: a program reads its block of weight rows once and applies
it to every row) for steps of at most ``launch.CUDA_CORE_ROWS`` rows. Block sizes come from the weight's shape,
never from the number of rows.
"""

from __future__ import annotations

import torch

from . import launch
from .launch import gdc_launch_dependents, gdc_wait, tile_dot, triton

if triton is not None:
    import triton.language as tl

    @triton.jit(do_not_specialize=["rows"])
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, rows, NOUT: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, WHOLE_ROW: tl.constexpr, ROWS_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        # y[t, n] = round(sum_k x[t, k] w[n, k]) (float32 accumulation, rounded to x's dtype) for a block of
        # outputs n and every row t < rows. The block's weights are read once for all the rows, and each row's
        # sum is the same sequence of operations whatever ``rows`` is (not specialised: one binary for every
        # batch size).
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < NOUT
        w_rows = w_ptr + n[:, None].to(tl.int64) * K
        x_ty = x_ptr.dtype.element_ty
        y_ty = y_ptr.dtype.element_ty
        if WHOLE_ROW:  # the block's whole rows (BLOCK_K >= K) in registers, fetched before waiting for x
            k = tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & (k < K)[None, :], other=0.0)
            if USE_PDL:
                gdc_wait()
                gdc_launch_dependents()
            for t in range(rows):
                xk = tl.load(x_ptr + t * K + k, mask=k < K, other=0.0).to(tl.float32)
                acc = tl.sum(w.to(tl.float32) * xk[None, :], axis=1)
                tl.store(y_ptr + t * NOUT + n, acc.to(x_ty).to(y_ty), mask=mask_n)
        else:  # BLOCK_K columns at a time; each row's running sum in its own column of acc
            if USE_PDL:
                gdc_wait()
                gdc_launch_dependents()
            r = tl.arange(0, ROWS_PAD)
            acc = tl.zeros([BLOCK_N, ROWS_PAD], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
                for t in range(rows):
                    xk = tl.load(x_ptr + t * K + k, mask=k < K, other=0.0).to(tl.float32)
                    acc = tl.where(r[None, :] == t, acc + tl.sum(w * xk[None, :], axis=1)[:, None], acc)
            tl.store(y_ptr + r[None, :] * NOUT + n[:, None], acc.to(x_ty).to(y_ty),
                     mask=mask_n[:, None] & (r < rows)[None, :])

    @triton.jit(do_not_specialize=["rows"])
    def _mm_kernel(x_ptr, w_ptr, y_ptr, rows, NOUT: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr, USE_PDL: tl.constexpr):
        # y[t, n] = round(sum_k x[t, k] w[n, k]) for a block of outputs n and every row t < rows, on tensor cores:
        # the rows in tiles of BLOCK_M (padding masked to zeros), the sum in BLOCK_K steps, each a matrix-multiply
        # accumulate into float32. A row's sum is the same sequence of operations in any tile and at any ``rows``
        # (one binary for every batch size), and a tile's rows never mix, so the result is batch invariant. With
        # BLOCK_M below ``rows``, the block's weights are read again (from L2) for each further tile.
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = w_ptr + n[:, None].to(tl.int64) * K
        x_ty = x_ptr.dtype.element_ty
        for m0 in range(0, rows, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                w = tl.load(w_rows + k[None, :], mask=(n < NOUT)[:, None] & (k < K)[None, :], other=0.0)
                acc = tile_dot(acc, x_ptr, m * K, m < rows, k, K, tl.trans(w), FP32_DOT)
            tl.store(y_ptr + m[:, None] * NOUT + n[None, :], acc.to(x_ty).to(y_ptr.dtype.element_ty),
                     mask=(m < rows)[:, None] & (n < NOUT)[None, :])


# Block sizes of the matrix-vector kernel, by variant. The whole-row variant (launched with PDL; K up to
# GEMV_WHOLE_ROW_MAX_K) keeps a block of weight rows in registers and fetches it before waiting for the previous
# kernel; the K-loop variant streams BLOCK_K columns at a time.
GEMV_CONFIG = (4, 512, 1)  # BLOCK_N, BLOCK_K, num_warps of the K-loop: from the sweep in profile_decode.py (H100)
GEMV_PDL_CONFIG = (2, 2)  # BLOCK_N, num_warps of the whole-row variant (sweep as above, at one row)
# Weights of at least GEMV_WIDE_N rows (lm_head, the dense MLP's gate‖up): larger blocks, so that a batch's rows are
# re-read from cache by a quarter as many programs. Not yet measured: benchmarks/decode_kernels.py --sweep.
GEMV_WIDE_N, GEMV_WIDE_PDL_CONFIG = 16384, (8, 4)
GEMV_WHOLE_ROW_MAX_K = 4096


def gemv_config(n: int, k: int, pdl: bool) -> tuple[bool, int, int, int]:
    """(whole row, BLOCK_N, BLOCK_K, num_warps) for a weight [n, k]: from its shape and the launch mode only,
    never from the number of rows, so that a row is computed by the same code whatever the batch."""
    if pdl and k <= GEMV_WHOLE_ROW_MAX_K:
        bn, nw = GEMV_WIDE_PDL_CONFIG if n >= GEMV_WIDE_N else GEMV_PDL_CONFIG
        return True, bn, triton.next_power_of_2(k), nw
    bn, bk, nw = GEMV_CONFIG
    return False, bn, bk, nw


# The tensor-core kernel's tiles (``_mm_kernel``): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), by the weight's
# shape only; wide weights (lm_head, the dense MLP's gate‖up) take wider output blocks. Every row of a step (up to 64)
# sits in one BLOCK_M tile, so each weight tile is read once; at one row the padded rows cost nothing measurable
# (BENCHMARKS.md, session 8: 468.5 vs 467.7 tokens/s against 16-row tiles, 4,466 vs 4,090 at 64 rows).
MM_CONFIG = (64, 32, 256, 4, 3)
MM_WIDE_CONFIG = (64, 128, 128, 4, 3)


def gemv_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Up to MAX_DECODE_TOKENS rows of x (CUDA) times a contiguous matrix of x's dtype: the matrix-vector kernel."""
    return (launch.available(x) and x.numel() // x.shape[-1] <= launch.MAX_DECODE_TOKENS and w.dim() == 2
            and w.is_contiguous() and w.dtype == x.dtype)


@torch.library.custom_op("dsvl2::gemv", mutates_args=())
def gemv(x: torch.Tensor, w: torch.Tensor, float_out: bool = False) -> torch.Tensor:
    """``F.linear(x, w)``, batch invariant: x [..., K] (at most MAX_DECODE_TOKENS rows), w [N, K] contiguous ->
    [..., N] in x's dtype; ``float_out``: the same values as float32 (``.float()`` of it, in the same kernel)."""
    k = x.shape[-1]
    rows = x.numel() // k
    n = w.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32 if float_out else x.dtype, device=x.device)
    pdl = launch.pdl_args(x)
    if launch.tensor_cores(rows):
        config = MM_WIDE_CONFIG if n >= GEMV_WIDE_N else MM_CONFIG
        bm, bn, bk, nw, ns = launch.mma_tiles(config, k, x.element_size(), launch.shared_memory_of(x))
        launch.launch(_mm_kernel, (triton.cdiv(n, bn),), x.contiguous(), w, y, rows, NOUT=n, K=k, BLOCK_M=bm,
                      BLOCK_N=bn, BLOCK_K=bk, FP32_DOT=launch.fp32_dot(x), num_warps=nw, num_stages=ns, **pdl)
        return y
    whole_row, bn, bk, nw = gemv_config(n, k, pdl["USE_PDL"])
    launch.launch(_gemv_kernel, (triton.cdiv(n, bn),), x.contiguous(), w, y, rows, NOUT=n, K=k, BLOCK_N=bn,
                  BLOCK_K=bk, WHOLE_ROW=whole_row, ROWS_PAD=launch.MAX_DECODE_TOKENS, num_warps=nw, **pdl)
    return y


@gemv.register_fake
def _(x, w, float_out=False):
    return x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32 if float_out else x.dtype)
