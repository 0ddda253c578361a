"""Multi-head latent attention for a decode step, over the compressed cache, in three custom operators (four Triton
kernels), each with its fake (its output shapes) beside it:

- ``mla_prologue``: the query absorbed into the latent space (q_nope through kv_b's key rows), both rotary parts,
  and the token's cache row written, in one kernel;
- ``latent_attention``: attention split over positions up to each row's own position (flash-decoding), the splits
  merged by a second kernel;
- ``value_out``: the values' rows of kv_b applied per head.

Launched as ``launch`` describes; the q‖kv_a and o_proj products around them are ``linear.gemv``.
"""

from __future__ import annotations

import torch

from . import launch
from .launch import gdc_launch_dependents, gdc_wait, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _latent_attention_kernel(ql_ptr, qr_ptr, cache_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr, stride_cb, stride_cs,
                                 scale, H: tl.constexpr, R: tl.constexpr, P: tl.constexpr, NSPLIT: tl.constexpr,
                                 BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr):
        # Row b, split j: positions [start, end) of 0..pos[b]; a partial softmax state per head.
        if USE_PDL:  # the query and this step's cache row come from the previous kernel
            gdc_wait()
            gdc_launch_dependents()
        b = tl.program_id(0)
        j = tl.program_id(1)
        length = tl.load(pos_ptr + b) + 1
        chunk = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_S) * BLOCK_S
        start = j * chunk
        end = tl.minimum(start + chunk, length)
        h = tl.arange(0, H)
        r = tl.arange(0, R)
        p = tl.arange(0, P)
        q_lat = tl.load(ql_ptr + b * H * R + h[:, None] * R + r[None, :])  # [H, R]
        q_rope = tl.load(qr_ptr + b * H * P + h[:, None] * P + p[None, :])  # [H, P]
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

    @triton.jit
    def _attention_combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, H: tl.constexpr, R: tl.constexpr,
                                  NSPLIT: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr):
        # Merge the splits of row b, head h, for a block of the rank (an empty split has m = -inf, weight 0).
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        b = tl.program_id(0)
        h = tl.program_id(1)
        j = tl.arange(0, NSPLIT)
        r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        m = tl.load(m_ptr + (b * NSPLIT + j) * H + h)
        w = tl.exp(m - tl.max(m, axis=0))
        total = tl.sum(tl.load(l_ptr + (b * NSPLIT + j) * H + h) * w, axis=0)
        acc = tl.load(acc_ptr + ((b * NSPLIT + j[:, None]) * H + h) * R + r[None, :])
        out = tl.sum(acc * w[:, None], axis=0) / total
        tl.store(out_ptr + (b * H + h) * R + r, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _rotate(x_ptr, cos, sin, P: tl.constexpr):
        # Upstream's rotary rotation of the P values at x_ptr, in float32: de-interleave the pairs, then rotate
        # half: out[i] = x[2i] cos[i] - x[2i+1] sin[i] (i < P/2), x[2i'+1] cos[i] + x[2i'] sin[i] (i' = i - P/2).
        i = tl.arange(0, P)
        first = i < P // 2
        x = tl.load(x_ptr + tl.where(first, 2 * i, 2 * i - P + 1)).to(tl.float32)
        partner = tl.load(x_ptr + tl.where(first, 2 * i + 1, 2 * i - P)).to(tl.float32)
        return x * cos + tl.where(first, -1.0, 1.0) * partner * sin

    @triton.jit
    def _mla_prologue_kernel(qkv_ptr, cs_ptr, nw_ptr, kvb_ptr, cache_ptr, pos_ptr, ql_ptr, qr_ptr, eps, stride_cb,
                             stride_cs, H: tl.constexpr, NOPE: tl.constexpr, P: tl.constexpr, R: tl.constexpr,
                             V: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr):
        # Row b of qkv is [q: H x (NOPE + P) | c: R | k_rope: P]. Program (b, h, j): the absorbed query
        # q_lat[b, h, r] = sum_d q_nope[b, h, d] * kv_b[h * (NOPE + V) + d, r] for block j of r; block 0 of each
        # head also rotates that head's rotary query; program (b, 0, 0) writes the cache row at pos[b]:
        # [rmsnorm(c) * weight, rotated k_rope] (``_rotate``: upstream's rotation).
        b = tl.program_id(0)
        h = tl.program_id(1)
        j = tl.program_id(2)
        r = j * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, NOPE)
        w = tl.load(kvb_ptr + (h * (NOPE + V) + d[:, None]) * R + r[None, :])  # [NOPE, BLOCK_R]: a constant
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        QW: tl.constexpr = H * (NOPE + P)
        row = qkv_ptr + b * (QW + R + P)
        q = tl.load(row + h * (NOPE + P) + d).to(tl.float32)
        q_lat = tl.sum(w.to(tl.float32) * q[:, None], axis=0)
        tl.store(ql_ptr + (b * H + h) * R + r, q_lat.to(ql_ptr.dtype.element_ty))
        if j == 0:
            i = tl.arange(0, P)
            cos = tl.load(cs_ptr + b * 2 * P + i)
            sin = tl.load(cs_ptr + b * 2 * P + P + i)
            q_rope = _rotate(row + h * (NOPE + P) + NOPE, cos, sin, P)
            tl.store(qr_ptr + (b * H + h) * P + i, q_rope.to(qr_ptr.dtype.element_ty))
            if h == 0:
                rr = tl.arange(0, R)
                c = tl.load(row + QW + rr).to(tl.float32)
                normed = (c * tl.math.rsqrt(tl.sum(c * c, axis=0) / R + eps)).to(cache_ptr.dtype.element_ty)
                normed = normed.to(tl.float32) * tl.load(nw_ptr + rr).to(tl.float32)
                slot = cache_ptr + b * stride_cb + tl.load(pos_ptr + b) * stride_cs
                tl.store(slot + rr, normed.to(cache_ptr.dtype.element_ty))
                tl.store(slot + R + i, _rotate(row + QW + R, cos, sin, P).to(cache_ptr.dtype.element_ty))

    @triton.jit
    def _value_out_kernel(o_ptr, kvb_ptr, out_ptr, H: tl.constexpr, R: tl.constexpr, NOPE: tl.constexpr,
                          V: tl.constexpr, BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr):
        # out[b, h * V + v] = sum_r o_lat[b, h, r] * kv_b[h * (NOPE + V) + NOPE + v, r] for a block of v.
        b = tl.program_id(0)
        h = tl.program_id(1)
        v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
        r = tl.arange(0, R)
        w = tl.load(kvb_ptr + (h * (NOPE + V) + NOPE + v[:, None]) * R + r[None, :])  # [BLOCK_V, R]: a constant
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        o = tl.load(o_ptr + (b * H + h) * R + r).to(tl.float32)
        out = tl.sum(w.to(tl.float32) * o[None, :], axis=1)
        tl.store(out_ptr + (b * H + h) * V + v, out.to(out_ptr.dtype.element_ty))


