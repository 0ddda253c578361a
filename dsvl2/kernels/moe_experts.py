"""The expert kernels of the decode MoE block (``moe``): gate‖up and down, one program per (group, block of rows of
the weight), each group's pairs run one after the other with the arithmetic a lone token gets. Two variants of each:
on CUDA cores (whole rows of the weights in registers) and on tensor cores (``_mma``: the group's pairs in up to four
tiles of BLOCK_M rows, as ``linear._mm_kernel`` computes), chosen by ``launch.tensor_cores``.

Groups are the experts that received pairs (the router's table), then the shared MLP as expert-wide slices, each a
group holding every token; unused programs do nothing.
"""

from __future__ import annotations

from .launch import gdc_launch_dependents, gdc_wait, tile_dot, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def swiglu(gate, up, dtype: tl.constexpr):
        # silu(gate) * up from float32 sums, rounded as the plain MLP rounds: each product to dtype, the
        # activation to dtype, their product to dtype. -> dtype
        g = gate.to(dtype).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        return (act * up.to(dtype).to(tl.float32)).to(dtype)

    @triton.jit(do_not_specialize=["n_tokens"])
    def gate_up_kernel(x_ptr, w13_ptr, sgu_ptr, table_ptr, h_ptr, n_tokens, D: tl.constexpr,
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
            out = swiglu(tl.sum(gate.to(tl.float32) * xk[None, :], axis=1),
                         tl.sum(up.to(tl.float32) * xk[None, :], axis=1), dtype)
            tl.store(h_ptr + (token * (K_TOP + N_SHARED) + slot) * HID + n, out, mask=n < HID)

    @triton.jit(do_not_specialize=["n_tokens"])
    def down_kernel(h_ptr, w2_ptr, sd_ptr, table_ptr, wt_ptr, y_ptr, n_tokens, D: tl.constexpr,
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
    def _group_rows(table_ptr, g, n_tokens, E: tl.constexpr, N_SHARED: tl.constexpr):
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
        # h[rows] = silu(gate) * up (``swiglu``).
        out = swiglu(acc_g, acc_u, h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * HID + n[None, :], out, mask=valid[:, None] & (n < HID)[None, :])

    @triton.jit(do_not_specialize=["n_tokens"])
    def gate_up_mma_kernel(x_ptr, w13_ptr, sgu_ptr, table_ptr, h_ptr, n_tokens, D: tl.constexpr,
                           HID: tl.constexpr, E: tl.constexpr, K_TOP: tl.constexpr, N_SHARED: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           FP32_DOT: tl.constexpr, USE_PDL: tl.constexpr):
        # ``gate_up_kernel`` on tensor cores, as ``linear._mm_kernel`` computes: program (g, j) holds its
        # group's pairs (at most 4 tiles of BLOCK_M: a token chooses an expert once) and multiplies each step's
        # gate and up tiles into each tile of pairs present.
        g = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        which, shared, first, count = _group_rows(table_ptr, g, n_tokens, E, N_SHARED)
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
    def down_mma_kernel(h_ptr, w2_ptr, sd_ptr, table_ptr, wt_ptr, y_ptr, n_tokens, D: tl.constexpr,
                        HID: tl.constexpr, E: tl.constexpr, K_TOP: tl.constexpr, N_SHARED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FP32_DOT: tl.constexpr, USE_PDL: tl.constexpr):
        # ``down_kernel`` on tensor cores, tiled as ``gate_up_mma_kernel``; its group is read before the
        # wait, as ``down_kernel`` explains.
        g = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        which, shared, first, count = _group_rows(table_ptr, g, n_tokens, E, N_SHARED)
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
