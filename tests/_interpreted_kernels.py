"""Run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1: the routed-expert Triton kernels
on the CPU against the expert loop, in float32 (exact up to summation order) and bfloat16. Prints JSON."""

from __future__ import annotations

import json

import torch

from dsvl2 import kernels, moe
from dsvl2.config import LanguageConfig

torch.manual_seed(0)
results: dict[str, float] = {}

# Routed experts: Triton matrix-vector kernels vs the expert loop.
cfg = LanguageConfig(hidden_size=512, moe_intermediate_size=96, n_routed_experts=8, num_experts_per_tok=3)
layer = moe.MoE(cfg)
for p in layer.parameters():
    p.data.normal_(0, 0.05)
for dtype in (torch.float32, torch.bfloat16):
    layer = layer.to(dtype)
    for tokens in (1, 3):
        x = torch.randn(tokens, cfg.hidden_size, dtype=dtype)
        w, ids = layer.route(x)
        ref = moe.looped_experts(x, w, ids, layer.experts).float()
        got = kernels.routed_experts(x, w, ids, layer.experts.w13, layer.experts.w2).float()
        results[f"routed_{dtype}_{tokens}"] = ((got - ref).norm() / ref.norm()).item()

print(json.dumps(results))
