"""Triton kernels for decode time: a handful of tokens (CUDA; the tests run them through Triton's interpreter
on the CPU and compare each with the plain PyTorch code it replaces).

At batch 1 a decode step is a matter of reading weights once, so every kernel here is a matrix-vector product
or a reduction laid out for memory bandwidth, reading straight from the model's tensors (no gather copies, no
host synchronisation, fixed launch shapes for CUDA graphs):

- ``moe_decode``: a whole MoE block in three launches: float32 router logits (the last program to finish takes
  softmax and top-k), then gate‖up and down over the token's 6 chosen experts and the 2 shared-expert halves;
- ``mla_prologue``, ``latent_attention`` and ``value_out``: MLA decode over the compressed cache: the query
  absorbed into the latent space (with both rotary parts and the token's cache row in the same kernel), attention
  split over positions up to each row's own position (flash-decoding) and merged by a second kernel, then the
  values' rows of kv_b;
- ``gemv``: the q‖kv_a and o_proj products.

On Hopper they launch with programmatic dependent launch (see ``PDL``).

They are all registered as ``torch.library`` custom operators, so that ``torch.compile`` keeps each
decoder layer one graph around them. Every launch goes through ``launch``, so that ``precompile`` can compile
the kernels a piece of code would launch, side by side, before it first runs (the service's warm-up).
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

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
    """Whether a CUDA device is Hopper (sm90) or later."""
    return torch.cuda.get_device_capability(device)[0] >= 9


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


# Block sizes of the expert kernels (BLOCK_N, BLOCK_K, num_warps), chosen by benchmarks/profile_decode.py on an H100.
GATE_UP_CONFIG = (8, 512, 2)
DOWN_CONFIG = (16, 128, 8)
DOWN_PDL_CONFIG = (8, 4)  # BLOCK_N, num_warps of the whole-row variant launched with PDL (profile_decode.py sweep)


if triton is not None:

    @triton.jit
    def _router_kernel(x_ptr, a_ptr, nw_ptr, eps, res_ptr, xn_ptr, w_ptr, logits_ptr, count_ptr, ids_ptr, wt_ptr,
                       D: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, K_TOP: tl.constexpr,
                       BLOCK_E: tl.constexpr, D_PAD: tl.constexpr, NORM: tl.constexpr, USE_PDL: tl.constexpr):
        # Gate logits in float32 for one token and a block of experts; the token's last program to finish
        # takes the softmax over all experts and the top K (weights not renormalised), then resets the count.
        # With NORM the input is the layer's residual stream x and attention output a: each program computes
        # res = x + a and xn = RMSNorm(res) itself (as the plain path rounds them), and the token's first
        # program stores both for the expert kernels and the residual add.
        t = tl.program_id(0)
        eb = tl.program_id(1)
        e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = e < E
        k = tl.arange(0, D_PAD)
        mask_k = k < D
        w = tl.load(w_ptr + e[:, None] * D + k[None, :], mask=mask_e[:, None] & mask_k[None, :], other=0.0)
        if USE_PDL:  # the gate rows are constants: fetched before waiting for the input
            gdc_wait()
            gdc_launch_dependents()
        if NORM:
            dtype = x_ptr.dtype.element_ty
            xa = tl.load(x_ptr + t * D + k, mask=mask_k, other=0.0).to(tl.float32)
            res = (xa + tl.load(a_ptr + t * D + k, mask=mask_k, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            normed = (res * tl.math.rsqrt(tl.sum(res * res, axis=0) / D + eps)).to(dtype).to(tl.float32)
            xk = (normed * tl.load(nw_ptr + k, mask=mask_k, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            if eb == 0:
                tl.store(res_ptr + t * D + k, res.to(dtype), mask=mask_k)
                tl.store(xn_ptr + t * D + k, xk.to(dtype), mask=mask_k)
        else:
            xk = tl.load(x_ptr + t * D + k, mask=mask_k, other=0.0).to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * xk[None, :], axis=1)
        tl.store(logits_ptr + t * E + e, acc, mask=mask_e)
        finished = tl.atomic_add(count_ptr + t, 1, sem="acq_rel")  # orders the stores above before it
        if finished == tl.num_programs(1) - 1:
            ea = tl.arange(0, E_PAD)
            mask_a = ea < E
            logits = tl.load(logits_ptr + t * E + ea, mask=mask_a, other=float("-inf"), cache_modifier=".cg")
            p = tl.exp(logits - tl.max(logits, axis=0))
            p = tl.where(mask_a, p / tl.sum(p, axis=0), -1.0)
            for j in tl.static_range(K_TOP):
                best = tl.max(p, axis=0)
                idx = tl.min(tl.where(p == best, ea, E_PAD), axis=0)
                tl.store(ids_ptr + t * K_TOP + j, idx)
                tl.store(wt_ptr + t * K_TOP + j, best)
                p = tl.where(ea == idx, -1.0, p)
            tl.store(count_ptr + t, 0)

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, w13_ptr, sgu_ptr, ids_ptr, h_ptr, D: tl.constexpr, HID: tl.constexpr,
                            K_TOP: tl.constexpr, N_SHARED: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        # Slot s of a token: s < K_TOP is its s-th routed expert, the rest are the shared experts, each an
        # expert-wide slice of the shared MLP (its gate rows [j*I, (j+1)*I) and the matching up rows).
        if USE_PDL:  # the expert ids come from the router
            gdc_wait()
            gdc_launch_dependents()
        pair = tl.program_id(0)
        token = pair // (K_TOP + N_SHARED)
        slot = pair % (K_TOP + N_SHARED)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < HID
        if slot < K_TOP:
            e = tl.load(ids_ptr + token * K_TOP + slot).to(tl.int64)
            w_gate = w13_ptr + e * (2 * HID * D)
            w_up = w_gate + HID * D
        else:
            w_gate = sgu_ptr + (slot - K_TOP).to(tl.int64) * (HID * D)
            w_up = w_gate + N_SHARED * HID * D
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + token * D + k).to(tl.float32)
            g = tl.load(w_gate + n[:, None] * D + k[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            u = tl.load(w_up + n[:, None] * D + k[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            acc_g += tl.sum(g * xk[None, :], axis=1)
            acc_u += tl.sum(u * xk[None, :], axis=1)
        g_r = acc_g.to(h_ptr.dtype.element_ty).to(tl.float32)
        u_r = acc_u.to(h_ptr.dtype.element_ty).to(tl.float32)
        act = (g_r / (1.0 + tl.exp(-g_r))).to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + pair * HID + n, (act * u_r).to(h_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _moe_down_kernel(h_ptr, w2_ptr, sd_ptr, ids_ptr, wt_ptr, y_ptr, D: tl.constexpr, HID: tl.constexpr,
                         K_TOP: tl.constexpr, N_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         USE_PDL: tl.constexpr):
        # y[token, slot, n]: a routed slot's bf16 output times its routing weight; a shared slot's partial
        # (float32) product over its slice of the shared MLP's hidden units.
        pair = tl.program_id(0)
        token = pair // (K_TOP + N_SHARED)
        slot = pair % (K_TOP + N_SHARED)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < D
        routed = slot < K_TOP
        r_slot = token * K_TOP + tl.minimum(slot, K_TOP - 1)
        # With PDL this runs before the wait: the router finished before any gate‖up program passed its wait,
        # and this kernel launches only after all of them have, so the expert ids are final. They are read
        # from L2 (".cg"), past any stale L1 line.
        if routed:
            e = tl.load(ids_ptr + r_slot, cache_modifier=".cg").to(tl.int64)
            rows = w2_ptr + e * (D * HID) + n[:, None] * HID
        else:
            rows = sd_ptr + n[:, None] * (N_SHARED * HID) + (slot - K_TOP) * HID
        if USE_PDL:  # this program's whole rows (BLOCK_K >= HID) are fetched before waiting for h
            k = tl.arange(0, BLOCK_K)
            mask_k = k < HID
            w = tl.load(rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            gdc_wait()
            gdc_launch_dependents()
            hk = tl.load(h_ptr + pair * HID + k, mask=mask_k, other=0.0).to(tl.float32)
            acc = tl.sum(w.to(tl.float32) * hk[None, :], axis=1)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, HID, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                mask_k = k < HID
                hk = tl.load(h_ptr + pair * HID + k, mask=mask_k, other=0.0).to(tl.float32)
                w = tl.load(rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * hk[None, :], axis=1)
        weighted = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * tl.load(wt_ptr + r_slot)
        tl.store(y_ptr + pair * D + n, tl.where(routed, weighted, acc), mask=mask_n)


ROUTER_BLOCK_E = 1
MAX_DECODE_TOKENS = 64
_route_counters: dict[torch.device, torch.Tensor] = {}


def moe_decode_ok(n_tokens: int, top_k: int, dim: int) -> bool:
    """Shapes the fused decode MoE handles: a few tokens, the hidden size a multiple of the blocks."""
    return triton is not None and n_tokens * top_k <= MAX_DECODE_TOKENS and dim % 512 == 0


def _route_counter(device: torch.device) -> torch.Tensor:
    """Per-token arrival counts of the router's programs; every launch leaves them at zero again."""
    if device not in _route_counters:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("run the fused MoE once before capturing it in a CUDA graph")
        _route_counters[device] = torch.zeros(MAX_DECODE_TOKENS, dtype=torch.int32, device=device)
    return _route_counters[device]


