"""Triton kernels for decode time: one token per row, up to ``MAX_DECODE_TOKENS`` rows (CUDA; the tests run them
through Triton's interpreter on the CPU and compare each with the plain PyTorch code it replaces).

A decode step is a matter of reading weights, so every kernel here is a matrix-vector product or a reduction laid
out for memory bandwidth, reading straight from the model's tensors (no gather copies, no host synchronisation,
fixed launch shapes for CUDA graphs). Each is batch invariant: a row's bits are the same whether it runs alone or
among other rows, because every row is computed by the same code in programs of its own (or, where a program
serves several rows, by the same operations one row after the other), with block sizes chosen from the weights'
shapes, never from the number of rows:

- ``mla_prologue``, ``latent_attention`` and ``value_out``: MLA decode over the compressed cache: the query
  absorbed into the latent space (with both rotary parts and the token's cache row in the same kernel), attention
  split over positions up to each row's own position (flash-decoding) and merged by a second kernel, then the
  values' rows of kv_b;
- ``gemv``: every other linear layer of a step (q‖kv_a, o_proj, the dense MLP, lm_head): a program reads its block
  of weight rows once and applies it to every row;
- ``rms_norm``: the decoder's RMSNorms, one program per row;
- the MoE block is in ``moe_kernels``.

On Hopper they launch with programmatic dependent launch (see ``PDL``).

They are all registered as ``torch.library`` custom operators, each with a fake implementation beside it (its
output shapes), so that ``torch.compile`` keeps each decoder layer one graph around them (the element-wise code
between them fuses) instead of breaking the graph at every launch. Every launch goes through ``launch``, so that
``precompile`` can compile the kernels a piece of code would launch, side by side, before it first runs (the
service's warm-up).
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from . import gpus

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the grouped path is used instead
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: the kernels launch the ordinary way
    gdc_launch_dependents = gdc_wait = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# Set (in one thread) by ``precompile``: the launches that thread makes are collected instead of run.
_COLLECTED: contextvars.ContextVar[list | None] = contextvars.ContextVar("dsvl2_collected_launches", default=None)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``precompile``'s ``run`` the launch is only recorded, so that the
    kernel can be compiled for exactly these arguments without running."""
    collected = _COLLECTED.get()
    if collected is None:
        kernel[grid](*args, **kwargs)
    else:
        collected.append((kernel, grid, args, kwargs))


def precompile(run: Callable[[], object], device: torch.device, workers: int = 8) -> int:
    """Compile, side by side in a pool of threads, every Triton kernel that ``run()`` launches, for the
    arguments it launches them with (Triton specialises on dtypes, alignments and integer values), and load
    each onto ``device``; the kernels do not run. Triton compiles a kernel on its first launch, in the
    launching thread and one at a time, with a ptxas and a C compiler run (its launcher) each: seconds apiece,
    on the service's start-up path. Compiled here, the first launch finds them in Triton's cache.
    ``run`` executes PyTorch operations for real (on whatever data it is given). -> kernels compiled."""
    collected: list = []
    token = _COLLECTED.set(collected)
    try:
        run()
    finally:
        _COLLECTED.reset(token)
    jobs = list({_launch_key(*job): job for job in collected}.values())
    try:  # Triton's cache key hashes its own library (500 MB): once here rather than in every thread at once
        from triton.runtime.cache import triton_key

        triton_key()
    except Exception:  # noqa: BLE001 - a Triton without it (or the interpreter's stand-in) hashes on its own
        pass
    init = None
    if device.type == "cuda":  # Triton compiles for, and loads onto, the thread's current device
        index = device.index if device.index is not None else torch.cuda.current_device()
        init = functools.partial(torch.cuda.set_device, index)
    with ThreadPoolExecutor(min(workers, max(len(jobs), 1)), initializer=init,
                            thread_name_prefix="dsvl2-triton") as pool:
        list(pool.map(_compile_launch, jobs))
    return len(jobs)


def _launch_key(kernel, grid, args, kwargs) -> tuple:
    """What a launch's compiled kernel depends on, for skipping repeats: tensors by dtype, strides and alignment,
    everything else by value (a superset of Triton's specialisation, so distinct compilations stay distinct)."""
    def part(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.dtype, a.dim(), a.stride(), a.data_ptr() % 16)
        if isinstance(a, (bool, int, float, str, type(None))):
            return a
        return ("object", id(a))  # e.g. a tensor descriptor: never merged
    return (kernel, tuple(part(a) for a in args), tuple(sorted((k, part(v)) for k, v in kwargs.items())))


def _compile_launch(job: tuple) -> None:
    kernel, grid, args, kwargs = job
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    # Loading the binary and building the launcher (a C compiler run) otherwise happen at the first launch.
    getattr(compiled, "run", None)


