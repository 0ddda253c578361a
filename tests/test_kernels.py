"""The Triton kernels (decode time; the prefill's grouped expert product) equal the plain paths, and the decode
kernels are batch invariant: run on the CPU through Triton's interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


# name -> script and arguments
SCRIPTS = {"kernels": ["_interpreted_kernels.py"], "grouped": ["_interpreted_grouped_gemm.py"],
           "invariance": ["_interpreted_batch_invariance.py", "kernels"],
           "invariance_model": ["_interpreted_batch_invariance.py", "model"]}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], dict[str, float]]]:
    """The tests' kernel scripts under Triton's interpreter, all started at once (side by side on the CPUs):
    -> name (of SCRIPTS) -> the JSON it printed last."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    logs = tmp_path_factory.mktemp("interpreted")
    procs = {}
    for name, (script, *args) in SCRIPTS.items():  # output to files: a full pipe would stall a script meanwhile
        with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen([sys.executable, str(Path(__file__).parent / script), *args], env=env,
                                           stdout=out, stderr=err, cwd=ROOT)

    def result(name: str) -> dict[str, float]:
        assert procs[name].wait(timeout=900) == 0, (logs / f"{name}.err").read_text()[-3000:]
        return json.loads((logs / f"{name}.out").read_text().strip().splitlines()[-1])

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def errors(interpreted: Callable[[str], dict[str, float]]) -> dict[str, float]:
    return interpreted("kernels")


@pytest.fixture(scope="module")
def invariance(interpreted: Callable[[str], dict[str, float]]) -> dict[str, float]:
    return {**interpreted("invariance"), **interpreted("invariance_model")}


@pytest.fixture(scope="module")
def grouped_errors(interpreted: Callable[[str], dict[str, float]]) -> dict[str, float]:
    return interpreted("grouped")


# Each check runs twice: as launched the ordinary way ("") and as launched with programmatic dependent launch
# ("pdl_": the variants that fetch their weights before waiting for the previous kernel).
LAUNCH_MODES = pytest.mark.parametrize("mode", ["", "pdl_"])


@LAUNCH_MODES
def test_fused_decode_moe_equals_the_plain_moe_block(errors: dict[str, float], mode: str) -> None:
    # Router (softmax, top-k of 12 experts), routed and shared experts in three kernels vs the expert loop
    # plus the shared MLP: a wrong expert choice or weight would be off by far more than rounding.
    for tokens in (1, 3):
        assert errors[f"{mode}moe_torch.float32_{tokens}"] < 1e-5
        assert errors[f"{mode}moe_torch.bfloat16_{tokens}"] < 3e-2
    # The router's last-program-done counters are reset by every launch (a CUDA graph replays them).
    assert errors[f"{mode}route_counters_back_to_zero"] == 1.0


@LAUNCH_MODES
def test_latent_attention_kernels_equal_the_plain_attention(errors: dict[str, float], mode: str) -> None:
    # Three rows at positions 0, 5 and 1117 (longer than the splits x block), float32, through the prologue,
    # attention, merge and value kernels.
    assert errors[f"{mode}attention_kernel_path"] == 1.0
    assert errors[f"{mode}attention_torch.float32"] < 1e-5
    # The prologue kernel writes this token's cache row as the plain path does (normed latent, rotated key) and
    # touches no other row.
    assert errors[f"{mode}attention_cache_rows_rel"] < 1e-6
    assert errors[f"{mode}attention_cache_rows_changed"] > 0.1
    assert errors[f"{mode}attention_cache_rest_equal"] == 1.0


@LAUNCH_MODES
def test_gemv_kernel_equals_linear(errors: dict[str, float], mode: str) -> None:
    assert errors[f"{mode}gemv_torch.float32"] < 1e-5
    assert errors[f"{mode}gemv_torch.bfloat16"] < 1e-2  # one bf16 rounding of the outputs, another summation order


@LAUNCH_MODES
def test_decode_layer_compiles_as_one_graph_around_the_kernels(errors: dict[str, float], mode: str) -> None:
    # torch.compile(fullgraph=True) raises on any graph break; the compiled step (attention kernels, then the MoE
    # block with the residual add and norm inside its router kernel) equals the plain one.
    assert errors[f"{mode}layer_moe_kernel_path"] == 1.0
    assert errors[f"{mode}layer_fullgraph_float32"] < 1e-5
    assert errors[f"{mode}layer_fullgraph_cache"] < 1e-6  # the cache-writing kernel mutates the cache under compile


# Batch invariance (_interpreted_batch_invariance.py): a row's output is the same bits alone, as a row of batches of
# up to 64 rows, and at another position among other rows. The interpreter rounds float32 to bfloat16 by
# truncation (the GPU to nearest), so its bf16 results differ from PyTorch's by about one bf16 step throughout.


