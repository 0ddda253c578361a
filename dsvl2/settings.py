"""The settings of the service (predict.py) and the command line (``python -m dsvl2``), from the environment.

Both read their environment through this module and nowhere else; the engine gets what it needs as an
``EngineConfig`` (dsvl2.serving.engine_config). Nothing heavy is imported here at module level: predict.py reads
DSVL2_DEVICE through it before torch is imported.

Environment:
  DSVL2_WEIGHTS  checkpoint directory (default: `weights/` beside predict.py). Without a `config.json` there, the
                 service's setup downloads the official checkpoint into it.
  DSVL2_DEVICE   `cuda` (default; bfloat16) or `cpu` (float32; for tests and demos only). The service only; the
                 command line has `--device`.
  DSVL2_COMPILE_CACHE  where compiled kernels are cached (default `~/.cache/dsvl2`); sets TORCHINDUCTOR_CACHE_DIR
                 and TRITON_CACHE_DIR where they are unset.
  DSVL2_MAX_BATCH  how many predictions decode together (default: as many full-context caches as fit in the
                 GPU memory left after the weights, at most 64; 1 on the CPU). Predictions beyond it wait.
  DSVL2_STREAM_INTERVAL_MS  after its first text, a prediction's text is sent at most once per this many
                 milliseconds (default 30), whatever came meanwhile in one chunk.
  DSVL2_BATCH_INVARIANT  `1` (default): a prediction's tokens are the same whatever else is in its batch (seeds
                 hold under load; tensor-core kernels at every batch size). `0`: a prediction decoding alone runs on
                 CUDA-core kernels, 7 % faster, and its tokens then depend on whether it is alone (BENCHMARKS.md).
  DSVL2_PDL      `0` launches the decode kernels without programmatic dependent launch (default on for Hopper and
                 later; same results, ≈ 7 % slower decode on an H100).
  DSVL2_ALLOW_LOCAL_FILES  `1` lets HTTP clients name image files on the server's disk by path, for trusted
                 local use only. Unset (or `0`), image inputs over HTTP must be http(s) URLs or data URIs (coglet
                 downloads them); a path is refused with one message whatever is or is not there. Direct Python
                 calls of `Runner.run` and the command line always read local paths.
  DSVL2_STARTUP_SKIP  start-up mechanisms to leave out, comma-separated (default none; for measurements: each is
                 kept because an A/B of first starts showed it gains, BENCHMARKS.md). Names in
                 dsvl2/serving/engine_config.py's STARTUP_MECHANISMS, described in dsvl2/startup/sequence.py.
  DSVL2_LOAD_WORKERS  shards copied side by side while the weights load (default 1).
  COG_MAX_CONCURRENCY  coglet's prediction slots (read by coglet when the server starts; cog.yaml's
                 `concurrency.max` in a built image): predictions beyond it get HTTP 409. Here only for the log.
Still read where it is used:
  DSVL2_EMULATE_GPU  `l40s|a100-40|a100-80|h100|h200`: kernel choices and batch slots as on that GPU (tests and
                 benchmarks). Read by dsvl2/gpus.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from dsvl2.serving.engine_config import EngineConfig

WEIGHTS_ENV = "DSVL2_WEIGHTS"
DEVICE_ENV = "DSVL2_DEVICE"
CACHE_ENV = "DSVL2_COMPILE_CACHE"
BATCH_ENV = "DSVL2_MAX_BATCH"
INVARIANT_ENV = "DSVL2_BATCH_INVARIANT"
INTERVAL_ENV = "DSVL2_STREAM_INTERVAL_MS"
PDL_ENV = "DSVL2_PDL"
LOCAL_FILES_ENV = "DSVL2_ALLOW_LOCAL_FILES"
SKIP_ENV = "DSVL2_STARTUP_SKIP"
LOAD_WORKERS_ENV = "DSVL2_LOAD_WORKERS"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"  # beside predict.py
DEVICES = ("cuda", "cpu")


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, "").strip() or default


def device_name() -> str:
    """DSVL2_DEVICE as given (lower case), unchecked: see ``engine_config``."""
    return os.environ.get(DEVICE_ENV, "cuda").strip().lower()


def engine_config(device: str | None = None, dtype: torch.dtype | None = None) -> EngineConfig:
    """The engine the service runs, warmed up, on ``device`` (default DSVL2_DEVICE). A missing GPU is an error,
    never a silent CPU fallback."""
    import torch

    from dsvl2.serving.engine_config import EngineConfig

    device = device or device_name()
    if device not in DEVICES:
        raise RuntimeError(f"{DEVICE_ENV}={device!r} is not supported: use 'cuda' (default) or 'cpu'")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "no CUDA GPU is visible to PyTorch. Run the image on an NVIDIA GPU machine (`docker run --gpus all "
            f"...`), or set {DEVICE_ENV}=cpu (the command line: --device cpu) for a slow float32 run on the CPU "
            "(meant for tests and the demo)."
        )
    return EngineConfig(device=device, dtype=dtype, slots=batch_slots(), batch_invariant=batch_invariant(),
                        pdl=pdl(), stream_interval=stream_interval(), warmup=True, startup=startup_mechanisms(),
                        load_workers=load_workers())


def startup_skipped() -> set[str]:
    """DSVL2_STARTUP_SKIP's names (unchecked; read before torch is imported, for the prefetch)."""
    return {name.strip() for name in _env(SKIP_ENV).split(",") if name.strip()}


