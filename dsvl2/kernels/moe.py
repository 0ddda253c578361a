"""The MoE block of a decode step (up to ``launch.MAX_DECODE_TOKENS`` tokens) in three Triton kernels, batch
invariant: a token's result is the same bits alone or in any batch (launched as ``launch`` describes).

1. router: float32 gate logits, one program per (token, expert); each token's last program to finish takes the
   softmax and the top k, and the last token to finish groups the (token, slot) pairs by expert into a table;
2. gate‖up and 3. down: one program per (group, block of rows of the weight). Groups are the experts that received
   pairs, then the shared MLP as expert-wide slices, each a group holding every token. A program loads its block of
   weights once and runs its group's pairs one after the other, each with the arithmetic a lone token gets: each
   expert's weights are read once per step however many tokens chose it, and no sum mixes two tokens.

The grids have a fixed size for a number of tokens (the most groups there can be); unused programs do nothing.

The router is here, the expert kernels in ``moe_experts``; the two custom operators (each with its fake beside it)
launch all three.
"""

from __future__ import annotations

import torch

from . import launch, moe_experts
from .launch import MAX_DECODE_TOKENS, gdc_launch_dependents, gdc_wait, triton

if triton is not None:
    import triton.language as tl

    from .norm import rms_norm_row


# Block sizes (BLOCK_N, num_warps) of the expert kernels: whole rows of the weights in registers (D wide for gate‖up,
# the expert width for down). Down's from the sweep in benchmarks/profile_decode.py (H100); gate‖up's not yet
# measured (benchmarks/decode_kernels.py --sweep).
GATE_UP_CONFIG = (4, 4)
DOWN_CONFIG = (8, 4)
ROUTER_BLOCK_E = 1
# The tensor-core expert kernels (``launch.CUDA_CORE_ROWS``): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
# Untuned: benchmarks/decode_kernels.py --sweep.
GATE_UP_MMA_CONFIG = (16, 32, 128, 4, 4)
DOWN_MMA_CONFIG = (16, 32, 128, 4, 4)

MAX_WIDTH = 2048  # the widest rows (hidden size, expert width) a program holds whole

# The router's table of groups (int32): [0] the number of routed groups G; for g < G, [1 + g] the expert of group g,
# [1 + E + g] and [1 + 2E + g] where its pairs start and end in the pair list; from [1 + 3E] the pair list: token * K
# + slot, grouped by expert, in pair order within a group; then the sorted pairs' experts (the grouping's scratch).

