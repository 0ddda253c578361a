"""RMSNorm of a decode step's rows: one program per row, so that a row's result does not depend on the others.
``rms_norm_row`` (a Triton function) is also the router kernel's (``moe``), imported by name there."""

from __future__ import annotations

import torch

from . import launch
from .launch import gdc_launch_dependents, gdc_wait, triton

if triton is not None:
    import triton.language as tl

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


def rms_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Rows the RMSNorm kernel takes: CUDA, a row of at most 16384 in one program, the weight in x's dtype."""
    return launch.available(x) and x.shape[-1] <= 16384 and weight.dtype == x.dtype


@torch.library.custom_op("dsvl2::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``language.RMSNorm`` of every row: x [..., D], weight [D] -> [..., D], the same roundings (variance in
    float32, the normalised row to x's dtype, then times the weight). One program per row, so a row's result does
    not depend on the others (a compiled reduction's layout may change with their number)."""
    d = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    launch.launch(_rms_norm_kernel, (x.numel() // d,), x, weight, y, eps, D=d, D_PAD=triton.next_power_of_2(d),
                  num_warps=4, **launch.pdl_args(x))
    return y


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)
