"""A Triton grouped matrix product for the prefill's routed experts (CUDA; the tests run it through Triton's
interpreter on the CPU and compare it with a loop over the experts).

At prefill every expert gets ~134 of the 1428 x 6 sorted token-expert rows, and all 64 experts' weights are read
once per layer (1.1 GB, ≈ 0.37 ms at 3 TB/s): the product is bound by reading the weights from HBM. So the
schedule keeps each expert's weights in L2 while they are used: programs run expert by expert, then by block
of output columns, the row tiles fastest, so the few hundred programs in flight work on 1-3 experts, each weight
block is fetched from HBM once and re-read from L2 by that expert's row tiles, and the expert's input rows
(≈ 0.5 MB) stay in L2 across its column blocks. The tile schedule is computed on the device from ``offs``
(no host synchronisation: the launch has a fixed upper bound of programs, those past the real tiles return).

With ``silu_pairs`` the gate‖up product also applies the SwiGLU in its epilogue (each program takes matching gate
and up columns), so the [M, 2I] product never reaches memory.

Registered as a ``torch.library`` custom operator, like the decode kernels.
"""

from __future__ import annotations

import torch

from .. import gpus
from . import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: grouped_experts keeps torch._grouped_mm
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no Triton, or one without host-side tensor descriptors: pointer loads
    TensorDescriptor = None