# The matrix products on tensor cores (the batch invariant mode's) and on CUDA cores ("cc_").
CORES = pytest.mark.parametrize("cores", ["", "cc_"])


@CORES
@LAUNCH_MODES
def test_gemv_is_batch_invariant(invariance: dict[str, float], mode: str, cores: str) -> None:
    # Tensor cores: tiles of rows and of K (K past the tile: three K blocks, the last ragged), wide outputs. CUDA
    # cores: whole rows in registers (with PDL), the wide blocks of large weights (with PDL), and BLOCK_K columns at a
    # time (without PDL, or K past the whole-row limit).
    mode = cores + mode
    for variant in ("", "wide_", "long_") if "pdl" in mode else ("", "long_"):
        assert invariance[f"{mode}gemv_{variant}torch.float32_rel"] < 1e-5
        assert invariance[f"{mode}gemv_{variant}torch.bfloat16_rel"] < 1e-2
        for dtype in ("torch.float32", "torch.bfloat16"):
            assert invariance[f"{mode}gemv_{variant}{dtype}_invariant"] == 1.0
    assert invariance[f"{mode}gemv_float_out"] == 1.0  # float32 out: the model-dtype result, widened


@LAUNCH_MODES
def test_rms_norm_kernel_is_batch_invariant(invariance: dict[str, float], mode: str) -> None:
    assert invariance[f"{mode}rms_norm_torch.float32_rel"] < 1e-6
    assert invariance[f"{mode}rms_norm_torch.bfloat16_rel"] < 1e-2
    for dtype in ("torch.float32", "torch.bfloat16"):
        assert invariance[f"{mode}rms_norm_{dtype}_invariant"] == 1.0


@CORES
def test_decode_moe_is_batch_invariant(invariance: dict[str, float], cores: str) -> None:
    # The residual add and norm, router, pairs grouped by expert, gate‖up, down and the slot sums, for up to 64
    # tokens: all on the same two experts (groups of every token: four tiles of rows), each pair of tokens on
    # experts of their own, and random routes; float32, against the plain block.
    for routes in ("collide", "spread", "random"):
        assert invariance[f"{cores}pdl_moe_{routes}_rel"] < 1e-5
        assert invariance[f"{cores}pdl_moe_{routes}_invariant"] == 1.0


def test_decode_step_through_the_kernels_is_batch_invariant(invariance: dict[str, float]) -> None:
    # A tiny model's whole decode step (a dense layer, an MoE layer, the final norm and lm_head; each row at its own
    # position) through the kernels: each row's float32 logits alone equal its logits in a batch of 7 and at another
    # position of a batch of 3; and the plain step's within rounding, with the same greedy tokens.
    assert invariance["pdl_model_kernel_paths"] == 1.0  # attention, MoE, dense MLP, norms and lm_head
    assert invariance["pdl_model_invariant"] == 1.0
    assert invariance["pdl_model_rel"] < 1e-5
    assert invariance["pdl_model_argmax_equal"] == 1.0


def test_grouped_mm_equals_a_loop_over_the_experts(grouped_errors: dict[str, float]) -> None:
    # 5 experts with 21, 0, 1, 50 and 7 rows (an empty group, one row, groups across and within 16-row tiles),
    # three column blocks, two reduction steps; the tile schedule is computed in the kernel from offs. Tiles are
    # loaded through pointers ("") or tensor descriptors ("tma_").
    for mode in ("", "tma_"):
        assert grouped_errors[f"grouped_mm_{mode}torch.float32"] < 1e-5
        assert grouped_errors[f"grouped_mm_{mode}torch.bfloat16"] < 1e-2
        # gate‖up with the SwiGLU in the epilogue equals F.silu(gate) * up of the rounded product: same roundings.
        assert grouped_errors[f"grouped_mm_silu_{mode}torch.float32"] < 1e-5
        assert grouped_errors[f"grouped_mm_silu_{mode}torch.bfloat16"] < 1e-2
        assert grouped_errors[f"grouped_mm_silu_{mode}bfloat16_equal"] > 0.99


def test_grouped_mm_only_where_it_can_run(grouped_errors: dict[str, float]) -> None:
    # CUDA (kernels.launch.available: not a CPU tensor), bf16/fp16, contiguous weights whose N and K are multiples of
    # the default blocks.
    assert grouped_errors["grouped_mm_ok_cpu"] == 0.0
    assert grouped_errors["grouped_mm_ok_forced"] == 1.0
    assert grouped_errors["grouped_mm_ok_float32"] == 0.0
    assert grouped_errors["grouped_mm_ok_ragged"] == 0.0
    assert grouped_errors["grouped_mm_ok_strided"] == 0.0


