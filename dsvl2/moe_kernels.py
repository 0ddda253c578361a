"""The MoE block of a decode step (up to ``kernels.MAX_DECODE_TOKENS`` tokens) in three Triton kernels, batch
invariant: a token's result is the same bits alone or in any batch (launched and tested as ``kernels`` describes).

1. router: float32 gate logits, one program per (token, expert); each token's last program to finish takes the
   softmax and the top k, and the last token to finish groups the (token, slot) pairs by expert into a table;
2. gate‖up and 3. down: one program per (group, block of rows of the weight). Groups are the experts that received
   pairs, then the shared MLP as expert-wide slices, each a group holding every token. A program loads its block of
   weights once and runs its group's pairs one after the other, each with the arithmetic a lone token gets: each
   expert's weights are read once per step however many tokens chose it, and no sum mixes two tokens.

The grids have a fixed size for a number of tokens (the most groups there can be); unused programs do nothing.
"""

from __future__ import annotations

import torch

from . import kernels
from .kernels import MAX_DECODE_TOKENS, gdc_launch_dependents, gdc_wait, launch, triton

if triton is not None:
    import triton.language as tl

    from .kernels import rms_norm_row, tile_dot

# Block sizes (BLOCK_N, num_warps) of the expert kernels: whole rows of the weights in registers (D wide for gate‖up,
# the expert width for down). Down's from the sweep in benchmarks/profile_decode.py (H100); gate‖up's not yet
# measured (benchmarks/decode_kernels.py --sweep).
GATE_UP_CONFIG = (4, 4)
DOWN_CONFIG = (8, 4)
ROUTER_BLOCK_E = 1
# The tensor-core expert kernels (``kernels.CUDA_CORE_ROWS``): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
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

    @triton.jit(do_not_specialize=["n_tokens"])
    def _moe_gate_up_kernel(x_ptr, w13_ptr, sgu_ptr, table_ptr, h_ptr, n_tokens, D: tl.constexpr,
                            D_PAD: tl.constexpr, HID: tl.constexpr, E: tl.constexpr, K_TOP: tl.constexpr,
                            N_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
        # Program (g, j): hidden units [j * BLOCK_N, (j + 1) * BLOCK_N) of group g, for each of its pairs in turn:
        # h[token, slot] = silu(x[token] . gate rows) * (x[token] . up rows), rounded as the plain MLP rounds.
        # Group g < N_SHARED is the shared MLP's slice g (its gate rows [g*I, (g+1)*I) and the matching up rows)
        # with every token; group N_SHARED + i is the table's group i.
        g = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, D_PAD)
        tile = n[:, None] * D + k[None, :]
        mask = (n < HID)[:, None] & (k < D)[None, :]
        shared = g < N_SHARED
        if shared:  # constants: fetched before waiting for the router
            w_gate = sgu_ptr + g.to(tl.int64) * (HID * D)
            gate = tl.load(w_gate + tile, mask=mask, other=0.0)
            up = tl.load(w_gate + N_SHARED * HID * D + tile, mask=mask, other=0.0)
            if USE_PDL:
                gdc_wait()
                gdc_launch_dependents()
            first = n_tokens * 0
            count = n_tokens
        else:
            if USE_PDL:  # the expert comes from the router's table
                gdc_wait()
                gdc_launch_dependents()
            i = g - N_SHARED
            used = i < tl.load(table_ptr)
            e = tl.load(table_ptr + 1 + i, mask=used, other=0).to(tl.int64)
            first = tl.load(table_ptr + 1 + E + i, mask=used, other=0)
            count = tl.load(table_ptr + 1 + 2 * E + i, mask=used, other=0) - first
            live = mask & (n < tl.where(used, HID, 0))[:, None]  # an unused program's block is empty
            w_gate = w13_ptr + e * (2 * HID * D)
            gate = tl.load(w_gate + tile, mask=live, other=0.0)
            up = tl.load(w_gate + HID * D + tile, mask=live, other=0.0)
        dtype = h_ptr.dtype.element_ty
        for q in range(count):
            if shared:
                token = q
                slot = K_TOP + g
            else:
                pair = tl.load(table_ptr + 1 + 3 * E + first + q)
                token = pair // K_TOP
                slot = pair % K_TOP
            xk = tl.load(x_ptr + token * D + k, mask=k < D, other=0.0).to(tl.float32)
            g_r = tl.sum(gate.to(tl.float32) * xk[None, :], axis=1).to(dtype).to(tl.float32)
            u_r = tl.sum(up.to(tl.float32) * xk[None, :], axis=1).to(dtype).to(tl.float32)
            act = (g_r / (1.0 + tl.exp(-g_r))).to(dtype).to(tl.float32)
            tl.store(h_ptr + (token * (K_TOP + N_SHARED) + slot) * HID + n, (act * u_r).to(dtype), mask=n < HID)

    @triton.jit(do_not_specialize=["n_tokens"])
    def _moe_down_kernel(h_ptr, w2_ptr, sd_ptr, table_ptr, wt_ptr, y_ptr, n_tokens, D: tl.constexpr,
                         HID: tl.constexpr, HID_PAD: tl.constexpr, E: tl.constexpr, K_TOP: tl.constexpr,
                         N_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
        # Program (g, j): outputs [j * BLOCK_N, (j + 1) * BLOCK_N) of group g (as in gate‖up) for each of its pairs:
        # y[token, slot] is a routed slot's bf16 output times its routing weight, a shared slot's partial (float32)
        # product over its slice of the shared MLP's hidden units.
        g = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, HID_PAD)
        mask_n = n < D
        mask = mask_n[:, None] & (k < HID)[None, :]
        shared = g < N_SHARED
        if shared:
            w = tl.load(sd_ptr + n[:, None] * (N_SHARED * HID) + g * HID + k[None, :], mask=mask, other=0.0)
            first = n_tokens * 0
            count = n_tokens
        else:
            # With PDL this runs before the wait: the router finished before any gate‖up program passed its wait,
            # and this kernel launches only after all of them have, so the table is final. It is read from L2
            # (".cg"), past any stale L1 line.
            i = g - N_SHARED
            used = i < tl.load(table_ptr, cache_modifier=".cg")
            e = tl.load(table_ptr + 1 + i, mask=used, other=0, cache_modifier=".cg").to(tl.int64)
            first = tl.load(table_ptr + 1 + E + i, mask=used, other=0, cache_modifier=".cg")
            count = tl.load(table_ptr + 1 + 2 * E + i, mask=used, other=0, cache_modifier=".cg") - first
            live = mask & (n < tl.where(used, D, 0))[:, None]  # an unused program's block is empty
            w = tl.load(w2_ptr + e * (D * HID) + n[:, None] * HID + k[None, :], mask=live, other=0.0)
        if USE_PDL:  # the block's whole rows are fetched before waiting for h
            gdc_wait()
            gdc_launch_dependents()
        for q in range(count):
            if shared:
                token = q
                slot = K_TOP + g
            else:
                pair = tl.load(table_ptr + 1 + 3 * E + first + q, cache_modifier=".cg")
                token = pair // K_TOP
                slot = pair % K_TOP
            row = token * (K_TOP + N_SHARED) + slot
            hk = tl.load(h_ptr + row * HID + k, mask=k < HID, other=0.0).to(tl.float32)
            acc = tl.sum(w.to(tl.float32) * hk[None, :], axis=1)
            if g >= N_SHARED:
                acc = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * tl.load(wt_ptr + token * K_TOP + slot)
            tl.store(y_ptr + row * D + n, acc, mask=mask_n)


    @triton.jit
    def _group_rows(table_ptr, g, n_tokens, E: tl.constexpr, K_TOP: tl.constexpr, N_SHARED: tl.constexpr):
        # Group g's pairs: (weight offset of its expert or shared slice in units of that expert's matrices,
        # shared or not, where its pairs start in the table's pair list, how many). Shared groups hold every token.
        shared = g < N_SHARED
        i = tl.where(shared, 0, g - N_SHARED)
        used = (i < tl.load(table_ptr, cache_modifier=".cg")) & (g >= N_SHARED)
        e = tl.load(table_ptr + 1 + i, mask=used, other=0, cache_modifier=".cg").to(tl.int64)
        first = tl.load(table_ptr + 1 + E + i, mask=used, other=0, cache_modifier=".cg")
        end = tl.load(table_ptr + 1 + 2 * E + i, mask=used, other=0, cache_modifier=".cg")
        count = tl.where(shared, n_tokens, end - first)
        return tl.where(shared, g.to(tl.int64), e), shared, first, count

    @triton.jit
    def _pair_rows(table_ptr, q, count, g, first, E: tl.constexpr, K_TOP: tl.constexpr, N_SHARED: tl.constexpr):
        # The (token, slot) of pairs q (< count) of group g (a shared group's q-th token, in slot K_TOP + g).
        routed = g >= N_SHARED
        pair = tl.load(table_ptr + 1 + 3 * E + first + q, mask=q < tl.where(routed, count, 0), other=0,
                       cache_modifier=".cg")
        token = tl.where(routed, pair // K_TOP, q)
        slot = tl.where(routed, pair % K_TOP, K_TOP + g)
        return token, slot

    @triton.jit
    def _gate_up_out(acc_g, acc_u, h_ptr, rows, valid, n, HID: tl.constexpr):
        # h[rows] = silu(gate) * up, rounded as the plain MLP rounds.
        dtype = h_ptr.dtype.element_ty
        g_r = acc_g.to(dtype).to(tl.float32)
        act = (g_r / (1.0 + tl.exp(-g_r))).to(dtype).to(tl.float32)
        out = (act * acc_u.to(dtype).to(tl.float32)).to(dtype)
        tl.store(h_ptr + rows[:, None] * HID + n[None, :], out, mask=valid[:, None] & (n < HID)[None, :])

    @triton.jit(do_not_specialize=["n_tokens"])
    def _moe_gate_up_mma_kernel(x_ptr, w13_ptr, sgu_ptr, table_ptr, h_ptr, n_tokens, D: tl.constexpr,
                                HID: tl.constexpr, E: tl.constexpr, K_TOP: tl.constexpr, N_SHARED: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                FP32_DOT: tl.constexpr, USE_PDL: tl.constexpr):
        # ``_moe_gate_up_kernel`` on tensor cores, as ``kernels._mm_kernel`` computes: program (g, j) holds its
        # group's pairs (at most 4 tiles of BLOCK_M: a token chooses an expert once) and multiplies each step's
        # gate and up tiles into each tile of pairs present.
        g = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        which, shared, first, count = _group_rows(table_ptr, g, n_tokens, E, K_TOP, N_SHARED)
        if count > 0:
            w_gate = tl.where(shared, sgu_ptr + which * (HID * D), w13_ptr + which * (2 * HID * D))
            w_up = w_gate + tl.where(shared, N_SHARED * HID * D, HID * D)
            q = tl.arange(0, BLOCK_M)
            t0, s0 = _pair_rows(table_ptr, q, count, g, first, E, K_TOP, N_SHARED)
            t1, s1 = _pair_rows(table_ptr, q + BLOCK_M, count, g, first, E, K_TOP, N_SHARED)
            t2, s2 = _pair_rows(table_ptr, q + 2 * BLOCK_M, count, g, first, E, K_TOP, N_SHARED)
            t3, s3 = _pair_rows(table_ptr, q + 3 * BLOCK_M, count, g, first, E, K_TOP, N_SHARED)
            g0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            u0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            g1, u1, g2, u2, g3, u3 = g0, u0, g0, u0, g0, u0
            for k0 in range(0, D, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                mask_w = (n < HID)[:, None] & (k < D)[None, :]
                gate = tl.trans(tl.load(w_gate + n[:, None] * D + k[None, :], mask=mask_w, other=0.0))
                up = tl.trans(tl.load(w_up + n[:, None] * D + k[None, :], mask=mask_w, other=0.0))
                g0 = tile_dot(g0, x_ptr, t0 * D, q < count, k, D, gate, FP32_DOT)
                u0 = tile_dot(u0, x_ptr, t0 * D, q < count, k, D, up, FP32_DOT)
                if count > BLOCK_M:
                    g1 = tile_dot(g1, x_ptr, t1 * D, q + BLOCK_M < count, k, D, gate, FP32_DOT)
                    u1 = tile_dot(u1, x_ptr, t1 * D, q + BLOCK_M < count, k, D, up, FP32_DOT)
                if count > 2 * BLOCK_M:
                    g2 = tile_dot(g2, x_ptr, t2 * D, q + 2 * BLOCK_M < count, k, D, gate, FP32_DOT)
                    u2 = tile_dot(u2, x_ptr, t2 * D, q + 2 * BLOCK_M < count, k, D, up, FP32_DOT)
                if count > 3 * BLOCK_M:
                    g3 = tile_dot(g3, x_ptr, t3 * D, q + 3 * BLOCK_M < count, k, D, gate, FP32_DOT)
                    u3 = tile_dot(u3, x_ptr, t3 * D, q + 3 * BLOCK_M < count, k, D, up, FP32_DOT)
            slots = K_TOP + N_SHARED
            _gate_up_out(g0, u0, h_ptr, t0 * slots + s0, q < count, n, HID)
            _gate_up_out(g1, u1, h_ptr, t1 * slots + s1, q + BLOCK_M < count, n, HID)
            _gate_up_out(g2, u2, h_ptr, t2 * slots + s2, q + 2 * BLOCK_M < count, n, HID)
            _gate_up_out(g3, u3, h_ptr, t3 * slots + s3, q + 3 * BLOCK_M < count, n, HID)

    @triton.jit
    def _down_out(acc, y_ptr, wt_ptr, token, slot, valid, n, routed, D: tl.constexpr, K_TOP: tl.constexpr,
                  N_SHARED: tl.constexpr, dtype: tl.constexpr):
        # y[token, slot]: a routed slot's output rounded to the model's dtype times its routing weight; a shared
        # slice's float32 partial sum.
        if routed:
            wt = tl.load(wt_ptr + token * K_TOP + slot, mask=valid, other=0.0)
            acc = acc.to(dtype).to(tl.float32) * wt[:, None]
        rows = token * (K_TOP + N_SHARED) + slot
        tl.store(y_ptr + rows[:, None] * D + n[None, :], acc, mask=valid[:, None] & (n < D)[None, :])

    @triton.jit(do_not_specialize=["n_tokens"])
    def _moe_down_mma_kernel(h_ptr, w2_ptr, sd_ptr, table_ptr, wt_ptr, y_ptr, n_tokens, D: tl.constexpr,
                             HID: tl.constexpr, E: tl.constexpr, K_TOP: tl.constexpr, N_SHARED: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             FP32_DOT: tl.constexpr, USE_PDL: tl.constexpr):
        # ``_moe_down_kernel`` on tensor cores, tiled as ``_moe_gate_up_mma_kernel``; its group is read before the
        # wait, as ``_moe_down_kernel`` explains.
        g = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        which, shared, first, count = _group_rows(table_ptr, g, n_tokens, E, K_TOP, N_SHARED)
        # A shared slice's columns of the shared down matrix [D, N_SHARED * HID]; an expert's own [D, HID].
        w_base = tl.where(shared, sd_ptr + which * HID, w2_ptr + which * (D * HID))
        stride = tl.where(shared, N_SHARED * HID, HID)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        if count > 0:
            w_rows = w_base + n[:, None] * stride
            q = tl.arange(0, BLOCK_M)
            slots = K_TOP + N_SHARED
            t0, s0 = _pair_rows(table_ptr, q, count, g, first, E, K_TOP, N_SHARED)
            t1, s1 = _pair_rows(table_ptr, q + BLOCK_M, count, g, first, E, K_TOP, N_SHARED)
            t2, s2 = _pair_rows(table_ptr, q + 2 * BLOCK_M, count, g, first, E, K_TOP, N_SHARED)
            t3, s3 = _pair_rows(table_ptr, q + 3 * BLOCK_M, count, g, first, E, K_TOP, N_SHARED)
            acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc1, acc2, acc3 = acc0, acc0, acc0
            for k0 in range(0, HID, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                w = tl.trans(tl.load(w_rows + k[None, :], mask=(n < D)[:, None] & (k < HID)[None, :], other=0.0))
                acc0 = tile_dot(acc0, h_ptr, (t0 * slots + s0) * HID, q < count, k, HID, w, FP32_DOT)
                if count > BLOCK_M:
                    acc1 = tile_dot(acc1, h_ptr, (t1 * slots + s1) * HID, q + BLOCK_M < count, k, HID, w, FP32_DOT)
                if count > 2 * BLOCK_M:
                    acc2 = tile_dot(acc2, h_ptr, (t2 * slots + s2) * HID, q + 2 * BLOCK_M < count, k, HID, w,
                                    FP32_DOT)
                if count > 3 * BLOCK_M:
                    acc3 = tile_dot(acc3, h_ptr, (t3 * slots + s3) * HID, q + 3 * BLOCK_M < count, k, HID, w,
                                    FP32_DOT)
            routed = g >= N_SHARED
            dtype = h_ptr.dtype.element_ty
            _down_out(acc0, y_ptr, wt_ptr, t0, s0, q < count, n, routed, D, K_TOP, N_SHARED, dtype)
            _down_out(acc1, y_ptr, wt_ptr, t1, s1, q + BLOCK_M < count, n, routed, D, K_TOP, N_SHARED, dtype)
            _down_out(acc2, y_ptr, wt_ptr, t2, s2, q + 2 * BLOCK_M < count, n, routed, D, K_TOP, N_SHARED, dtype)
            _down_out(acc3, y_ptr, wt_ptr, t3, s3, q + 3 * BLOCK_M < count, n, routed, D, K_TOP, N_SHARED, dtype)


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
    pdl = kernels._pdl_args(x)
    norm = a is not None
    res, xn = (torch.empty_like(x), torch.empty_like(x)) if norm else (None, x)
    logits = torch.empty(n, e, dtype=torch.float32, device=x.device)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=x.device)
    wts = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    table = torch.empty(1 + 3 * e + 2 * n * top_k, dtype=torch.int32, device=x.device)
    counter = _route_counter(x.device)
    launch(_router_kernel, (n, triton.cdiv(e, ROUTER_BLOCK_E)),
           x, a.contiguous() if norm else x, norm_w if norm else x, eps, res if norm else x, xn, gate_w, logits,
           counter, counter[MAX_DECODE_TOKENS:], ids, wts, table, n, D=d, E=e, E_PAD=triton.next_power_of_2(e),
           K_TOP=top_k, BLOCK_E=ROUTER_BLOCK_E, D_PAD=triton.next_power_of_2(d),
           P_PAD=triton.next_power_of_2(n * top_k), ONE_TOKEN=n == 1, NORM=norm, num_warps=4, **pdl)
    groups = n_shared + min(e, n * top_k)  # the most there can be
    h = torch.empty(n * slots, hid, dtype=x.dtype, device=x.device)
    y = torch.empty(n, slots, d, dtype=torch.float32, device=x.device)
    if kernels.tensor_cores(n):
        fp32_dot, smem = kernels.fp32_dot(x), kernels.shared_memory_of(x)
        bm, bn, bk, nw, ns = kernels.mma_tiles(GATE_UP_MMA_CONFIG, d, x.element_size(), smem)
        launch(_moe_gate_up_mma_kernel, (groups, triton.cdiv(hid, bn)), xn, w13, shared_gate_up, table, h, n, D=d,
               HID=hid, E=e, K_TOP=top_k, N_SHARED=n_shared, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FP32_DOT=fp32_dot,
               num_warps=nw, num_stages=ns, **pdl)
        bm, bn, bk, nw, ns = kernels.mma_tiles(DOWN_MMA_CONFIG, hid, x.element_size(), smem)
        launch(_moe_down_mma_kernel, (groups, triton.cdiv(d, bn)), h, w2, shared_down, table, wts, y, n, D=d,
               HID=hid, E=e, K_TOP=top_k, N_SHARED=n_shared, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FP32_DOT=fp32_dot,
               num_warps=nw, num_stages=ns, **pdl)
        return res, y
    bn, nw = GATE_UP_CONFIG
    launch(_moe_gate_up_kernel, (groups, triton.cdiv(hid, bn)), xn, w13, shared_gate_up, table, h, n, D=d,
           D_PAD=triton.next_power_of_2(d), HID=hid, E=e, K_TOP=top_k, N_SHARED=n_shared, BLOCK_N=bn, num_warps=nw,
           **pdl)
    bn, nw = DOWN_CONFIG
    launch(_moe_down_kernel, (groups, triton.cdiv(d, bn)), h, w2, shared_down, table, wts, y, n, D=d, HID=hid,
           HID_PAD=triton.next_power_of_2(hid), E=e, K_TOP=top_k, N_SHARED=n_shared, BLOCK_N=bn, num_warps=nw, **pdl)
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
