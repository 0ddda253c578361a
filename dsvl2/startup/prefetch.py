"""The service's own software read into the page cache in the background, from the first moment of the process.

On a fresh machine (empty page cache) a start spends much of its time reading small files one at a time: each
module that ``import torch``, the model's construction (which imports the compiler stack) and the first
compilation need (several thousand ``.py``/``.pyc`` files), Triton's ptxas and the C compiler for its launchers,
each read waiting for the disk before the next is asked for. Read by 16 threads at once, the same files take a
fraction of that time, and the later reads find them in memory.

``start()`` is called before torch is imported (``predict.py``'s first statement); this module imports only the
standard library. An optimisation only: unreadable files are skipped, and nothing waits for it.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import sysconfig
import threading
import time
from collections.abc import Iterable
from importlib.util import find_spec
from pathlib import Path

# In the order they are first needed: what importing the service loads, then the compiler stack.
PACKAGES = ("torch", "numpy", "PIL", "safetensors", "tokenizers", "cog", "coglet", "pydantic", "pydantic_core",
            "typing_extensions", "filelock", "fsspec", "jinja2", "markupsafe", "networkx", "sympy", "mpmath",
            "triton")
SMALL_FILE = 2 << 20  # read every file up to this size; larger ones only if ``wanted_large``
# Larger files read whole: Triton's library (hashed whole for its cache key), the programs run for every kernel
# compilation. (Torch's libraries are paged in by its import as needed; reading them whole costs more than it saves.)
LARGE_NAMES = ("libtriton.so", "ptxas", "cc1")
SKIPPED_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages",
                "dist-packages", "amd", "cupti", "cupti-blackwell", "instrumentation", "proton"}
SKIPPED_PATHS = ("torch/include", "torch/share", "torch/bin")  # C++ headers, CMake files, test programs
WORKERS = 16
CHUNK = 1 << 20

stats: dict[str, float] = {}  # filled when a prefetch finishes: files, bytes, seconds
_started: threading.Thread | None = None
_lock = threading.Lock()


def roots() -> list[Path]:
    """The directories to read, most urgent first: the standard library, the packages in ``PACKAGES`` that are
    installed (found without importing them), the C compiler's programs and Python's headers."""
    out = [Path(sysconfig.get_paths()["stdlib"])]
    for name in PACKAGES:
        try:
            spec = find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            out += [Path(p) for p in spec.submodule_search_locations]
    out += [Path("/usr/lib/gcc"), Path("/usr/libexec/gcc"), Path(sysconfig.get_paths()["include"])]
    return [p for p in out if p.is_dir()]


def wanted_large(name: str) -> bool:
    return name in LARGE_NAMES


def start() -> threading.Thread:
    """Start reading in a background thread (once per process) -> that thread."""
    global _started
    with _lock:
        if _started is None:
            _started = threading.Thread(target=prefetch, name="dsvl2-prefetch", daemon=True)
            _started.start()
        return _started


def prefetch(dirs: list[Path] | None = None, workers: int = WORKERS) -> dict[str, float]:
    """Read every small file under ``dirs`` (default ``roots()``) and the large ones ``wanted_large`` names, with
    ``workers`` threads: directories in the order given (shallower first within each), then the large files.
    -> {"files", "bytes", "seconds"}"""
    t0 = time.perf_counter()
    order = dirs if dirs is not None else roots()
    todo: queue.PriorityQueue = queue.PriorityQueue()
    seq = iter(range(1 << 62))  # ties broken in discovery order
    for rank, d in enumerate(order):
        todo.put((rank, 0, next(seq), str(d), True))
    large_rank = len(order)  # after every directory of small files
    totals = {"files": 0, "bytes": 0}
    count_lock = threading.Lock()

    def work() -> None:
        buf = bytearray(CHUNK)
        while True:
            rank, depth, _, path, is_dir = todo.get()
            if path is None:  # the end
                todo.task_done()
                return
            try:
                if is_dir:
                    n_files, n_bytes = _read_dir(path, rank, depth, buf, todo, seq, large_rank)
                else:
                    n_files, n_bytes = 1, _read_file(path, buf)
                with count_lock:
                    totals["files"] += n_files
                    totals["bytes"] += n_bytes
            finally:
                todo.task_done()

    threads = [threading.Thread(target=work, name=f"dsvl2-prefetch-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    todo.join()
    for _ in threads:
        todo.put((sys.maxsize, 0, next(seq), None, False))  # sorts last: every real item is taken first
    for t in threads:
        t.join()
    stats.update(files=totals["files"], bytes=totals["bytes"], seconds=round(time.perf_counter() - t0, 2))
    return dict(stats)


def _read_dir(path: str, rank: int, depth: int, buf: bytearray, todo: queue.PriorityQueue, seq,
              large_rank: int) -> tuple[int, int]:
    """Read a directory's small files; queue its subdirectories and its wanted large files."""
    n_files = n_bytes = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0, 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in SKIPPED_DIRS and not entry.path.endswith(SKIPPED_PATHS):
                    todo.put((rank, depth + 1, next(seq), entry.path, True))
            elif entry.is_file():
                size = entry.stat().st_size
                if size <= SMALL_FILE:
                    n_bytes += _read_file(entry.path, buf)
                    n_files += 1
                elif wanted_large(entry.name):
                    todo.put((large_rank, depth, next(seq), entry.path, False))
        except OSError:
            continue
    return n_files, n_bytes


def _read_file(path: str, buf: bytearray) -> int:
    """Read a whole file (into a reused buffer) -> bytes read; 0 if it cannot be read."""
    total = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    except OSError:
        return total
    return total


def checkpoint_files(ckpt: str | Path) -> list[Path]:
    """The shard files of a checkpoint directory, sorted, from its index (or its single ``model.safetensors``);
    [] where there is no readable index. Only for reading ahead: the loader checks the checkpoint itself."""
    ckpt = Path(ckpt)
    try:
        weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        return sorted({ckpt / f for f in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        single = ckpt / "model.safetensors"
        return [single] if single.is_file() else []


def read_ahead(paths: Iterable[Path]) -> None:
    """Ask the kernel to read these files into the page cache now, in this order, rather than page by page as
    they are touched: on a cold page cache this keeps the disk busy. Blocking: the kernel submits the reads
    in this call, and with the disk's queue full that lasts about as long as the reading itself, so the
    loader runs it beside the copies (``start_read_ahead``). Advice only: a file that cannot be opened is
    skipped (reading it later reports the error)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


_read_ahead_started: set[tuple[Path, ...]] = set()


def start_read_ahead(paths: Iterable[Path], streams: int = 1) -> list[threading.Thread]:
    """``read_ahead`` of these files in ``streams`` threads of their own (sorted, the order in which the loader
    copies them, dealt out in turn: with as many streams as the loader has workers, each worker's shard is read
    by one stream), once per set of files in a process: the service starts it before the model is allocated, and
    the load's own call finds it started. -> the threads; none if it was started before or there is nothing."""
    files = tuple(sorted({Path(p) for p in paths}))
    with _lock:
        if not files or files in _read_ahead_started:
            return []
        _read_ahead_started.add(files)
    streams = max(1, min(streams, len(files)))
    threads = [threading.Thread(target=read_ahead, args=(files[i::streams],), name=f"dsvl2-read-ahead-{i}",
                                daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    return threads