# Programmatic dependent launch (Hopper and later): each kernel here is launched so that it may start while
# the previous kernel finishes. Everything before its gdc_wait() reads only weights (constants), so a kernel's
# weight loads and launch overlap its predecessor's tail; everything after it sees the predecessor's writes.
# Each kernel then calls gdc_launch_dependents() so that the next one may launch early in turn.
PDL = os.environ.get("DSVL2_PDL", "1") != "0"
_pdl_devices: dict[torch.device, bool] = {}


def _launch_pdl_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return gdc_wait is not None and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def sm90_or_later(device: torch.device) -> bool:
    """Whether a CUDA device is Hopper (sm90) or later (or emulates one: ``gpus``)."""
    return gpus.capability(device) >= (9, 0)


def use_pdl(x: torch.Tensor) -> bool:
    """Whether the kernels launch with programmatic dependent launch on x's device (sm90+, Triton support)."""
    if not PDL or not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if x.device not in _pdl_devices:
        _pdl_devices[x.device] = sm90_or_later(x.device) and _launch_pdl_supported()
    return _pdl_devices[x.device]


def _pdl_args(x: torch.Tensor) -> dict:
    """The launch keywords: the kernel's USE_PDL flag and, when on, Triton's launch option."""
    on = use_pdl(x)
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