if triton is not None:

    @triton.jit
    def _group_pairs(ids_ptr, table_ptr, n_pairs, E: tl.constexpr, P_PAD: tl.constexpr):
        # The pairs (ids[pair] is the pair's expert) sorted by (expert, pair), and the sorted list cut where the
        # expert changes; the sorted experts go through memory (after the pair list) to meet their neighbours.
        i = tl.arange(0, P_PAD)
        valid = i < n_pairs
        e = tl.load(ids_ptr + i, mask=valid, other=0, cache_modifier=".cg")
        key = tl.sort(tl.where(valid, e, E) * P_PAD + i)  # padding last
        pairs = table_ptr + 1 + 3 * E
        expert = key // P_PAD
        tl.store(pairs + i, key % P_PAD, mask=valid)
        tl.store(pairs + n_pairs + i, expert, mask=valid)
        tl.debug_barrier()  # every thread's stores before any reads a neighbour's
        prev = tl.load(pairs + n_pairs + i - 1, mask=valid & (i > 0), other=-1, cache_modifier=".cg")
        nxt = tl.load(pairs + n_pairs + i + 1, mask=i + 1 < n_pairs, other=-1, cache_modifier=".cg")
        start = valid & (expert != prev)
        group = tl.cumsum(start.to(tl.int32), axis=0) - 1  # the group of each sorted pair
        tl.store(table_ptr + 1 + group, expert, mask=start)
        tl.store(table_ptr + 1 + E + group, i, mask=start)
        tl.store(table_ptr + 1 + 2 * E + group, i + 1, mask=valid & (expert != nxt))
        tl.store(table_ptr, tl.sum(start.to(tl.int32), axis=0))

    @triton.jit(do_not_specialize=["n_tokens"])
    def _router_kernel(x_ptr, a_ptr, nw_ptr, eps, res_ptr, xn_ptr, w_ptr, logits_ptr, count_ptr, done_ptr, ids_ptr,
                       wt_ptr, table_ptr, n_tokens, D: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                       K_TOP: tl.constexpr, BLOCK_E: tl.constexpr, D_PAD: tl.constexpr, P_PAD: tl.constexpr,
                       ONE_TOKEN: tl.constexpr, NORM: tl.constexpr, USE_PDL: tl.constexpr):
        # Gate logits in float32 for one token and a block of experts; the token's last program to finish
        # takes the softmax over all experts and the top K (weights not renormalised), then resets the count.
        # With NORM the input is the layer's residual stream x and attention output a: each program computes
        # res = x + a and xn = RMSNorm(res) itself (as the plain path rounds them), and the token's first
        # program stores both for the expert kernels and the residual add.
        # The table: one token's pairs are its slots, one expert each (written with the top k); with more, the
        # last token to finish sorts them all (done_ptr counts the tokens; it too is reset).
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
            xk = rms_norm_row(res, tl.load(nw_ptr + k, mask=mask_k, other=0.0).to(tl.float32), eps, D, dtype)
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
                if ONE_TOKEN:
                    tl.store(table_ptr + 1 + j, idx)
                    tl.store(table_ptr + 1 + E + j, j)
                    tl.store(table_ptr + 1 + 2 * E + j, j + 1)
                    tl.store(table_ptr + 1 + 3 * E + j, j)
                p = tl.where(ea == idx, -1.0, p)
            tl.store(count_ptr + t, 0)
            if ONE_TOKEN:
                tl.store(table_ptr, K_TOP)
            else:
                tl.debug_barrier()  # this program's stores of ids, all its threads', before the release below
                if tl.atomic_add(done_ptr, 1, sem="acq_rel") == n_tokens - 1:
                    _group_pairs(ids_ptr, table_ptr, n_tokens * K_TOP, E, P_PAD)
                    tl.store(done_ptr, 0)


_route_counters: dict[torch.device, torch.Tensor] = {}


def moe_decode_ok(n_tokens: int, dim: int, hidden: int) -> bool:
    """Shapes the fused decode MoE handles: up to MAX_DECODE_TOKENS tokens, rows it can hold whole."""
    return triton is not None and n_tokens <= MAX_DECODE_TOKENS and dim <= MAX_WIDTH and hidden <= MAX_WIDTH