# Per call site: BLOCK_M rows of a tile, BLOCK_N output columns (gate‖up: half gate, half up), BLOCK_K reduction
# step, warps, pipeline stages, and whether tiles are loaded through tensor descriptors (TMA; Hopper and later,
# else pointer loads). From the sweep of benchmarks/grouped_gemm.py on an H100 (2026-11-25: gate‖up 314 µs,
# down 172 µs per layer; 64 x 128 tiles with 4 warps 342 and 179 µs), which may override these entries.
CONFIGS: dict[str, dict[str, int | bool]] = {
    "gate_up": {"block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 4, "tma": True},
    "down": {"block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 4, "tma": True},
}


def _site(silu_pairs: bool) -> str:
    """The call site whose default config a product uses: gate‖up (with the SwiGLU) or down."""
    return "gate_up" if silu_pairs else "down"


if triton is not None:

    @triton.jit
    def _rounded(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        # float32 v rounded to dtype (to nearest even), as float32. Triton's interpreter truncates float32 ->
        # bfloat16 casts, so there the rounding is done on the bits (finite values).
        if INTERPRET and dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        else:
            return v.to(dtype).to(tl.float32)

    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, offs_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, E: tl.constexpr,
                           E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SILU_PAIRS: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr):
        # The tile schedule, from the groups' end rows: expert e owns tiles_e = cdiv(count_e, BLOCK_M) row tiles
        # times NB column blocks, the programs [before_e, before_e + tiles_e * NB) in launch order, the row
        # tile fastest. Empty experts own no program.
        NB: tl.constexpr = N // BLOCK_N
        pid = tl.program_id(0)
        idx = tl.arange(0, E_PAD)
        ends = tl.load(offs_ptr + idx, mask=idx < E, other=0)
        starts = tl.load(offs_ptr + idx - 1, mask=(idx > 0) & (idx < E), other=0)
        tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
        through = tl.cumsum(tiles, axis=0) * NB  # programs of experts 0..e
        e = tl.sum((through <= pid).to(tl.int32), axis=0)  # the first expert whose programs reach past pid
        if e >= E:  # past the last tile: the grid is an upper bound
            return
        mine = idx == e
        tiles_e = tl.sum(tl.where(mine, tiles, 0), axis=0)
        local = pid - tl.sum(tl.where(mine, through, 0), axis=0) + tiles_e * NB
        n_block = local // tiles_e
        m_tile = local % tiles_e
        row0 = tl.sum(tl.where(mine, starts, 0), axis=0) + m_tile * BLOCK_M
        end = tl.sum(tl.where(mine, ends, 0), axis=0)

        r = tl.arange(0, BLOCK_M)
        mask_r = row0 + r < end  # rows past the group belong to the next expert (or to no one)
        kk = tl.arange(0, BLOCK_K)
        HID: tl.constexpr = N // 2
        HALF: tl.constexpr = BLOCK_N // 2
        # Weight rows of this program: gate rows c and up rows HID + c with SILU_PAIRS, else rows c.
        COLS: tl.constexpr = HALF if SILU_PAIRS else BLOCK_N
        c = n_block * COLS + tl.arange(0, COLS)
        if TMA:  # x_ptr, w_ptr: descriptors of x [M, K] and w [E * N, K]; x rows past M read as zeros
            w_row = e * N + n_block * COLS
        else:
            x_tile = x_ptr + row0.to(tl.int64) * K + r[:, None] * K + kk[None, :]
            w_tile = w_ptr + e.to(tl.int64) * (N * K) + c[None, :] * K + kk[:, None]  # [BLOCK_K, COLS]: w[e, c]^T
        acc = tl.zeros([BLOCK_M, COLS], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, COLS], dtype=tl.float32)  # the up half (SILU_PAIRS)
        for k0 in range(0, K, BLOCK_K):
            if TMA:  # other experts' rows past the group: their products are not stored
                a = x_ptr.load([row0, k0])
                b = w_ptr.load([w_row, k0]).T
            else:
                a = tl.load(x_tile + k0, mask=mask_r[:, None], other=0.0)
                b = tl.load(w_tile + k0)
            if INTERPRET:  # the interpreter's dot multiplies bf16's raw bits: exact float32 products instead
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            if SILU_PAIRS:
                if TMA:
                    u = w_ptr.load([w_row + HID, k0]).T
                else:
                    u = tl.load(w_tile + HID * K + k0)
                if INTERPRET:
                    u = u.to(tl.float32)
                acc_u = tl.dot(a, u, acc_u)
        dtype = out_ptr.dtype.element_ty
        if SILU_PAIRS:
            # Rounded as the plain path: gate and up to the dtype, silu(gate) in float32 and rounded
            # (F.silu), then the product in float32 and rounded.
            g_r = _rounded(acc, dtype, INTERPRET)
            u_r = _rounded(acc_u, dtype, INTERPRET)
            act = _rounded(g_r / (1.0 + tl.exp(-g_r)), dtype, INTERPRET)
            out = _rounded(act * u_r, dtype, INTERPRET).to(dtype)
            OUT_N: tl.constexpr = HID
        else:
            out = _rounded(acc, dtype, INTERPRET).to(dtype)
            OUT_N: tl.constexpr = N
        out_tile = out_ptr + row0.to(tl.int64) * OUT_N + r[:, None] * OUT_N + c[None, :]
        tl.store(out_tile, out, mask=mask_r[:, None])


def _tma_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the tiles can be loaded by the tensor memory accelerator: Hopper or later (or the interpreter),
    16-byte aligned rows."""
    if TensorDescriptor is None or x.data_ptr() % 16 or w.data_ptr() % 16 or (x.shape[1] * x.element_size()) % 16:
        return False
    return launch.interpreted() or (x.is_cuda and _hopper(x))


def _config(silu_pairs: bool, overrides: dict[str, int | bool | None]) -> dict[str, int | bool]:
    """The call site's defaults (CONFIGS), with the caller's non-None keywords instead."""
    cfg = dict(CONFIGS[_site(silu_pairs)])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def grouped_mm_ok(x: torch.Tensor, w: torch.Tensor, *, silu_pairs: bool = False) -> bool:
    """Whether ``grouped_mm`` runs for input rows like x (device, dtype) and the stacked weights w [E, N, K] with
    the call site's default blocks: CUDA (see ``launch.available``) with Triton, bf16 or fp16, N, K multiples
    of the blocks (the kernel does not mask columns or the reduction), and the blocks' pipeline fitting in the
    GPU's shared memory (an H100/H200, not an A100 or L40S: ``gpus``)."""
    cfg = CONFIGS[_site(silu_pairs)]
    return (launch.available(x) and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and w.dim() == 3 and w.is_contiguous() and w.shape[2] % cfg["block_k"] == 0
            and w.shape[1] % cfg["block_n"] == 0 and cfg["block_n"] % 2 == 0
            and (launch.interpreted() or shared_memory(cfg, x.dtype.itemsize) <= gpus.shared_memory_optin(x.device)))


def shared_memory(cfg: dict[str, int | bool], element_size: int) -> int:
    """Bytes of shared memory the config's main loop pipelines: num_stages buffers of an x tile [BLOCK_M, BLOCK_K]
    and a weight tile [BLOCK_N, BLOCK_K] (gate and up halves together). Triton adds a little (barriers, the
    epilogue's layout conversion reuses these buffers) and decides the real figure at compile time; the default
    tiles need 192 KB: an H100/H200 (227 KB) launches them, an A100 (163 KB) or L40S (99 KB) could not."""
    return (cfg["block_m"] + cfg["block_n"]) * cfg["block_k"] * element_size * cfg["num_stages"]


def _hopper(x: torch.Tensor) -> bool:
    """Whether x's GPU is sm90 or later (or the interpreter runs the kernel): tiles through the TMA."""
    return launch.interpreted() or launch.sm90_or_later(x.device)


@torch.library.custom_op("dsvl2::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, *, silu_pairs: bool = False,
               block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None, tma: bool | None = None) -> torch.Tensor:
    """Rows of x sorted by expert, each through its expert's matrix: the product of
    ``torch._grouped_mm(x, w.transpose(1, 2), offs=offs)``.

    x [M, K], w [E, N, K] (nn.Linear layout per expert, contiguous), offs [E] int32: the end row of each
    expert's group (cumulative; offs[-1] <= M) -> out [M, N] in x's dtype, out[r] = x[r] @ w[e(r)].T with float32
    accumulation. With ``silu_pairs`` (N = 2I: gate rows then up rows) -> [M, I] = silu(gate) * up, rounded as
    the plain path. Rows from offs[-1] on are not written. Block sizes, warps, stages and the TMA switch default
    to ``CONFIGS`` of the call site. On the GPU, bf16/fp16 (float32 operands would be multiplied as TF32).
    """
    cfg = _config(silu_pairs, {"block_m": block_m, "block_n": block_n, "block_k": block_k,
                               "num_warps": num_warps, "num_stages": num_stages, "tma": tma})
    m, k = x.shape
    e, n, _ = w.shape
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    if w.shape[2] != k or n % bn or k % bk or (silu_pairs and bn % 2) or not w.is_contiguous():
        raise ValueError(f"grouped_mm: x {tuple(x.shape)}, w {tuple(w.shape)} (contiguous: {w.is_contiguous()}) "
                         f"and blocks {bn}x{bk} don't fit")
    out = torch.empty(m, n // 2 if silu_pairs else n, dtype=x.dtype, device=x.device)
    if m == 0:  # no rows (a descriptor can't have an empty dimension)
        return out
    # Tiles: sum_e cdiv(count_e, bm) < cdiv(M, bm) + E, each times the column blocks.
    grid = ((triton.cdiv(m, bm) + e) * (n // bn),)
    x = x.contiguous()
    use_tma = bool(cfg["tma"]) and _tma_ok(x, w)
    if use_tma:
        cols = bn // 2 if silu_pairs else bn
        x_arg = TensorDescriptor(x, [m, k], [k, 1], [bm, bk])
        w_arg = TensorDescriptor(w, [e * n, k], [k, 1], [cols, bk])
    else:
        x_arg, w_arg = x, w
    launch.launch(_grouped_mm_kernel, grid, x_arg, w_arg, offs.contiguous(), out, N=n, K=k, E=e,
                  E_PAD=triton.next_power_of_2(e), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SILU_PAIRS=silu_pairs,
                  TMA=use_tma, INTERPRET=launch.interpreted(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


@grouped_mm.register_fake
def _(x, w, offs, *, silu_pairs=False, block_m=None, block_n=None, block_k=None, num_warps=None, num_stages=None,
      tma=None):
    n = w.shape[1]
    return x.new_empty(x.shape[0], n // 2 if silu_pairs else n)
