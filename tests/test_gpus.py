"""The GPU profiles and the kernel choices made from them (CPU only: the CUDA queries are faked; the compile checks
run Triton's compiler and ptxas for sm80/sm89 targets without a GPU)."""

import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from dsvl2 import gpus, kernels
from dsvl2.kernels import grouped_gemm

GiB = 1 << 30


class FakeCuda:
    """What use_pdl and grouped_mm_ok read of a tensor."""
    is_cuda = True
    dtype = torch.bfloat16

    def __init__(self, index: int = 0) -> None:
        self.device = torch.device("cuda", index)


@pytest.fixture
def h200(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake H200 as cuda:0 (its properties as torch reports them), 100 GiB of it in use; fresh caches."""
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, shared_memory_per_block_optin=232448,
                            total_memory=150_000_000_000, multi_processor_count=132)
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: calls.append(device) or props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (props.major, props.minor))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (props.total_memory - 100 * GiB,
                                                                    props.total_memory))
    monkeypatch.setattr(gpus, "_measured", {})
    monkeypatch.setattr(kernels.launch, "_pdl_devices", {})
    monkeypatch.setattr(kernels.launch, "triton", kernels.launch.triton or object())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(gpus.EMULATE_ENV, raising=False)
    return calls


def test_real_device_profile_is_read_once(h200) -> None:
    p = gpus.profile(torch.device("cuda", 0))
    assert p == gpus.GpuProfile("NVIDIA H200", (9, 0), 232448, 150_000_000_000, 132)
    assert gpus.profile(0) is p and len(h200) == 1  # cached per device
    assert gpus.capability(0) == (9, 0) and gpus.shared_memory_optin(0) == 227 * 1024
    assert gpus.usable_memory(0) == 150_000_000_000 - 100 * GiB  # mem_get_info's free bytes
    with pytest.raises(ValueError, match="not a CUDA device"):
        gpus.profile("cpu")


@pytest.mark.parametrize("name", list(gpus.PROFILES))
def test_kernel_choices_per_profile(h200, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # On the H200, every choice is made as on the emulated GPU: PDL and the grouped GEMM's 192 KB tiles on Hopper
    # only; an A100 or L40S launches the ordinary way and keeps torch._grouped_mm.
    monkeypatch.setenv(gpus.EMULATE_ENV, name.upper())  # case-insensitive
    hopper = name in ("h200", "h100")
    p = gpus.profile(0)
    assert p is gpus.PROFILES[name] and gpus.capability(0) == p.capability
    assert gpus.shared_memory_optin(0) == p.shared_memory_optin
    assert kernels.launch.use_pdl(FakeCuda()) == (hopper and kernels.launch._launch_pdl_supported())
    w13 = torch.zeros(4, 512, 256, dtype=torch.bfloat16)  # N, K multiples of the default blocks
    for silu_pairs in (True, False):
        assert grouped_gemm.grouped_mm_ok(FakeCuda(), w13, silu_pairs=silu_pairs) == hopper
    # The memory budget: the emulated GPU's total less the 100 GiB in use on the real one.
    assert gpus.usable_memory(0) == max(p.total_memory - 100 * GiB, 0)


def test_unknown_profile_is_refused(h200, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gpus.EMULATE_ENV, "v100")
    with pytest.raises(ValueError, match="'v100' is not a known GPU; known: h200, h100, a100-80, a100-40, l40s"):
        gpus.profile(0)
    monkeypatch.setenv(gpus.EMULATE_ENV, "")  # empty: the real device
    assert gpus.profile(0).name == "NVIDIA H200"


def test_grouped_gemm_tiles_shared_memory() -> None:
    # 128 x 64 rows and 256 x 64 weights, bf16, 4 stages: 192 KB (H100/H200 227 KB; A100 163 KB; L40S 99 KB).
    assert grouped_gemm.shared_memory(grouped_gemm.CONFIGS["gate_up"], 2) == 192 * 1024


def _ptxas_runs() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return subprocess.run([get_ptxas().path, "--version"], capture_output=True, timeout=30).returncode == 0
    except Exception:  # noqa: BLE001 - no Triton, no NVIDIA backend or no working ptxas: the compile checks skip
        return shutil.which("ptxas") is not None


# The decode kernels with DeepSeek-VL2-small's shapes (hidden 2048, 16 heads, MLA rank 512, rope 64, nope and
# values 128, 64 experts of width 1408, top 6, 2 shared) and their launch configs, without PDL (off before sm90).
# Pointers are bf16 unless listed; scalars i32 unless listed.
_DECODE_KERNELS = {
    "latent_attention": ("attention._latent_attention_kernel", dict(H=16, R=512, P=64, NSPLIT=64, BLOCK_S=32),
                         {"pos_ptr": "*i32", "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                          "scale": "fp32"}, 4),
    "attention_combine": ("attention._attention_combine_kernel", dict(H=16, R=512, NSPLIT=64, BLOCK_R=128),
                          {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32"}, 4),
    "mla_prologue": ("attention._mla_prologue_kernel", dict(H=16, NOPE=128, P=64, R=512, V=128, BLOCK_R=64),
                     {"cs_ptr": "*fp32", "pos_ptr": "*i32", "eps": "fp32"}, 4),
    "value_out": ("attention._value_out_kernel", dict(H=16, R=512, NOPE=128, V=128, BLOCK_V=16), {}, 4),
    "rms_norm": ("norm._rms_norm_kernel", dict(D=2048, D_PAD=2048), {"eps": "fp32"}, 4),
    "gemv": ("linear._gemv_kernel", dict(NOUT=2048, K=2048, BLOCK_N=kernels.linear.GEMV_CONFIG[0],
                                         BLOCK_K=kernels.linear.GEMV_CONFIG[1], WHOLE_ROW=False,
                                         ROWS_PAD=kernels.launch.MAX_DECODE_TOKENS), {},
             kernels.linear.GEMV_CONFIG[2]),
    "moe_router": ("moe._router_kernel",
                   dict(D=2048, E=64, E_PAD=64, K_TOP=6, BLOCK_E=kernels.moe.ROUTER_BLOCK_E, D_PAD=2048, P_PAD=64,
                        ONE_TOKEN=False, NORM=True),
                   {"eps": "fp32", "logits_ptr": "*fp32", "count_ptr": "*i32", "done_ptr": "*i32", "ids_ptr": "*i32",
                    "wt_ptr": "*fp32", "table_ptr": "*i32"}, 4),
    "moe_gate_up": ("moe_experts.gate_up_kernel",
                    dict(D=2048, D_PAD=2048, HID=1408, E=64, K_TOP=6, N_SHARED=2,
                         BLOCK_N=kernels.moe.GATE_UP_CONFIG[0]), {"table_ptr": "*i32"}, kernels.moe.GATE_UP_CONFIG[1]),
    "moe_down": ("moe_experts.down_kernel",
                 dict(D=2048, HID=1408, HID_PAD=2048, E=64, K_TOP=6, N_SHARED=2, BLOCK_N=kernels.moe.DOWN_CONFIG[0]),
                 {"table_ptr": "*i32", "wt_ptr": "*fp32", "y_ptr": "*fp32"}, kernels.moe.DOWN_CONFIG[1]),
}


@pytest.mark.skipif(kernels.launch.triton is None or not _ptxas_runs(), reason="needs Triton with a working ptxas")
@pytest.mark.parametrize("gpu", ["a100-40", "l40s"])
@pytest.mark.parametrize("kernel", list(_DECODE_KERNELS))
def test_decode_kernel_compiles_within_shared_memory(kernel: str, gpu: str) -> None:
    # Triton decides these kernels' shared memory (reductions, layout conversions, dot operands): compiled for the
    # GPU's architecture, each must fit in what one of its blocks may use.
    path, constexprs, types, num_warps, *stages = _DECODE_KERNELS[kernel]
    _compile_within_shared_memory(path, constexprs, types, num_warps, stages[0] if stages else 3, gpu)


def _compile_within_shared_memory(path: str, constexprs: dict, types: dict, num_warps: int, num_stages: int,
                                  gpu: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = path.split(".")
    fn = getattr(getattr(kernels, module), name)
    constexprs = {**constexprs, "USE_PDL": False}
    signature = {arg: "constexpr" if arg in constexprs else types.get(arg, "*bf16" if arg.endswith("_ptr") else "i32")
                 for arg in fn.arg_names}
    source = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    p = gpus.PROFILES[gpu]
    target = GPUTarget("cuda", p.capability[0] * 10 + p.capability[1], 32)
    compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.metadata.shared <= p.shared_memory_optin, (path, gpu, compiled.metadata.shared)


# The tensor-core kernels: (path, constexprs, pointer types, their tiles' config, the reduction's length K).
_MMA_KERNELS = {
    "mm": ("linear._mm_kernel", dict(NOUT=2048, K=2048), {}, "linear.MM_CONFIG", 2048),
    "mm_10944": ("linear._mm_kernel", dict(NOUT=2048, K=10944), {}, "linear.MM_CONFIG", 10944),
    "mm_wide": ("linear._mm_kernel", dict(NOUT=102400, K=2048), {}, "linear.MM_WIDE_CONFIG", 2048),
    "moe_gate_up_mma": ("moe_experts.gate_up_mma_kernel", dict(D=2048, HID=1408, E=64, K_TOP=6, N_SHARED=2),
                        {"table_ptr": "*i32"}, "moe.GATE_UP_MMA_CONFIG", 2048),
    "moe_down_mma": ("moe_experts.down_mma_kernel", dict(D=2048, HID=1408, E=64, K_TOP=6, N_SHARED=2),
                     {"table_ptr": "*i32", "wt_ptr": "*fp32", "y_ptr": "*fp32"}, "moe.DOWN_MMA_CONFIG", 1408),
}


@pytest.mark.skipif(kernels.launch.triton is None or not _ptxas_runs(), reason="needs Triton with a working ptxas")
@pytest.mark.parametrize("gpu", ["a100-40", "l40s", "h200"])
@pytest.mark.parametrize("kernel", list(_MMA_KERNELS))
def test_tensor_core_kernel_tiles_fit_each_gpu(kernel: str, gpu: str) -> None:
    # The tiles the launch chooses for this GPU's shared memory (``kernels.launch.mma_tiles``), compiled for its
    # architecture.
    path, constexprs, types, config, k = _MMA_KERNELS[kernel]
    module, name = config.split(".")
    p = gpus.PROFILES[gpu]
    bm, bn, bk, nw, ns = kernels.launch.mma_tiles(getattr(getattr(kernels, module), name), k, 2, p.shared_memory_optin)
    _compile_within_shared_memory(path, {**constexprs, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "FP32_DOT": False},
                                  types, nw, ns, gpu)


def test_engine_slots_follow_the_emulated_gpus_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real H200 has 108 GB free after the weights; as an A100-40 only what its 40 GB leave remains: the caches
    # that fit there beside the activation reserve, or a refusal that names the numbers.
    from dsvl2.model.config import ModelConfig
    from dsvl2.model.tiny import preset_config
    from dsvl2.serving.engine import Engine, fitting_slots

    cfg = ModelConfig.from_dict(preset_config("small"))
    model = SimpleNamespace(cfg=cfg, dtype=torch.bfloat16)
    engine = SimpleNamespace(device=torch.device("cuda", 0), model=model, context=4096, log=lambda s: None)
    weights, total = 32_300_000_000, 143_771 << 20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - weights - (1 << 30), total))
    monkeypatch.setenv("DSVL2_EMULATE_GPU", "a100-80")
    expected = min(64, fitting_slots(cfg, torch.bfloat16, gpus.PROFILES["a100-80"].total_memory - weights - (1 << 30)))
    assert Engine._choose_slots(engine, None) == expected
    monkeypatch.setenv("DSVL2_EMULATE_GPU", "a100-40")
    free_40 = gpus.PROFILES["a100-40"].total_memory - weights - (1 << 30)
    fit_40 = fitting_slots(cfg, torch.bfloat16, free_40)
    if fit_40 >= 1:
        assert Engine._choose_slots(engine, None) == min(64, fit_40)
    else:
        with pytest.raises(RuntimeError, match="not enough for one request"):
            Engine._choose_slots(engine, None)