def _moe_slots(top_k: int, w2: torch.Tensor, shared_down: torch.Tensor) -> int:
    """Slots per token: the chosen experts, then the shared MLP in expert-wide slices."""
    return top_k + shared_down.shape[1] // w2.shape[2]


def _moe_block(x: torch.Tensor, a: torch.Tensor | None, norm_w: torch.Tensor | None, eps: float, gate_w: torch.Tensor,
               w13: torch.Tensor, w2: torch.Tensor, shared_gate_up: torch.Tensor, shared_down: torch.Tensor,
               top_k: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The three launches of ``moe_decode`` and ``moe_decode_residual`` -> (x + a or None, slot outputs)."""
    n, d = x.shape
    e, hid = w13.shape[0], w2.shape[2]
    slots = _moe_slots(top_k, w2, shared_down)
    n_shared = slots - top_k
    x = x.contiguous()
    pdl = _pdl_args(x)
    norm = a is not None
    res, xn = (torch.empty_like(x), torch.empty_like(x)) if norm else (None, x)
    logits = torch.empty(n, e, dtype=torch.float32, device=x.device)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=x.device)
    wts = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    launch(_router_kernel, (n, triton.cdiv(e, ROUTER_BLOCK_E)),
           x, a.contiguous() if norm else x, norm_w if norm else x, eps, res if norm else x, xn, gate_w, logits,
           _route_counter(x.device), ids, wts, D=d, E=e, E_PAD=triton.next_power_of_2(e), K_TOP=top_k,
           BLOCK_E=ROUTER_BLOCK_E, D_PAD=triton.next_power_of_2(d), NORM=norm, num_warps=4, **pdl)
    h = torch.empty(n * slots, hid, dtype=x.dtype, device=x.device)
    bn, bk, nw = GATE_UP_CONFIG
    launch(_moe_gate_up_kernel, (n * slots, triton.cdiv(hid, bn)),
           xn, w13, shared_gate_up, ids, h, D=d, HID=hid, K_TOP=top_k, N_SHARED=n_shared, BLOCK_N=bn, BLOCK_K=bk,
           num_warps=nw, **pdl)
    y = torch.empty(n, slots, d, dtype=torch.float32, device=x.device)
    bn, bk, nw = DOWN_CONFIG
    if pdl["USE_PDL"]:
        bn, nw = DOWN_PDL_CONFIG
        bk = triton.next_power_of_2(hid)
    launch(_moe_down_kernel, (n * slots, triton.cdiv(d, bn)),
           h, w2, shared_down, ids, wts, y, D=d, HID=hid, K_TOP=top_k, N_SHARED=n_shared, BLOCK_N=bn, BLOCK_K=bk,
           num_warps=nw, **pdl)
    return res, y


@torch.library.custom_op("dsvl2::moe_decode", mutates_args=())  # opaque to torch.compile: see the end
def moe_decode(x: torch.Tensor, gate_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, shared_gate_up: torch.Tensor,
               shared_down: torch.Tensor, top_k: int) -> torch.Tensor:
    """The whole MoE block of a few tokens in three kernels: routing (float32 gate logits, softmax, top-k), then
    the routed and shared experts side by side (the shared ones as expert-wide slices of the shared MLP).

    x [N, D] -> y [N, top_k + n_shared, D] float32: rows < top_k are weighted bf16 routed outputs, the rest
    partial sums of the shared MLP; ``y[:, :k].sum(1)`` and ``y[:, k:].sum(1)`` are what ``MoE`` adds.
    """
    return _moe_block(x, None, None, 0.0, gate_w, w13, w2, shared_gate_up, shared_down, top_k)[1]


@torch.library.custom_op("dsvl2::moe_decode_residual", mutates_args=())
def moe_decode_residual(x: torch.Tensor, a: torch.Tensor, norm_w: torch.Tensor, eps: float, gate_w: torch.Tensor,
                        w13: torch.Tensor, w2: torch.Tensor, shared_gate_up: torch.Tensor, shared_down: torch.Tensor,
                        top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_decode`` of RMSNorm(x + a) (weight norm_w), the residual add and the norm done in the router kernel:
    x, a [N, D] -> (x + a [N, D], y as ``moe_decode``). The decoder layer adds the experts to x + a."""
    return _moe_block(x, a, norm_w, eps, gate_w, w13, w2, shared_gate_up, shared_down, top_k)


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


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, NOUT: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        # y[t, n] = bf16(sum_k x[t, k] w[n, k]) for a block of output rows n of token t (float32 accumulation).
        t = tl.program_id(1)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < NOUT
        if USE_PDL:  # the program's whole rows (BLOCK_K >= K) are fetched before waiting for x
            k = tl.arange(0, BLOCK_K)
            mask = mask_n[:, None] & (k < K)[None, :]
            w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=mask, other=0.0)
            gdc_wait()
            gdc_launch_dependents()
            xk = tl.load(x_ptr + t * K + k, mask=k < K, other=0.0).to(tl.float32)
            acc = tl.sum(w.to(tl.float32) * xk[None, :], axis=1)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                mask = mask_n[:, None] & (k < K)[None, :]
                xk = tl.load(x_ptr + t * K + k, mask=k < K, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=mask, other=0.0)
                acc += tl.sum(w.to(tl.float32) * xk[None, :], axis=1)
        tl.store(y_ptr + t * NOUT + n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


GEMV_CONFIG = (4, 512, 1)  # BLOCK_N, BLOCK_K, num_warps: from the sweep in benchmarks/profile_decode.py (H100)
GEMV_PDL_CONFIG = (2, 2)  # BLOCK_N, num_warps of the whole-row variant launched with PDL (sweep as above)


def gemv_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """A few rows (decode) times a weight of at most 4096 inputs: the matrix-vector kernel."""
    return available(x) and x.numel() // x.shape[-1] <= 8 and w.shape[1] <= 4096


@torch.library.custom_op("dsvl2::gemv", mutates_args=())
def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for a few rows: x [..., K], w [N, K] contiguous -> [..., N] in x's dtype."""
    k = x.shape[-1]
    rows = x.numel() // k
    y = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    pdl = _pdl_args(x)
    if pdl["USE_PDL"]:
        bn, nw = GEMV_PDL_CONFIG
        bk = triton.next_power_of_2(k)
    else:
        bn, bk, nw = GEMV_CONFIG
    launch(_gemv_kernel, (triton.cdiv(w.shape[0], bn), rows), x.contiguous(), w, y, NOUT=w.shape[0], K=k, BLOCK_N=bn,
           BLOCK_K=bk, num_warps=nw, **pdl)
    return y


# The decode-time kernels are registered as custom operators, so torch.compile keeps each decoder layer one
# graph around them (the element-wise code between them fuses) instead of breaking the graph at every launch;
# these fake implementations give the compiler their output shapes.


@moe_decode.register_fake
def _(x, gate_w, w13, w2, shared_gate_up, shared_down, top_k):
    return x.new_empty(x.shape[0], _moe_slots(top_k, w2, shared_down), x.shape[1], dtype=torch.float32)


@moe_decode_residual.register_fake
def _(x, a, norm_w, eps, gate_w, w13, w2, shared_gate_up, shared_down, top_k):
    y = x.new_empty(x.shape[0], _moe_slots(top_k, w2, shared_down), x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), y


@mla_prologue.register_fake
def _(qkv, cos_sin, norm_w, eps, kv_b, cache, pos, heads, nope, rope):
    b = qkv.shape[0]
    return qkv.new_empty(b, heads, kv_b.shape[1]), qkv.new_empty(b, heads, rope)


@latent_attention.register_fake
def _(q_lat, q_rope, cache, pos, scale):
    return torch.empty_like(q_lat)


@value_out.register_fake
def _(o_lat, kv_b, nope):
    b, h, _ = o_lat.shape
    return o_lat.new_empty(b, kv_b.shape[0] - h * nope)


@gemv.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])
