"""Triton kernels for decode time (a handful of tokens; CUDA, or the Triton interpreter in tests).

Routed experts: at batch 1 a decode step routes one token to 6 of 64 experts, so the work is reading
those 6 experts' weights once: each kernel is a matrix-vector product that reads a [BLOCK_N, D] slab
of one selected expert straight from the stacked weights (no gather copy, no host synchronisation).
``routed_experts`` computes what ``moe.grouped_experts`` computes.

Latent attention: every head attends over the same compressed cache (512 + 64 values a token), so
one program takes all heads of one row and one slice of the positions, reads that slice of the cache
once, and keeps an online softmax (split-K "flash decoding"); only positions up to the row's own
position are read. ``latent_attention`` computes what ``Attention.decode``'s plain path computes.
The tests compare both kernels with the plain paths.
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


if triton is not None:

    @triton.jit
    def _latent_attention_kernel(q_ptr, cache_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr, stride_cb, stride_cs, scale,
                                 H: tl.constexpr, R: tl.constexpr, P: tl.constexpr, NSPLIT: tl.constexpr,
                                 BLOCK_S: tl.constexpr):
        # Row b, split j: positions [start, end) of 0..pos[b]; partial softmax state per head.
        b = tl.program_id(0)
        j = tl.program_id(1)
        length = tl.load(pos_ptr + b) + 1
        chunk = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_S) * BLOCK_S
        start = j * chunk
        end = tl.minimum(start + chunk, length)
        h = tl.arange(0, H)
        r = tl.arange(0, R)
        p = tl.arange(0, P)
        q_row = q_ptr + b * H * (R + P) + h[:, None] * (R + P)
        q_lat = tl.load(q_row + r[None, :])  # [H, R]
        q_rope = tl.load(q_row + R + p[None, :])  # [H, P]
        m_i = tl.full([H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([H], dtype=tl.float32)
        acc = tl.zeros([H, R], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            valid = s < end
            rows = cache_ptr + b * stride_cb + s[:, None] * stride_cs
            kv = tl.load(rows + r[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_S, R]: keys and values
            kr = tl.load(rows + R + p[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_S, P]: rotary keys
            scores = (tl.dot(q_lat, tl.trans(kv)) + tl.dot(q_rope, tl.trans(kr))) * scale  # [H, BLOCK_S]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            weights = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(weights, 1)
            acc = acc * alpha[:, None] + tl.dot(weights.to(kv.dtype), kv)
            m_i = m_new
        part = b * NSPLIT + j
        tl.store(acc_ptr + (part * H + h[:, None]) * R + r[None, :], acc)
        tl.store(m_ptr + part * H + h, m_i)
        tl.store(l_ptr + part * H + h, l_i)


def latent_attention_ok(heads: int, rank: int, rope: int) -> bool:
    """The kernel's shape rules: power-of-two sizes of at least 16 (tensor-core tiles)."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (heads, rank, rope))


def latent_attention(q: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor, rank: int, scale: float,
                     n_split: int = 32, block_s: int = 32) -> torch.Tensor:
    """q [B, H, rank + rope] (absorbed query), cache [B, S, rank + rope], pos [B] -> out [B, H, rank].

    out[b, h] = softmax_s(q[b, h] . cache[b, s] * scale over s <= pos[b]) @ cache[b, s, :rank]
    """
    b, h, width = q.shape
    acc = torch.empty(b, n_split, h, rank, dtype=torch.float32, device=q.device)
    m = torch.empty(b, n_split, h, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, n_split, h, dtype=torch.float32, device=q.device)
    _latent_attention_kernel[(b, n_split)](
        q.contiguous(), cache, pos, acc, m, lse, cache.stride(0), cache.stride(1), scale,
        H=h, R=rank, P=width - rank, NSPLIT=n_split, BLOCK_S=block_s)
    # Combine the splits (empty ones have m = -inf and weigh nothing).
    m_max = m.amax(dim=1, keepdim=True)
    w = torch.exp(m - m_max)  # [B, NSPLIT, H]
    out = (acc * w[..., None]).sum(1) / (lse * w).sum(1)[..., None]
    return out.to(q.dtype)


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