def latent_attention_ok(heads: int, rank: int, rope: int, nope: int, vdim: int) -> bool:
    """The kernels' shape rules: power-of-two sizes of at least 16 (tensor-core tiles, block shapes)."""
    return triton is not None and all(n >= 16 and n & (n - 1) == 0 for n in (heads, rank, rope, nope, vdim))


ATTENTION_SPLITS, ATTENTION_BLOCK_S = 64, 32  # from the sweep in benchmarks/profile_decode.py (H100)


@torch.library.custom_op("dsvl2::mla_prologue", mutates_args=("cache",))
def mla_prologue(qkv: torch.Tensor, cos_sin: torch.Tensor, norm_w: torch.Tensor, eps: float, kv_b: torch.Tensor,
                 cache: torch.Tensor, pos: torch.Tensor, heads: int, nope: int,
                 rope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From one token's q‖kv_a product per row to what latent attention reads, in one kernel.

    qkv [B, H * (nope + rope) + rank + rope], cos_sin [B, 2, rope] float32 (this row's rotary table), norm_w
    [rank] (kv_a_layernorm), kv_b [H * (nope + v), rank], cache [B, S, rank + rope], pos [B] ->
    (q_lat [B, H, rank]: q_nope through kv_b's key rows, q_rope [B, H, rope]: rotated); writes
    cache[b, pos[b]] = [rmsnorm(c) * norm_w, rotated k_rope], as the plain path's _project and cache write.
    """
    b = qkv.shape[0]
    rank = kv_b.shape[1]
    vdim = kv_b.shape[0] // heads - nope
    q_lat = torch.empty(b, heads, rank, dtype=qkv.dtype, device=qkv.device)
    q_rope = torch.empty(b, heads, rope, dtype=qkv.dtype, device=qkv.device)
    block_r = min(rank, 64)
    launch.launch(_mla_prologue_kernel, (b, heads, rank // block_r),
                  qkv.contiguous(), cos_sin.reshape(b, 2, rope).contiguous(), norm_w, kv_b, cache, pos, q_lat, q_rope,
                  eps, cache.stride(0), cache.stride(1), H=heads, NOPE=nope, P=rope, R=rank, V=vdim, BLOCK_R=block_r,
                  num_warps=4, **launch.pdl_args(qkv))
    return q_lat, q_rope


@mla_prologue.register_fake
def _(qkv, cos_sin, norm_w, eps, kv_b, cache, pos, heads, nope, rope):
    b = qkv.shape[0]
    return qkv.new_empty(b, heads, kv_b.shape[1]), qkv.new_empty(b, heads, rope)


@torch.library.custom_op("dsvl2::latent_attention", mutates_args=())
def latent_attention(q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q_lat [B, H, rank], q_rope [B, H, rope] (absorbed query), cache [B, S, rank + rope], pos [B] -> [B, H, rank]

    out[b, h] = softmax_s((q_lat . c_s + q_rope . k_s) * scale over s <= pos[b]) @ c_s, with c_s = cache[b, s, :rank]
    """
    b, h, rank = q_lat.shape
    n_split = ATTENTION_SPLITS
    pdl = launch.pdl_args(q_lat)
    acc = torch.empty(b, n_split, h, rank, dtype=torch.float32, device=q_lat.device)
    m = torch.empty(b, n_split, h, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(b, n_split, h, dtype=torch.float32, device=q_lat.device)
    launch.launch(_latent_attention_kernel, (b, n_split),
                  q_lat.contiguous(), q_rope.contiguous(), cache, pos, acc, m, lse, cache.stride(0), cache.stride(1),
                  scale, H=h, R=rank, P=q_rope.shape[-1], NSPLIT=n_split, BLOCK_S=ATTENTION_BLOCK_S, **pdl)
    out = torch.empty(b, h, rank, dtype=q_lat.dtype, device=q_lat.device)
    block_r = min(rank, 128)
    launch.launch(_attention_combine_kernel, (b, h, rank // block_r), acc, m, lse, out, H=h, R=rank,
                  NSPLIT=n_split, BLOCK_R=block_r, **pdl)
    return out


@latent_attention.register_fake
def _(q_lat, q_rope, cache, pos, scale):
    return torch.empty_like(q_lat)


@torch.library.custom_op("dsvl2::value_out", mutates_args=())
def value_out(o_lat: torch.Tensor, kv_b: torch.Tensor, nope: int) -> torch.Tensor:
    """o_lat [B, H, rank] (attention over the latent cache), kv_b [H * (nope + v), rank] -> [B, H * v]: the values'
    rows of kv_b applied per head (``einsum("bhr,hvr->bhv")`` of the plain path)."""
    b, h, rank = o_lat.shape
    vdim = kv_b.shape[0] // h - nope
    out = torch.empty(b, h * vdim, dtype=o_lat.dtype, device=o_lat.device)
    block_v = min(vdim, 16)
    launch.launch(_value_out_kernel, (b, h, vdim // block_v), o_lat.contiguous(), kv_b, out, H=h, R=rank, NOPE=nope,
                  V=vdim, BLOCK_V=block_v, num_warps=4, **launch.pdl_args(o_lat))
    return out


@value_out.register_fake
def _(o_lat, kv_b, nope):
    b, h, _ = o_lat.shape
    return o_lat.new_empty(b, kv_b.shape[0] - h * nope)