def startup_mechanisms() -> frozenset[str]:
    from dsvl2.serving.engine_config import STARTUP_MECHANISMS

    skipped = startup_skipped()
    unknown = skipped - set(STARTUP_MECHANISMS)
    if unknown:
        raise RuntimeError(f"{SKIP_ENV}={_env(SKIP_ENV)!r}: unknown {', '.join(sorted(unknown))}; the start-up "
                           f"mechanisms are {', '.join(STARTUP_MECHANISMS)}")
    return frozenset(STARTUP_MECHANISMS) - skipped


def load_workers() -> int:
    raw = _env(LOAD_WORKERS_ENV, "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 16:
        raise RuntimeError(f"{LOAD_WORKERS_ENV}={raw!r} is not supported: use an integer from 1 to 16")
    return int(raw)


def batch_slots() -> int | None:
    from dsvl2.serving.engine_config import SLOT_CEILING

    raw = _env(BATCH_ENV)
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= SLOT_CEILING:
        raise RuntimeError(f"{BATCH_ENV}={raw!r} is not supported: use an integer from 1 to {SLOT_CEILING}, or "
                           "leave it unset")
    return int(raw)


def batch_invariant() -> bool:
    raw = os.environ.get(INVARIANT_ENV, "1").strip()
    if raw not in ("0", "1"):
        raise RuntimeError(f"{INVARIANT_ENV}={raw!r} is not supported: use 1 (default) or 0")
    return raw == "1"


def pdl() -> bool:
    """DSVL2_PDL: anything but `0` (default on)."""
    return os.environ.get(PDL_ENV, "1") != "0"


def stream_interval() -> float:
    """Seconds, from DSVL2_STREAM_INTERVAL_MS."""
    raw = _env(INTERVAL_ENV, "30")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10_000:
        raise RuntimeError(f"{INTERVAL_ENV}={raw!r} is not supported: use milliseconds from 0 to 10000")
    return value / 1000


def use_compile_cache() -> Path:
    """Point Inductor's and Triton's caches into DSVL2_COMPILE_CACHE, so that a restart skips most of the
    compilation (mount it as a volume with `docker run -v` to keep it across containers). Process-wide: it sets
    TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR where they are unset, before anything compiles."""
    cache = Path(_env(CACHE_ENV, "~/.cache/dsvl2")).expanduser()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    return cache


def checkpoint_dir() -> tuple[Path, str]:
    """The checkpoint directory, and where that choice came from (for the log)."""
    configured = os.environ.get(WEIGHTS_ENV)
    if configured:
        return Path(configured).expanduser(), f"{WEIGHTS_ENV}={configured}"
    return DEFAULT_WEIGHTS, "the default weights directory"


def local_files_allowed(served: bool, log=print) -> bool:
    """Whether a file input may be a path on this machine: always for Python callers, over HTTP only by opt-in."""
    raw = _env(LOCAL_FILES_ENV)
    if raw not in ("", "0", "1"):
        raise RuntimeError(f"{LOCAL_FILES_ENV}={raw!r} is not supported: use 1 to allow local paths, or 0 / unset")
    if served and raw == "1":
        log(f"setup: {LOCAL_FILES_ENV}=1: HTTP clients may read any image file on this machine by its path")
    return not served or raw == "1"


def concurrency_summary(engine_slots: int) -> str:
    """What a client meets at capacity, for the setup log."""
    raw = _env("COG_MAX_CONCURRENCY")
    slots = f"coglet accepts {raw} predictions at once (COG_MAX_CONCURRENCY)" if raw else \
        "coglet's prediction slots come from cog.yaml's concurrency.max (COG_MAX_CONCURRENCY overrides it)"
    return (f"setup: {engine_slots} predictions decode together ({BATCH_ENV}); {slots}; predictions beyond the "
            "engine's batch wait in its queue, those beyond coglet's slots get HTTP 409")
