"""Triton kernels for the routed experts at decode time (CUDA; the tests run them through Triton's
interpreter on the CPU).

At batch 1 a decode step routes one token to 6 of 64 experts, so the work is reading those 6 experts'
weights once: each kernel is a matrix-vector product that reads a [BLOCK_N, D] slab of one selected
expert straight from the stacked weights (no gather copy, no host synchronisation).
``routed_experts`` computes what ``moe.grouped_experts`` computes; the tests compare them.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the grouped path is used instead
    triton = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, ids_ptr, h_ptr, D: tl.constexpr, HID: tl.constexpr, K_TOP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # h[pair, n] = silu(x[token] . w13[e, n]) * (x[token] . w13[e, I + n]) for a block of n
        pair = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(ids_ptr + pair).to(tl.int64)
        token = pair // K_TOP
        w_gate = w_ptr + e * (2 * HID * D) + n[:, None] * D
        w_up = w_gate + HID * D
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        mask_n = n < HID
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + token * D + k).to(tl.float32)
            g = tl.load(w_gate + k[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            u = tl.load(w_up + k[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            acc_g += tl.sum(g * xk[None, :], axis=1)
            acc_u += tl.sum(u * xk[None, :], axis=1)
        # Round like the plain path does: each projection is a bf16 tensor before the activation.
        g_r = acc_g.to(h_ptr.dtype.element_ty).to(tl.float32)
        u_r = acc_u.to(h_ptr.dtype.element_ty).to(tl.float32)
        act = (g_r / (1.0 + tl.exp(-g_r))).to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + pair * HID + n, (act * u_r).to(h_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, ids_ptr, wt_ptr, y_ptr, D: tl.constexpr, HID: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # y[pair, n] = weight[pair] * bf16(h[pair] . w2[e, n]) for a block of n (float32 out)
        pair = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(ids_ptr + pair).to(tl.int64)
        rows = w_ptr + e * (D * HID) + n[:, None] * HID
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        mask_n = n < D
        for k0 in range(0, HID, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask_k = k < HID
            hk = tl.load(h_ptr + pair * HID + k, mask=mask_k, other=0.0).to(tl.float32)
            w = tl.load(rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * hk[None, :], axis=1)
        out = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * tl.load(wt_ptr + pair)
        tl.store(y_ptr + pair * D + n, out, mask=mask_n)


# Block sizes per kernel (BLOCK_N, BLOCK_K, num_warps), chosen by benchmarks/profile_decode.py on an H100.
GATE_UP_CONFIG = (8, 512, 2)
DOWN_CONFIG = (16, 128, 8)


def routed_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, gate_up_config: tuple[int, int, int] | None = None,
                   down_config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [N, D] (bf16), weights/ids [N, k] -> [N, D]; w13 [E, 2I, D], w2 [E, D, I] contiguous."""
    n, k = ids.shape
    d = x.shape[1]
    i = w2.shape[2]
    pairs = n * k
    h = torch.empty(pairs, i, dtype=x.dtype, device=x.device)
    y = torch.empty(pairs, d, dtype=torch.float32, device=x.device)
    ids_flat = ids.reshape(-1).contiguous()
    bn, bk, nw = gate_up_config or GATE_UP_CONFIG
    _gate_up_kernel[(pairs, triton.cdiv(i, bn))](
        x.contiguous(), w13, ids_flat, h, D=d, HID=i, K_TOP=k, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    bn, bk, nw = down_config or DOWN_CONFIG
    _down_kernel[(pairs, triton.cdiv(d, bn))](
        h, w2, ids_flat, weights.reshape(-1).contiguous(), y, D=d, HID=i, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    return y.view(n, k, d).sum(1).to(x.dtype)
