"""What every decode kernel shares: how it is launched and fitted to the GPU.

- ``launch``: every kernel launch goes through it;
- programmatic dependent launch (``PDL``, ``use_pdl``, ``pdl_args``) on Hopper and later, and the grid-dependency
  calls (``gdc_wait``, ``gdc_launch_dependents``) that the kernels import by name from here;
- the batch-invariant choice between tensor cores and CUDA cores (``CUDA_CORE_ROWS``, ``tensor_cores``);
- the tensor-core helpers ``dot`` and ``tile_dot`` (Triton functions: a kernel that calls them imports them by name)
  and the fitting of their tiles to the GPU's shared memory (``mma_tiles``, ``shared_memory_of``).
"""

from __future__ import annotations

import os

import torch

from .. import gpus

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


def interpreted() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1: the CPU tests), where there is no GPU to fit."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: every kernel of this package launches through here."""
    kernel[grid](*args, **kwargs)


# Programmatic dependent launch (Hopper and later): each kernel here is launched so that it may start while
# the previous kernel finishes. Everything before its gdc_wait() reads only weights (constants), so a kernel's
# weight loads and launch overlap its predecessor's tail; everything after it sees the predecessor's writes.
# Each kernel then calls gdc_launch_dependents() so that the next one may launch early in turn.
# Process-wide: set by the engine at construction (``set_pdl``, from ``EngineConfig.pdl``).
PDL = True
_pdl_devices: dict[torch.device, bool] = {}


def set_pdl(on: bool) -> None:
    """Launch with programmatic dependent launch where the GPU and Triton support it (on), or never."""
    global PDL
    PDL = on


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
    if not PDL or not x.is_cuda or interpreted():
        return False
    if x.device not in _pdl_devices:
        _pdl_devices[x.device] = sm90_or_later(x.device) and _launch_pdl_supported()
    return _pdl_devices[x.device]


def pdl_args(x: torch.Tensor) -> dict:
    """The launch keywords: the kernel's USE_PDL flag and, when on, Triton's launch option."""
    on = use_pdl(x)
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


MAX_DECODE_TOKENS = 64  # rows of a decode step the kernels take (the engine's largest batch)
# The matrix products of a decode step (linear layers, experts) run on tensor cores (``_mm_kernel``, the MoE's ``_mma``
# kernels), batch invariant at every batch size. Steps of at most CUDA_CORE_ROWS rows run on CUDA cores instead
# (``_gemv_kernel``, the MoE's row-loop kernels): 0 when batch invariant (the default); 1 otherwise, where a lone row
# decodes 7 % faster (BENCHMARKS.md, session 8) but its tokens then differ from those it gets beside other rows.
# Process-wide: set by the engine at construction (``set_batch_invariant``, from ``EngineConfig.batch_invariant``).
CUDA_CORE_ROWS = 0


def set_batch_invariant(invariant: bool) -> None:
    global CUDA_CORE_ROWS
    CUDA_CORE_ROWS = 0 if invariant else 1


def tensor_cores(rows: int) -> bool:
    """Whether a decode step of ``rows`` rows takes the tensor-core kernels (see CUDA_CORE_ROWS)."""
    return rows > CUDA_CORE_ROWS


if triton is not None:

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


def fp32_dot(x: torch.Tensor) -> bool:
    """The ``dot`` helper's FP32_DOT for operands like x: float32 ones, and all under Triton's interpreter."""
    return x.dtype == torch.float32 or interpreted()


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
    return gpus.shared_memory_optin(x.device) if x.is_cuda and not interpreted() else None
