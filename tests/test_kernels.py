"""The decode-time Triton kernels equal the plain paths: run on the CPU through Triton's interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "_interpreted_kernels.py")], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_decode_moe_equals_the_plain_moe_block(errors: dict[str, float]) -> None:
    # Router (softmax, top-k of 12 experts), routed and shared experts in three kernels vs the expert loop
    # plus the shared MLP: a wrong expert choice or weight would be off by far more than rounding.
    for tokens in (1, 3):
        assert errors[f"moe_torch.float32_{tokens}"] < 1e-5
        assert errors[f"moe_torch.bfloat16_{tokens}"] < 3e-2
    # The router's last-program-done counters are reset by every launch (a CUDA graph replays them).
    assert errors["route_counters_back_to_zero"] == 1.0


def test_latent_attention_kernel_equals_the_plain_attention(errors: dict[str, float]) -> None:
    # Three rows at positions 0, 5 and 1117 (longer than the splits x block), float32.
    assert errors["attention_torch.float32"] < 1e-5
    assert errors["attention_cache_equal"] == 1.0


def test_gemv_kernel_equals_linear(errors: dict[str, float]) -> None:
    assert errors["gemv_torch.float32"] < 1e-5
    assert errors["gemv_torch.bfloat16"] < 1e-2  # one bf16 rounding of the outputs, different summation order


def test_decode_layer_compiles_as_one_graph_around_the_kernels(errors: dict[str, float]) -> None:
    # torch.compile(fullgraph=True) raises on any graph break; the compiled step equals the plain one.
    assert errors["layer_fullgraph_float32"] < 1e-5
