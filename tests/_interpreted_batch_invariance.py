"""Run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1 (argument "kernels" or "model", one half of
the checks each): the decode kernels are batch invariant.

For each kernel (and a whole tiny model's decode step): a row's output is bitwise the same alone, as a row (the
first, the last) of batches of up to 64 rows, and among other rows at another position; and it equals the plain
PyTorch computation within rounding. The interpreter's sums are numpy's, so equal bits here show the kernels'
structure: no sum mixes rows, and a row's sums are split the same way in every batch (numpy's ignore zero padding,
so a tile width that followed the batch would go unseen here). The GPU's own bits are checked by
benchmarks/decode_kernels.py. Prints JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from _launch_modes import launch_mode, random_language_model

from dsvl2 import kernels
from dsvl2.model import moe
from dsvl2.model.config import LanguageConfig
from dsvl2.model.language import RMSNorm

torch.manual_seed(0)
results: dict[str, float] = {}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def invariant(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, others: torch.Tensor,
              sizes: tuple[int, ...] = (3, 17, 64)) -> float:
    """1.0 if fn (rows [B, ...] -> [B, ...]) gives row 0 and row max(sizes) - 1 the same bits alone, as row i of
    rows[:B] for every B in sizes, and placed at position 2 among ``others``; else 0.0."""
    batches = {b: fn(rows[:b]) for b in sizes}
    for i in (0, max(sizes) - 1):
        single = fn(rows[i:i + 1])[0]
        moved = fn(torch.cat([others[:2], rows[i:i + 1], others[2:]]))[2]
        if not torch.equal(moved, single):
            return 0.0
        if not all(torch.equal(out[i], single) for b, out in batches.items() if i < b):
            return 0.0
    return 1.0


def check_gemv(tag: str) -> None:
    # The three variants of the matrix-vector kernel: whole rows (PDL), whole rows with the wide blocks (the
    # threshold lowered to reach it), and BLOCK_K columns at a time (no PDL, or K past the whole-row limit: 1100
    # is two full column blocks and a ragged one). Outputs not a multiple of the blocks.
    for dtype in (torch.float32, torch.bfloat16):
        for name, n, k, wide in (("", 21, 96, 10**9), ("wide_", 21, 96, 16), ("long_", 13, 1100, 10**9)):
            if name == "wide_" and not tag:  # without PDL every weight takes the K loop
                continue
            w = (0.1 * torch.randn(n, k)).to(dtype)
            x, others = torch.randn(64, k).to(dtype), torch.randn(6, k).to(dtype)
            with mock.patch.object(kernels.linear, "GEMV_WIDE_N", wide):
                results[f"{tag}gemv_{name}{dtype}_rel"] = rel(kernels.linear.gemv(x, w), F.linear(x, w))
                results[f"{tag}gemv_{name}{dtype}_invariant"] = invariant(lambda r, w=w: kernels.linear.gemv(r, w), x,
                                                                          others)
    w = 0.1 * torch.randn(50, 96)
    x = torch.randn(5, 96)
    gemv = kernels.linear.gemv
    results[f"{tag}gemv_float_out"] = float(torch.equal(gemv(x, w, float_out=True), gemv(x, w).float()))


def check_rms_norm(tag: str) -> None:
    norm = RMSNorm(80, 1e-6)  # not a power of two
    norm.weight.data = 1.0 + 0.1 * torch.randn(80)
    for dtype in (torch.float32, torch.bfloat16):
        norm = norm.to(dtype)
        x, others = (3 * torch.randn(64, 80)).to(dtype), torch.randn(6, 80).to(dtype)
        results[f"{tag}rms_norm_{dtype}_rel"] = rel(norm.decode(x), norm(x))
        results[f"{tag}rms_norm_{dtype}_invariant"] = invariant(norm.decode, x, others)


def check_moe(tag: str) -> None:
    # The whole MoE decode block (router with the residual add and norm, gate‖up, down, the slots added up) vs the
    # plain block, 8 experts, top-2, 2 shared experts, for routes that collide (every token on experts 0 and 1)
    # and spread (token i on experts 2i and 2i+1 mod 8), and random routes (batches of up to 64 tokens).
    cfg = LanguageConfig(hidden_size=64, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=2)
    d = cfg.hidden_size
    layer = moe.MoE(cfg)
    for p in layer.parameters():
        p.data.normal_(0, 0.1)
    layer.gate.weight.data[:, :8] += 6 * torch.eye(8)  # expert j's logit follows x[j]
    norm = RMSNorm(d, 1e-6)
    norm.weight.data = torch.ones(d)
    layer.shared_experts.fuse()

    def steer(x: torch.Tensor, experts: list[tuple[int, int]]) -> torch.Tensor:
        x = x.clone()
        for i, pair in enumerate(experts):
            x[i, :8] = 0.0
            x[i, list(pair)] = 3.0
        return x

    def step(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return layer.decode_residual(x, a, norm)

    base = torch.randn(64, d)
    routes = {"collide": steer(base, [(0, 1)] * 64), "spread": steer(base, [(2 * i % 8, (2 * i + 1) % 8)
                                                                            for i in range(64)]), "random": base}
    a, others = 0.5 * torch.randn(64, d), torch.randn(6, d)
    for name, x in routes.items():
        with mock.patch.object(moe.MoE, "impl", "loop"):
            h = x + a
            ref = h + layer(norm(h))
        results[f"{tag}moe_{name}_rel"] = rel(step(x, a), ref)
        # Each row's input is (x, a): the batch is built from both side by side.
        sizes = (64,) if name == "random" else (3, 9)
        results[f"{tag}moe_{name}_invariant"] = invariant(lambda r: step(r[:, :d], r[:, d:]), torch.cat([x, a], 1),
                                                          torch.cat([others, others.flip(0)], 1), sizes)


def check_model(tag: str) -> None:
    # A whole decode step of a tiny model (a dense layer, then an MoE layer; lm_head) through the kernels: every
    # row's float32 logits are the same bits alone and in batches, each row at its own position of its own cache.
    # Attention in 4 splits rather than 64 (each row's are its own either way), for the interpreter's sake.
    cfg = LanguageConfig(vocab_size=300, hidden_size=128, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=16, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=2, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                         max_position_embeddings=48)
    lm = random_language_model(cfg)
    rows = 7
    tokens = torch.randint(0, cfg.vocab_size, (rows,))
    pos = torch.randint(0, 48, (rows,))
    cache = torch.randn(cfg.num_hidden_layers, rows, 48, cfg.kv_lora_rank + cfg.qk_rope_head_dim)

    def step(idx: torch.Tensor) -> torch.Tensor:  # rows idx of the state, as one batch
        return lm.decode(tokens[idx], pos[idx], cache[:, idx])

    with torch.inference_mode():
        plain = step(torch.arange(rows))
        with mock.patch.object(kernels.launch, "available", lambda t: True):
            x = torch.zeros(rows, 1, cfg.hidden_size)
            dense, moe_layer = lm.model.layers
            results[f"{tag}model_kernel_paths"] = float(
                dense.self_attn._kernels_ok(x) and moe_layer.mlp.decode_kernels_ok(x)
                and kernels.linear.gemv_ok(x, dense.mlp.gate_up) and kernels.norm.rms_norm_ok(x, lm.model.norm.weight)
                and kernels.linear.gemv_ok(x[:, 0], lm.lm_head.weight))
            fast = step(torch.arange(rows))
            results[f"{tag}model_rel"] = rel(fast, plain)
            results[f"{tag}model_argmax_equal"] = float(torch.equal(fast.argmax(-1), plain.argmax(-1)))
            same = True
            for i in (0, rows - 1):
                single = step(torch.tensor([i]))[0]
                same &= torch.equal(fast[i], single)
                same &= torch.equal(step(torch.tensor([3, 4, i]))[2], single)
            results[f"{tag}model_invariant"] = float(same)


# The matrix-vector and norm kernels in both launch modes (their variants differ); the MoE kernels and the model as
# launched on Hopper (with PDL). "kernels" or "model" (argv[1]): one half each, so that the tests run both at once.
# The matrix products both ways (``kernels.launch.CUDA_CORE_ROWS``): tensor cores (batch invariant) and CUDA cores
# ("cc_").
ROWS = kernels.launch.MAX_DECODE_TOKENS
if sys.argv[1] == "kernels":
    for pdl in (False, True):
        with launch_mode(pdl), mock.patch.object(kernels.launch, "available", lambda t: True):
            check_rms_norm("pdl_" if pdl else "")
            for cores in ("", "cc_"):
                with mock.patch.object(kernels.launch, "CUDA_CORE_ROWS", ROWS if cores else 0):
                    check_gemv(cores + ("pdl_" if pdl else ""))
    with launch_mode(True), mock.patch.object(kernels.launch, "available", lambda t: True):
        for cores in ("", "cc_"):
            with mock.patch.object(kernels.launch, "CUDA_CORE_ROWS", ROWS if cores else 0):
                check_moe(cores + "pdl_")
else:
    with launch_mode(True), mock.patch.object(kernels.attention, "ATTENTION_SPLITS", 4):
        check_model("pdl_")

print(json.dumps(results))
