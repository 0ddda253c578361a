"""Run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1: one float32 decode step of tiny models
whose shapes differ from the small model's (head widths, rotary width, shared experts, top-k) through the Triton
kernels vs the plain path; and a shape the attention kernels' gate refuses (3 heads), which falls back to the plain
attention and still gives the plain result. Prints JSON."""

from __future__ import annotations

import json
import sys
from unittest import mock

import torch
from _launch_modes import random_language_model

from dsvl2 import kernels
from dsvl2.model.config import LanguageConfig

torch.manual_seed(0)
results: dict[str, float] = {}

BASE = dict(vocab_size=300, hidden_size=128, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, kv_lora_rank=64,
            qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=48)
CASES = {"v_wider": dict(qk_nope_head_dim=16, v_head_dim=32), "nope_wider": dict(qk_nope_head_dim=32, v_head_dim=16),
         "rope32": dict(qk_rope_head_dim=32), "one_shared": dict(n_shared_experts=1),
         "topk_all": dict(n_routed_experts=4, num_experts_per_tok=4), "heads3": dict(num_attention_heads=3)}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def check(name: str, overrides: dict) -> None:
    cfg = LanguageConfig(**{**BASE, **overrides})
    lm = random_language_model(cfg)
    rows = 3
    tokens = torch.randint(0, cfg.vocab_size, (rows,))
    pos = torch.tensor([0, 5, 47])
    cache = torch.randn(cfg.num_hidden_layers, rows, 48, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    ref_cache, got_cache = cache.clone(), cache.clone()
    with torch.inference_mode():
        plain = lm.decode(tokens, pos, ref_cache)
        with mock.patch.object(kernels.launch, "available", lambda t: True):
            x = torch.zeros(rows, 1, cfg.hidden_size)
            dense, moe_layer = lm.model.layers
            results[f"{name}_attention_kernel"] = float(dense.self_attn._kernels_ok(x)
                                                        and moe_layer.self_attn._kernels_ok(x))
            results[f"{name}_moe_kernel"] = float(moe_layer.mlp.decode_kernels_ok(x))
            results[f"{name}_gemv_kernel"] = float(kernels.linear.gemv_ok(x, dense.mlp.gate_up)
                                                   and kernels.linear.gemv_ok(x[:, 0], lm.lm_head.weight))
            fast = lm.decode(tokens, pos, got_cache)
    results[f"{name}_rel"] = rel(fast, plain)
    results[f"{name}_argmax_equal"] = float(torch.equal(fast.argmax(-1), plain.argmax(-1)))
    results[f"{name}_cache_rel"] = rel(got_cache, ref_cache)


with mock.patch.object(kernels.attention, "ATTENTION_SPLITS", 4):  # 4 splits rather than 64, for the interpreter's sake
    for case in sys.argv[1:] or CASES:  # the cases named (the test runs them side by side), else all
        check(case, CASES[case])

print(json.dumps(results))
