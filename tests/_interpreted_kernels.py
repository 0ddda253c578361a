"""Run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1: the Triton kernels on the CPU
against the plain paths, in float32 (exact up to summation order) and, where the interpreter allows,
bfloat16. Prints JSON."""

from __future__ import annotations

import json
from unittest import mock

import torch
from _launch_modes import launch_mode

from dsvl2 import kernels
from dsvl2.model import moe
from dsvl2.model.config import LanguageConfig
from dsvl2.model.language import Attention, DecoderLayer, rope_table

torch.manual_seed(0)
results: dict[str, float] = {}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def check_kernels(tag: str) -> None:
    # The fused decode MoE block (router, routed and shared experts in three kernels) vs the plain MoE block, with
    # 12 experts (not a power of two), top-4 and two shared experts.
    cfg = LanguageConfig(hidden_size=512, moe_intermediate_size=96, n_routed_experts=12, num_experts_per_tok=4,
                         n_shared_experts=2)
    layer = moe.MoE(cfg)
    for p in layer.parameters():
        p.data.normal_(0, 0.05)
    layer.shared_experts.fuse()
    for dtype in (torch.float32, torch.bfloat16):
        layer = layer.to(dtype)
        layer.shared_experts.fuse()
        for tokens in (1, 3):
            x = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype)
            with mock.patch.object(moe.MoE, "impl", "loop"):
                ref = layer(x)
            with mock.patch.object(kernels.launch, "available", lambda t: True):
                got = layer(x)
            results[f"{tag}moe_{dtype}_{tokens}"] = rel(got, ref)

    # The matrix-vector kernel for decode projections vs F.linear (1000 outputs: not a multiple of the block).
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 1024, dtype=dtype)
        w = (0.05 * torch.randn(1000, 1024)).to(dtype)
        results[f"{tag}gemv_{dtype}"] = rel(kernels.linear.gemv(x, w), torch.nn.functional.linear(x, w))

    counters = kernels.moe._route_counters.values()
    results[f"{tag}route_counters_back_to_zero"] = float(all(int(c.abs().sum()) == 0 for c in counters))

    # Latent attention: the split-K kernel inside Attention.decode vs the plain matmul-softmax path.
    acfg = LanguageConfig(hidden_size=128, num_attention_heads=16, kv_lora_rank=64, qk_rope_head_dim=16,
                          qk_nope_head_dim=16, v_head_dim=16)
    attn = Attention(acfg)
    for p in attn.parameters():
        p.data.normal_(0, 0.1)
    attn.kv_a_layernorm.weight.data.normal_(1.0, 0.1)
    attn.fuse()
    table = rope_table(512, acfg.qk_rope_head_dim, acfg.rope_theta, "cpu")
    # float32 only: the interpreter's tl.dot on bfloat16 operands returns garbage (a 16x32 @ 32x16 product is
    # off by 5e10), so the bf16 case is checked on the GPU by benchmarks/bench.py.
    cache = torch.randn(3, 1200, acfg.kv_lora_rank + acfg.qk_rope_head_dim)
    pos = torch.tensor([0, 5, 1117])  # rows at different positions: one token, short, and more than the splits
    x = torch.randn(3, 1, acfg.hidden_size)
    cos_sin = table[pos % 512][:, None]
    ref_cache, got_cache = cache.clone(), cache.clone()
    ref = attn.decode(x, cos_sin, ref_cache, pos)
    with mock.patch.object(kernels.launch, "available", lambda t: True):
        results[f"{tag}attention_kernel_path"] = float(attn._kernels_ok(x))
        got = attn.decode(x, cos_sin, got_cache, pos)
    results[f"{tag}attention_torch.float32"] = rel(got, ref)
    # This token's cache rows (normed latent, rotated key), written by the prologue kernel, and every other row
    # left as it was.
    rows = torch.arange(3)
    results[f"{tag}attention_cache_rows_rel"] = rel(got_cache[rows, pos], ref_cache[rows, pos])
    results[f"{tag}attention_cache_rows_changed"] = rel(got_cache[rows, pos], cache[rows, pos])
    got_cache[rows, pos] = ref_cache[rows, pos]
    results[f"{tag}attention_cache_rest_equal"] = float(torch.equal(ref_cache, got_cache))


    # A whole MoE decoder layer's decode step through torch.compile with fullgraph=True: the kernels are custom
    # operators, so Dynamo traces the layer as one graph (no breaks), and the result equals the plain step.
    lcfg = LanguageConfig(hidden_size=512, num_attention_heads=16, kv_lora_rank=64, qk_rope_head_dim=16,
                          qk_nope_head_dim=16, v_head_dim=16, moe_intermediate_size=64, n_routed_experts=8,
                          num_experts_per_tok=2, n_shared_experts=2)
    dlayer = DecoderLayer(lcfg, 1)
    for name, p in dlayer.named_parameters():
        p.data.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.05)
    for module in dlayer.modules():
        if hasattr(module, "fuse"):
            module.fuse()
    table = rope_table(64, lcfg.qk_rope_head_dim, lcfg.rope_theta, "cpu")
    pos = torch.tensor([7, 30])
    x = torch.randn(2, 1, lcfg.hidden_size)
    cache = torch.randn(2, 64, lcfg.kv_lora_rank + lcfg.qk_rope_head_dim)
    ref_cache, got_cache = cache.clone(), cache.clone()
    with torch.inference_mode():
        ref = dlayer.decode(x, table[pos][:, None], ref_cache, pos)
        with mock.patch.object(kernels.launch, "available", lambda t: True):
            results[f"{tag}layer_moe_kernel_path"] = float(dlayer.mlp.decode_kernels_ok(x))
            step = torch.compile(dlayer.decode, backend="eager", fullgraph=True)
            got = step(x, table[pos][:, None], got_cache, pos)
    results[f"{tag}layer_fullgraph_float32"] = rel(got, ref)
    results[f"{tag}layer_fullgraph_cache"] = rel(got_cache, ref_cache)  # the compiled step writes the cache


for pdl in (False, True):
    with launch_mode(pdl):
        check_kernels("pdl_" if pdl else "")

print(json.dumps(results))