def _route_counter(device: torch.device) -> torch.Tensor:
    """Per-token arrival counts of the router's programs, then the count of tokens done; every launch leaves them
    at zero again."""
    if device not in _route_counters:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("run the fused MoE once before capturing it in a CUDA graph")
        _route_counters[device] = torch.zeros(MAX_DECODE_TOKENS + 1, dtype=torch.int32, device=device)
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
    pdl = launch.pdl_args(x)
    norm = a is not None
    res, xn = (torch.empty_like(x), torch.empty_like(x)) if norm else (None, x)
    logits = torch.empty(n, e, dtype=torch.float32, device=x.device)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=x.device)
    wts = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    table = torch.empty(1 + 3 * e + 2 * n * top_k, dtype=torch.int32, device=x.device)
    counter = _route_counter(x.device)
    launch.launch(_router_kernel, (n, triton.cdiv(e, ROUTER_BLOCK_E)),
                  x, a.contiguous() if norm else x, norm_w if norm else x, eps, res if norm else x, xn, gate_w, logits,
                  counter, counter[MAX_DECODE_TOKENS:], ids, wts, table, n, D=d, E=e, E_PAD=triton.next_power_of_2(e),
                  K_TOP=top_k, BLOCK_E=ROUTER_BLOCK_E, D_PAD=triton.next_power_of_2(d),
                  P_PAD=triton.next_power_of_2(n * top_k), ONE_TOKEN=n == 1, NORM=norm, num_warps=4, **pdl)
    groups = n_shared + min(e, n * top_k)  # the most there can be
    h = torch.empty(n * slots, hid, dtype=x.dtype, device=x.device)
    y = torch.empty(n, slots, d, dtype=torch.float32, device=x.device)
    if launch.tensor_cores(n):
        fp32_dot, smem = launch.fp32_dot(x), launch.shared_memory_of(x)
        held = 4 * min(GATE_UP_MMA_CONFIG[0], DOWN_MMA_CONFIG[0])  # a group's pairs (at most n) in four tiles
        if n > held:
            raise ValueError(f"{n} tokens: the expert kernels hold at most {held} (four tiles of BLOCK_M rows)")
        bm, bn, bk, nw, ns = launch.mma_tiles(GATE_UP_MMA_CONFIG, d, x.element_size(), smem)
        launch.launch(moe_experts.gate_up_mma_kernel, (groups, triton.cdiv(hid, bn)), xn, w13, shared_gate_up, table,
                      h, n, D=d, HID=hid, E=e, K_TOP=top_k, N_SHARED=n_shared, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                      FP32_DOT=fp32_dot, num_warps=nw, num_stages=ns, **pdl)
        bm, bn, bk, nw, ns = launch.mma_tiles(DOWN_MMA_CONFIG, hid, x.element_size(), smem)
        launch.launch(moe_experts.down_mma_kernel, (groups, triton.cdiv(d, bn)), h, w2, shared_down, table, wts, y,
                      n, D=d, HID=hid, E=e, K_TOP=top_k, N_SHARED=n_shared, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                      FP32_DOT=fp32_dot, num_warps=nw, num_stages=ns, **pdl)
        return res, y
    bn, nw = GATE_UP_CONFIG
    launch.launch(moe_experts.gate_up_kernel, (groups, triton.cdiv(hid, bn)), xn, w13, shared_gate_up, table, h, n,
                  D=d, D_PAD=triton.next_power_of_2(d), HID=hid, E=e, K_TOP=top_k, N_SHARED=n_shared, BLOCK_N=bn,
                  num_warps=nw, **pdl)
    bn, nw = DOWN_CONFIG
    launch.launch(moe_experts.down_kernel, (groups, triton.cdiv(d, bn)), h, w2, shared_down, table, wts, y, n, D=d,
                  HID=hid, HID_PAD=triton.next_power_of_2(hid), E=e, K_TOP=top_k, N_SHARED=n_shared, BLOCK_N=bn,
                  num_warps=nw, **pdl)
    return res, y


@torch.library.custom_op("dsvl2::moe_decode", mutates_args=())
def moe_decode(x: torch.Tensor, gate_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, shared_gate_up: torch.Tensor,
               shared_down: torch.Tensor, top_k: int) -> torch.Tensor:
    """The whole MoE block of up to MAX_DECODE_TOKENS tokens in three kernels: routing (float32 gate logits, softmax,
    top-k, pairs grouped by expert), then the routed and shared experts (the shared ones as expert-wide slices of
    the shared MLP).

    x [N, D] -> y [N, top_k + n_shared, D] float32: rows < top_k are weighted bf16 routed outputs, the rest
    partial sums of the shared MLP; ``MoE`` adds them up.
    """
    return _moe_block(x, None, None, 0.0, gate_w, w13, w2, shared_gate_up, shared_down, top_k)[1]


@moe_decode.register_fake
def _(x, gate_w, w13, w2, shared_gate_up, shared_down, top_k):
    return x.new_empty(x.shape[0], _moe_slots(top_k, w2, shared_down), x.shape[1], dtype=torch.float32)


@torch.library.custom_op("dsvl2::moe_decode_residual", mutates_args=())
def moe_decode_residual(x: torch.Tensor, a: torch.Tensor, norm_w: torch.Tensor, eps: float, gate_w: torch.Tensor,
                        w13: torch.Tensor, w2: torch.Tensor, shared_gate_up: torch.Tensor, shared_down: torch.Tensor,
                        top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_decode`` of RMSNorm(x + a) (weight norm_w), the residual add and the norm done in the router kernel:
    x, a [N, D] -> (x + a [N, D], y as ``moe_decode``). The decoder layer adds the experts to x + a."""
    return _moe_block(x, a, norm_w, eps, gate_w, w13, w2, shared_gate_up, shared_down, top_k)


@moe_decode_residual.register_fake
def _(x, a, norm_w, eps, gate_w, w13, w2, shared_gate_up, shared_down, top_k):
    y = x.new_empty(x.shape[0], _moe_slots(top_k, w2, shared_down), x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), y