if triton is not None:

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
    launch(_mla_prologue_kernel, (b, heads, rank // block_r),
           qkv.contiguous(), cos_sin.reshape(b, 2, rope).contiguous(), norm_w, kv_b, cache, pos, q_lat, q_rope, eps,
           cache.stride(0), cache.stride(1), H=heads, NOPE=nope, P=rope, R=rank, V=vdim, BLOCK_R=block_r,
           num_warps=4, **_pdl_args(qkv))
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
    pdl = _pdl_args(q_lat)
    acc = torch.empty(b, n_split, h, rank, dtype=torch.float32, device=q_lat.device)
    m = torch.empty(b, n_split, h, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(b, n_split, h, dtype=torch.float32, device=q_lat.device)
    launch(_latent_attention_kernel, (b, n_split),
           q_lat.contiguous(), q_rope.contiguous(), cache, pos, acc, m, lse, cache.stride(0), cache.stride(1), scale,
           H=h, R=rank, P=q_rope.shape[-1], NSPLIT=n_split, BLOCK_S=ATTENTION_BLOCK_S, **pdl)
    out = torch.empty(b, h, rank, dtype=q_lat.dtype, device=q_lat.device)
    block_r = min(rank, 128)
    launch(_attention_combine_kernel, (b, h, rank // block_r), acc, m, lse, out, H=h, R=rank, NSPLIT=n_split,
           BLOCK_R=block_r, **pdl)
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
    launch(_value_out_kernel, (b, h, vdim // block_v), o_lat.contiguous(), kv_b, out, H=h, R=rank, NOPE=nope, V=vdim,
           BLOCK_V=block_v, num_warps=4, **_pdl_args(o_lat))
    return out


@value_out.register_fake
def _(o_lat, kv_b, nope):
    b, h, _ = o_lat.shape
    return o_lat.new_empty(b, kv_b.shape[0] - h * nope)


MAX_DECODE_TOKENS = 64  # rows of a decode step the kernels take (the engine's largest batch)
# The matrix products of a decode step (linear layers, experts) run on tensor cores (``_mm_kernel``, the MoE's ``_mma``
# kernels), batch invariant at every batch size. Steps of at most CUDA_CORE_ROWS rows run on CUDA cores instead
# (``_gemv_kernel``, the MoE's row-loop kernels): 0 when batch invariant (the default); 1 otherwise, where a lone row
# decodes 7 % faster (BENCHMARKS.md, session 8) but its tokens then differ from those it gets beside other rows.
# Process-wide: set by the engine at construction (``set_batch_invariant``).
CUDA_CORE_ROWS = 0


def set_batch_invariant(invariant: bool) -> None:
    global CUDA_CORE_ROWS
    CUDA_CORE_ROWS = 0 if invariant else 1


def tensor_cores(rows: int) -> bool:
    """Whether a decode step of ``rows`` rows takes the tensor-core kernels (see CUDA_CORE_ROWS)."""
    return rows > CUDA_CORE_ROWS


if triton is not None:

    @triton.jit
    def rms_norm_row(x, w, eps, D: tl.constexpr, dtype: tl.constexpr):
        # ``language.RMSNorm`` of one row x (float32, zeros past D) with weight w (float32), rounded as it rounds:
        # the normalised row to dtype, then its product with the weight to dtype. -> float32
        normed = (x * tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)).to(dtype).to(tl.float32)
        return (normed * w).to(dtype).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, eps, D: tl.constexpr, D_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        # One row per program.
        t = tl.program_id(0)
        k = tl.arange(0, D_PAD)
        mask = k < D
        w = tl.load(w_ptr + k, mask=mask, other=0.0).to(tl.float32)  # a constant: fetched before the wait
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        x = tl.load(x_ptr + t * D + k, mask=mask, other=0.0).to(tl.float32)
        y = rms_norm_row(x, w, eps, D, y_ptr.dtype.element_ty)
        tl.store(y_ptr + t * D + k, y.to(y_ptr.dtype.element_ty), mask=mask)

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


    @triton.jit
    def dot(a, b, acc, FP32_DOT: tl.constexpr):
        # acc + a @ b, float32 accumulation; FP32_DOT: the operands widened to float32 and multiplied exactly (no
        # TF32) -- for float32 models, and for Triton's interpreter, whose bfloat16 products are wrong (3.9).
        if FP32_DOT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def tile_dot(acc, x_ptr, offsets, valid, k, K: tl.constexpr, w, FP32_DOT: tl.constexpr):
        # acc + x[rows] @ w for one tile of rows (their element offsets in x; invalid rows read as zeros).
        a = tl.load(x_ptr + offsets[:, None] + k[None, :], mask=valid[:, None] & (k < K)[None, :], other=0.0)
        return dot(a, w, acc, FP32_DOT)

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


def rms_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Rows the RMSNorm kernel takes: CUDA, a row of at most 16384 in one program, the weight in x's dtype."""
    return available(x) and x.shape[-1] <= 16384 and weight.dtype == x.dtype


@torch.library.custom_op("dsvl2::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``language.RMSNorm`` of every row: x [..., D], weight [D] -> [..., D], the same roundings (variance in
    float32, the normalised row to x's dtype, then times the weight). One program per row, so a row's result does
    not depend on the others (a compiled reduction's layout may change with their number)."""
    d = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    launch(_rms_norm_kernel, (x.numel() // d,), x, weight, y, eps, D=d, D_PAD=triton.next_power_of_2(d), num_warps=4,
           **_pdl_args(x))
    return y


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


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


def fp32_dot(x: torch.Tensor) -> bool:
    """The ``dot`` helper's FP32_DOT for operands like x: float32 ones, and all under Triton's interpreter."""
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def mma_tiles(config: tuple[int, int, int, int, int], k: int, itemsize: int,
              shared_memory: int | None) -> tuple[int, int, int, int, int]:
    """A tensor-core kernel's (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a reduction over k of operands of
    ``itemsize`` bytes: BLOCK_K no wider than k needs (at least a tensor-core tile's 16), and halved until the
    pipeline's stages of both operand tiles fit in ``shared_memory`` bytes (``shared_memory_of``), if given."""
    bm, bn, bk, nw, ns = config
    bk = max(16, min(bk, triton.next_power_of_2(k)))
    if shared_memory is not None:
        budget = shared_memory - 8 * 1024  # what Triton keeps for its barriers and layout conversions
        while bk > 16 and ns * (bm + bn) * bk * itemsize > budget:
            bk //= 2
    return bm, bn, bk, nw, ns


def shared_memory_of(x: torch.Tensor) -> int | None:
    """The shared memory a block may use on x's GPU (``gpus``: an L40S 99 KB, an H200 227 KB); None off the GPU."""
    return gpus.shared_memory_optin(x.device) if x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" else None


def gemv_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Up to MAX_DECODE_TOKENS rows of x (CUDA) times a contiguous matrix of x's dtype: the matrix-vector kernel."""
    return (available(x) and x.numel() // x.shape[-1] <= MAX_DECODE_TOKENS and w.dim() == 2 and w.is_contiguous()
            and w.dtype == x.dtype)


@torch.library.custom_op("dsvl2::gemv", mutates_args=())
def gemv(x: torch.Tensor, w: torch.Tensor, float_out: bool = False) -> torch.Tensor:
    """``F.linear(x, w)``, batch invariant: x [..., K] (at most MAX_DECODE_TOKENS rows), w [N, K] contiguous ->
    [..., N] in x's dtype; ``float_out``: the same values as float32 (``.float()`` of it, in the same kernel)."""
    k = x.shape[-1]
    rows = x.numel() // k
    n = w.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32 if float_out else x.dtype, device=x.device)
    pdl = _pdl_args(x)
    if tensor_cores(rows):
        config = MM_WIDE_CONFIG if n >= GEMV_WIDE_N else MM_CONFIG
        bm, bn, bk, nw, ns = mma_tiles(config, k, x.element_size(), shared_memory_of(x))
        launch(_mm_kernel, (triton.cdiv(n, bn),), x.contiguous(), w, y, rows, NOUT=n, K=k, BLOCK_M=bm, BLOCK_N=bn,
               BLOCK_K=bk, FP32_DOT=fp32_dot(x), num_warps=nw, num_stages=ns, **pdl)
        return y
    whole_row, bn, bk, nw = gemv_config(n, k, pdl["USE_PDL"])
    launch(_gemv_kernel, (triton.cdiv(n, bn),), x.contiguous(), w, y, rows, NOUT=n, K=k, BLOCK_N=bn, BLOCK_K=bk,
           WHOLE_ROW=whole_row, ROWS_PAD=MAX_DECODE_TOKENS, num_warps=nw, **pdl)
    return y


@gemv.register_fake
def _(x, w, float_out=False):
    return x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32 if float_out else x.dtype)
