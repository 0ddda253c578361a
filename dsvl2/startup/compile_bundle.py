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

Beside each bundle travels an archive of Triton's compiled kernels (``*.triton.tar.xz``): our own kernels
(``dsvl2.kernels``) are not Inductor's, so torch's cache leaves them out, and a first start would otherwise compile
each of them (a second or so each, tens of them) while it warms up. Triton checks each entry against its own key
(the kernel's source, the GPU's architecture, Triton's version) and compiles what does not match. Its launchers are
built against Python's headers, so the archive's name carries Python's version too.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parent.parent / "compiled"
SUFFIX = ".bin.xz"
TRITON_SUFFIX = ".triton.tar.xz"
INDUCTOR_KERNELS = "triton_"  # the names of Inductor's generated kernels (in torch's cache already) start so


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


def find(key: dict[str, str], dirs: Iterable[Path], name: str | None = None) -> Path | None:
    """The first of ``dirs`` holding the bundle for ``key`` (or the file ``name``)."""
    name = name or bundle_name(key)
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
    path = _write_xz(Path(directory) / bundle_name(stack_key(device)), data)
    log(f"compile bundle {path}: {_counts(info)}, {len(data) / 1e6:.1f} MB -> {path.stat().st_size / 1e6:.1f} MB "
        f"in {time.perf_counter() - t0:.1f} s")
    return path


def _write_xz(path: Path, data: bytes) -> Path:
    """``data`` xz-compressed into ``path`` (its directory made), atomically -> path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(lzma.compress(data, preset=6))
    tmp.replace(path)
    return path


def triton_cache_dir() -> Path:
    """Where Triton caches compiled kernels in this process (TRITON_CACHE_DIR, else its default)."""
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def triton_name(key: dict[str, str]) -> str:
    python = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return bundle_name(key).removesuffix(SUFFIX) + f"_{python}{TRITON_SUFFIX}"


def _ours(f: Path) -> bool:
    """A file of a cache entry to ship: a kernel's metadata, not Inductor's, or a compiled launcher."""
    if f.suffix == ".so":
        return True
    return f.suffix == ".json" and not f.name.lstrip("_").removeprefix("grp__").startswith(INDUCTOR_KERNELS)


def save_triton(directory: Path, device: torch.device | str, log: Callable[[str], None] = print) -> Path | None:
    """Archive the entries of this process's Triton cache that are not Inductor's into ``directory`` ->
    the archive, or None (logged) if there are none."""
    cache = triton_cache_dir()
    entries = sorted(d for d in cache.glob("*") if d.is_dir() and any(_ours(f) for f in d.iterdir()))
    if not entries:
        log(f"Triton kernels: none in {cache}; no archive written")
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in entries:
            tar.add(d, arcname=d.name)
    path = _write_xz(Path(directory) / triton_name(stack_key(device)), buf.getvalue())
    log(f"Triton kernels: {len(entries)} cache entries from {cache} -> {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def load_triton(path: Path, log: Callable[[str], None] = print) -> int:
    """Unpack an archive of ``save_triton`` into this process's Triton cache (entries it holds already are kept)
    -> entries added. Never raises: without it the kernels compile at first use."""
    t0 = time.perf_counter()
    cache = triton_cache_dir()
    try:
        with tarfile.open(fileobj=io.BytesIO(lzma.decompress(Path(path).read_bytes()))) as tar:
            members = tar.getmembers()
            new = {m.name.split("/")[0] for m in members} - triton_entries()
            wanted = [m for m in members if m.name.split("/")[0] in new]
            cache.mkdir(parents=True, exist_ok=True)
            tar.extractall(cache, members=wanted, filter="data")  # plain files under the cache only
    except Exception as e:  # noqa: BLE001 - an optimisation only
        log(f"Triton kernels {path} not used ({type(e).__name__}: {e}); they compile at first use")
        return 0
    log(f"Triton kernels {path.name}: {len(new)} cache entries into {cache} in {time.perf_counter() - t0:.1f} s")
    return len(new)


def triton_entries() -> set[str]:
    """The entries of this process's Triton cache now (to tell, afterwards, what compiled meanwhile)."""
    cache = triton_cache_dir()
    return {d.name for d in cache.iterdir()} if cache.is_dir() else set()


def compiled_since(before: set[str]) -> list[str]:
    """The kernels Triton compiled into its cache since ``triton_entries()`` gave ``before`` (what neither the
    archive nor an earlier start held), by name."""
    cache = triton_cache_dir()
    return sorted(f.stem for d in triton_entries() - before for f in (cache / d).glob("*.json")
                  if not f.name.startswith("__grp__"))
