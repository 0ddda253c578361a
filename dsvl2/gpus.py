"""What the service needs to know of a GPU to choose its kernels and its memory budget, and emulation of the GPUs
it is served on.

The kernel choices (programmatic dependent launch, the grouped GEMM's tiles, TMA) depend on the compute capability
and the shared memory a block may opt in to; the memory budget on the device's memory. ``DSVL2_EMULATE_GPU`` (one
of ``PROFILES``' names, for tests and benchmarks) makes every such choice as on that GPU: an H200 with
``DSVL2_EMULATE_GPU=l40s`` launches what an L40S would, within an L40S's memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

EMULATE_ENV = "DSVL2_EMULATE_GPU"
MiB = 1 << 20


@dataclass(frozen=True)
class GpuProfile:
    name: str
    capability: tuple[int, int]  # (major, minor)
    shared_memory_optin: int  # bytes of shared memory one block may opt in to
    total_memory: int  # bytes
    sm_count: int


# Total memory as nvidia-smi reports it; shared memory: the CUDA programming guide's per-architecture limit.
PROFILES: dict[str, GpuProfile] = {p.name: p for p in (
    GpuProfile("h200", (9, 0), 227 * 1024, 143771 * MiB, 132),
    GpuProfile("h100", (9, 0), 227 * 1024, 81559 * MiB, 132),
    GpuProfile("a100-80", (8, 0), 163 * 1024, 81920 * MiB, 108),
    GpuProfile("a100-40", (8, 0), 163 * 1024, 40960 * MiB, 108),
    GpuProfile("l40s", (8, 9), 99 * 1024, 46068 * MiB, 142),
)}

# The opt-in shared memory per block is the same on every GPU of an architecture (the programming guide's table), so
# the kernel choices need only the capability; the device's properties are read for one not listed here.
_SHARED_MEMORY_OPTIN = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
                        (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}

_measured: dict[torch.device, GpuProfile] = {}


def emulated() -> GpuProfile | None:
    """The profile ``DSVL2_EMULATE_GPU`` names, or None when it is unset or empty."""
    name = os.environ.get(EMULATE_ENV, "").strip().lower()
    if not name:
        return None
    if name not in PROFILES:
        raise ValueError(f"{EMULATE_ENV}={name!r} is not a known GPU; known: {', '.join(PROFILES)}")
    return PROFILES[name]


def _cuda(device: torch.device | int | str) -> torch.device:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"not a CUDA device: {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def profile(device: torch.device | int | str) -> GpuProfile:
    """The emulated GPU's profile (``DSVL2_EMULATE_GPU``), else the device's own (read once per device)."""
    fake = emulated()
    if fake is not None:
        return fake
    device = _cuda(device)
    if device not in _measured:
        props = torch.cuda.get_device_properties(device)
        capability = (props.major, props.minor)
        smem = getattr(props, "shared_memory_per_block_optin", None) or _SHARED_MEMORY_OPTIN[capability]
        _measured[device] = GpuProfile(props.name, capability, smem, props.total_memory, props.multi_processor_count)
    return _measured[device]


def capability(device: torch.device | int | str) -> tuple[int, int]:
    """The (emulated) GPU's compute capability."""
    fake = emulated()
    return fake.capability if fake is not None else tuple(torch.cuda.get_device_capability(_cuda(device)))


def shared_memory_optin(device: torch.device | int | str) -> int:
    """Bytes of shared memory a block may use on the (emulated) GPU: what a kernel config must fit in."""
    fake = emulated()
    if fake is not None:
        return fake.shared_memory_optin
    smem = _SHARED_MEMORY_OPTIN.get(capability(device))
    return smem if smem is not None else profile(device).shared_memory_optin


def usable_memory(device: torch.device | int | str) -> int:
    """Bytes the service may still allocate on the device: its free memory, or when emulating, the emulated GPU's
    total less what is in use on the real one (this process's tensors and cache, the CUDA context, others)."""
    free, total = torch.cuda.mem_get_info(_cuda(device))
    fake = emulated()
    return free if fake is None else max(fake.total_memory - (total - free), 0)