def test_grouped_experts_through_the_kernel_equal_the_expert_loop(grouped_errors: dict[str, float]) -> None:
    # The prefill's MoE experts (sort, gate‖up + SwiGLU, down, weighted sum) with both products in the kernel vs
    # one expert at a time: a wrong group boundary or expert would be off by far more than rounding.
    for dtype in ("torch.float32", "torch.bfloat16"):
        assert grouped_errors[f"grouped_experts_kernel_calls_{dtype}"] == 2.0
    assert grouped_errors["grouped_experts_torch.float32"] < 1e-5
    assert grouped_errors["grouped_experts_torch.bfloat16"] < 1e-2
    # torch.compile(fullgraph=True) traces through the custom operator (its fake gives the shapes).
    assert grouped_errors["grouped_experts_fullgraph_bfloat16"] < 1e-2


def test_pdl_only_where_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # Programmatic dependent launch only for CUDA tensors on sm90+ with a Triton that has the launch option
    # (this one's: True with Triton 3.9); a CPU tensor, an sm80 GPU, the interpreter or PDL off (the module flag, set
    # from EngineConfig.pdl) launch the ordinary way.
    import torch

    from dsvl2 import kernels

    x = torch.zeros(2)
    assert not kernels.launch.use_pdl(x) and kernels.launch.pdl_args(x) == {"USE_PDL": False}

    class FakeCuda:  # what use_pdl reads of a tensor
        is_cuda = True

        def __init__(self, index: int) -> None:
            self.device = torch.device("cuda", index)

    capability = {0: (9, 0), 1: (8, 0)}  # an H100 and an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device.index])
    monkeypatch.setattr(kernels.launch, "_pdl_devices", {})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    supported = kernels.launch._launch_pdl_supported()  # this Triton's launch option
    on = {"USE_PDL": True, "launch_pdl": True} if supported else {"USE_PDL": False}
    assert kernels.launch.pdl_args(FakeCuda(0)) == on
    assert kernels.launch.pdl_args(FakeCuda(1)) == {"USE_PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels.launch.use_pdl(FakeCuda(0))
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(kernels.launch, "PDL", False)
    assert not kernels.launch.use_pdl(FakeCuda(0))


def test_grouped_mm_only_on_hopper_or_later(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default tiles need ~196 KB of shared memory: an sm80 GPU keeps torch._grouped_mm.
    import torch

    from dsvl2 import kernels
    from dsvl2.kernels import grouped_gemm

    class FakeCuda:  # what grouped_mm_ok reads of the input rows
        is_cuda = True
        dtype = torch.bfloat16

        def __init__(self, index: int) -> None:
            self.device = torch.device("cuda", index)

    capability = {0: (9, 0), 1: (8, 0)}  # an H100 and an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device.index])
    monkeypatch.setattr(kernels.launch, "triton", kernels.launch.triton or object())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w13 = torch.zeros(4, 512, 256, dtype=torch.bfloat16)  # N, K multiples of the default blocks
    assert grouped_gemm.grouped_mm_ok(FakeCuda(0), w13, silu_pairs=True)
    assert not grouped_gemm.grouped_mm_ok(FakeCuda(1), w13, silu_pairs=True)


def test_decode_step_on_other_checkpoint_shapes_equals_the_plain_step(tmp_path: Path) -> None:
    # A tiny model's float32 decode step through the kernels vs the plain step, on shapes other than the small
    # model's: v wider than the no-rope part of q·k and narrower, a 32-wide rotary part, one shared expert, top-k of
    # all the experts; and 3 heads, which the attention gate refuses: plain attention then, the same result.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    cases = ["v_wider", "nope_wider", "rope32", "one_shared", "topk_all", "heads3"]
    procs = {}
    for i, group in enumerate((cases[0::2], cases[1::2])):  # two processes side by side on the CPUs
        with open(tmp_path / f"{i}.out", "w") as out, open(tmp_path / f"{i}.err", "w") as err:
            procs[i] = subprocess.Popen([sys.executable, str(Path(__file__).parent / "_interpreted_shapes.py"),
                                         *group], env=env, stdout=out, stderr=err, cwd=ROOT)
    errors: dict[str, float] = {}
    for i, proc in procs.items():
        assert proc.wait(timeout=900) == 0, (tmp_path / f"{i}.err").read_text()[-3000:]
        errors.update(json.loads((tmp_path / f"{i}.out").read_text().strip().splitlines()[-1]))
    for case in cases:
        assert errors[f"{case}_attention_kernel"] == float(case != "heads3")
        assert errors[f"{case}_moe_kernel"] == 1.0 and errors[f"{case}_gemv_kernel"] == 1.0
        assert errors[f"{case}_rel"] < 1e-5, case
        assert errors[f"{case}_argmax_equal"] == 1.0, case
        assert errors[f"{case}_cache_rel"] < 1e-5, case
