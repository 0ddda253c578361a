"""Compiled code that travels with the service: torch.compile's portable cache for one GPU model and software stack.

A first start compiles the model's regions from scratch (about 45 s on an H100, the longest part of a start); a
restart finds the same code in Inductor's on-disk cache. A *bundle* is that cache made portable: the artefacts a
warm-up compiled (Inductor's graphs with their Triton kernels, AOTAutograd's entries, the autotuning choices),
serialised by ``torch.compiler.save_cache_artifacts`` and compressed. Loaded before the warm-up
(``torch.compiler.load_cache_artifacts`` writes them into the local caches), it makes a first start compile like a
restart.

Bundles are named by what their code depends on: the GPU model (Inductor's cache keys include the device name),
torch (with its CUDA build) and Triton. ``dsvl2/compiled/`` ships the bundles made on the lent GPUs; one can
also be put beside the checkpoint. A bundle made from other sources of this package is harmless: every entry
is still checked against its own cache key, so code that changed only misses and compiles as before.
Make one with ``python benchmarks/setup_time.py CHECKPOINT --no-bundle --save-bundle dsvl2/compiled`` on the target
GPU.
"""

from __future__ import annotations

import lzma
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parent.parent / "compiled"
SUFFIX = ".bin.xz"


def stack_key(device: torch.device | str) -> dict[str, str]:
    """What compiled code for ``device`` depends on, as Inductor's cache keys see it."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": name, "torch": torch.__version__, "triton": triton_version}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def bundle_name(key: dict[str, str]) -> str:
    """A file name of letters, digits, '.', '-' and '_' only, e.g. ``nvidia-h200_torch-2.11.0-cu130_triton-3.6.0``."""
    return f"{_slug(key['device'])}_torch-{_slug(key['torch'])}_triton-{_slug(key['triton'])}{SUFFIX}"


def find(key: dict[str, str], dirs: Iterable[Path]) -> Path | None:
    """The first of ``dirs`` holding the bundle for ``key``."""
    name = bundle_name(key)
    for d in dirs:
        path = Path(d) / name
        if path.is_file():
            return path
    return None


def _counts(info) -> str:
    artifacts = getattr(info, "artifacts", None) or {}
    return ", ".join(f"{len(v)} {k}" for k, v in sorted(artifacts.items())) or "no artefacts"


def load(path: Path, log: Callable[[str], None] = print) -> bool:
    """Write the bundle's artefacts into this process's compile caches; False (logged) if it cannot be read.
    Never raises: without the bundle the warm-up compiles, as a first start always did."""
    t0 = time.perf_counter()
    try:
        data = lzma.decompress(Path(path).read_bytes())
        info = torch.compiler.load_cache_artifacts(data)
    except Exception as e:  # noqa: BLE001 - an optimisation only
        log(f"compile bundle {path} not used ({type(e).__name__}: {e}); compiling from scratch")
        return False
    if info is None:
        log(f"compile bundle {path} holds nothing this torch can load; compiling from scratch")
        return False
    log(f"compile bundle {path.name}: {_counts(info)} loaded in {time.perf_counter() - t0:.1f} s")
    return True


def save(directory: Path, device: torch.device | str, log: Callable[[str], None] = print) -> Path | None:
    """Serialise what this process compiled (or found in its caches) into ``directory``/``bundle_name``,
    atomically; None (logged) if there is nothing to save."""
    t0 = time.perf_counter()
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        log("compile bundle: nothing was compiled in this process; no bundle written")
        return None
    data, info = saved
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / bundle_name(stack_key(device))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(lzma.compress(data, preset=6))
    tmp.replace(path)
    log(f"compile bundle {path}: {_counts(info)}, {len(data) / 1e6:.1f} MB -> {path.stat().st_size / 1e6:.1f} MB "
        f"in {time.perf_counter() - t0:.1f} s")
    return path
