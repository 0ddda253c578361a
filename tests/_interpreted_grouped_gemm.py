"""Run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1: the prefill's grouped expert product
(``dsvl2.kernels.grouped_gemm``) on the CPU against a loop over the experts and against the torch path of the MoE block,
in float32 (exact up to summation order) and bfloat16. Prints JSON."""

from __future__ import annotations

import itertools
import json
from unittest import mock

import torch
import torch.nn.functional as F

from dsvl2 import kernels
from dsvl2.kernels import grouped_gemm
from dsvl2.model import moe
from dsvl2.model.config import LanguageConfig

torch.manual_seed(0)
results: dict[str, float] = {}
SMALL = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 2}  # several tiles and blocks


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


# 5 experts (not a power of two): an empty group, a group of one row, one of 21 (not a multiple of BLOCK_M) and
# one of 50 (4 row tiles); x has 3 rows more than the groups (rows past offs[-1] are not compared).
sizes = [21, 0, 1, 50, 7]
offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
rows = int(offs[-1])
starts = [0, *offs[:-1].tolist()]
# Tiles loaded through pointers (masked rows) and through tensor descriptors (the tensor memory accelerator's
# loads on Hopper: rows past the group are the next expert's, rows past x's end read as zeros).
for dtype, tma in itertools.product((torch.float32, torch.bfloat16), (False, True)):
    mode = "tma_" if tma else ""
    x = torch.randn(rows + 3, 64).to(dtype)
    w = (0.1 * torch.randn(len(sizes), 96, 64)).to(dtype)  # N = 96: three column blocks, 2I = 96 for the pairs
    # The reference: each expert's rows through its matrix.
    ref = torch.cat([x[s:end] @ w[e].T for e, (s, end) in enumerate(zip(starts, offs.tolist(), strict=True))])
    got = grouped_gemm.grouped_mm(x, w, offs, **SMALL, tma=tma)
    results[f"grouped_mm_{mode}{dtype}"] = rel(got[:rows], ref)
    # SwiGLU epilogue vs the torch composition on the rounded product: gate and up rounded, F.silu, product.
    gate, up = ref.split(48, dim=-1)
    ref_h = F.silu(gate) * up
    got_h = grouped_gemm.grouped_mm(x, w, offs, silu_pairs=True, **SMALL, tma=tma)
    results[f"grouped_mm_silu_{mode}{dtype}"] = rel(got_h[:rows], ref_h)
    if dtype == torch.bfloat16:  # rounded as the plain path: equal but where the summation order moves a
        # product across a rounding boundary
        results[f"grouped_mm_silu_{mode}bfloat16_equal"] = (got_h[:rows] == ref_h).float().mean().item()

# Default blocks only where the shapes are multiples of them; the decision follows kernels.launch.available.
results["grouped_mm_ok_cpu"] = float(grouped_gemm.grouped_mm_ok(x, w))
with mock.patch.object(kernels.launch, "available", lambda t: True):
    big = torch.zeros(4, 256, 128, dtype=torch.bfloat16)
    results["grouped_mm_ok_forced"] = float(grouped_gemm.grouped_mm_ok(x, big)
                                            and grouped_gemm.grouped_mm_ok(x, big, silu_pairs=True))
    results["grouped_mm_ok_float32"] = float(grouped_gemm.grouped_mm_ok(x.float(), big.float()))
    results["grouped_mm_ok_ragged"] = float(grouped_gemm.grouped_mm_ok(x, torch.zeros(4, 200, 128, dtype=x.dtype)))
    results["grouped_mm_ok_strided"] = float(grouped_gemm.grouped_mm_ok(x, big.transpose(1, 2)))

# The whole grouped MoE experts (sort, gate‖up with SwiGLU, down, weighted sum) through the kernel vs the expert
# loop, with 6 experts, top-2, 40 tokens.
cfg = LanguageConfig(hidden_size=64, moe_intermediate_size=32, n_routed_experts=6, num_experts_per_tok=2)
layer = moe.MoE(cfg)
for p in layer.parameters():
    p.data.normal_(0, 0.1)
small_sites = {"gate_up": {**SMALL, "tma": True}, "down": {**SMALL, "block_k": 16, "tma": False}}  # down: K = 32
for dtype in (torch.float32, torch.bfloat16):
    layer = layer.to(dtype)
    x = torch.randn(40, cfg.hidden_size, dtype=dtype)
    weights, ids = layer.route(x)
    ref = moe.looped_experts(x, weights, ids, layer.experts)
    with (mock.patch.object(kernels.launch, "available", lambda t: True),
          mock.patch.dict(grouped_gemm.CONFIGS, small_sites),
          mock.patch.object(grouped_gemm, "grouped_mm", wraps=grouped_gemm.grouped_mm) as spy):
        if dtype == torch.float32:  # grouped_mm_ok takes only bf16/fp16 (the GPU's dot would be TF32)
            forced = mock.patch.object(grouped_gemm, "grouped_mm_ok", lambda x, w, silu_pairs=False: True)
        else:
            forced = mock.patch.object(grouped_gemm, "grouped_mm_ok", wraps=grouped_gemm.grouped_mm_ok)
        with forced:
            got = moe.grouped_experts(x, weights, ids, layer.experts)
        results[f"grouped_experts_kernel_calls_{dtype}"] = float(spy.call_count)
    results[f"grouped_experts_{dtype}"] = rel(got, ref)

# A custom operator with a fake implementation: the grouped experts compile as one graph around the kernel.
with mock.patch.object(kernels.launch, "available", lambda t: True), mock.patch.dict(grouped_gemm.CONFIGS, small_sites):
    step = torch.compile(moe.grouped_experts, backend="eager", fullgraph=True)
    results["grouped_experts_fullgraph_bfloat16"] = rel(step(x, weights, ids, layer.experts), ref)

print(json.dumps(results))
