"""Time the weight load alone, this checkout's loader against an earlier one, alternating in one process: the model
allocated on the device as ``Engine.from_pretrained(..., background_load=True)`` does, then ``load_into`` with the
engine's 0.5 ms thread switch interval (no warm-up and no compilation beside it).

    mkdir -p /tmp/old && git archive COMMIT dsvl2/model/loader.py | tar x -C /tmp/old   # or dsvl2/loader.py
    python benchmarks/load_time.py CHECKPOINT_DIR --old-src /tmp/old [--runs 3] [--device cuda] [--workers N]
                                  [--keep-page-cache] [--gil-busy]

The earlier loader is imported from ``OLD_SRC/dsvl2/model/loader.py`` (or ``OLD_SRC/dsvl2/loader.py``) as a module of
this package (``dsvl2.model._loader_old``): both run with the same model, config and read-ahead code. Before each
load the page cache is dropped (as root; where that is not permitted the run is marked ``"page_cache": "kept"``), and
the read-ahead's once-per-process guard is reset, so that each load starts its read-ahead as in a fresh process.
``--gil-busy`` runs a pure-Python thread beside each load, standing in for the compiler that holds the interpreter
lock during a real start.

Prints one JSON line per load (seconds, GB copied into the model, GB/s, a checksum of the weights) and then a
summary line (median and minimum seconds per loader, and whether every load gave the same weights).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from dsvl2.model import loader  # noqa: E402
from dsvl2.model.config import ModelConfig  # noqa: E402
from dsvl2.startup import prefetch  # noqa: E402

SWITCH_INTERVAL = 5e-4  # as Engine._start_loading sets it for the background load


def import_old_loader(src: Path) -> ModuleType:
    """``src/dsvl2/model/loader.py`` as ``dsvl2.model._loader_old``: its relative imports resolve to this checkout's
    package. A loader from before the package folders (``src/dsvl2/loader.py``) has its sibling imports pointed at
    the modules' new places."""
    path = src / "dsvl2" / "model" / "loader.py"
    source = path.read_text() if path.is_file() else None
    if source is None and (src / "dsvl2" / "loader.py").is_file():
        path = src / "dsvl2" / "loader.py"
        moved = {"config": ".config", "errors": "..errors", "model": ".deepseek_vl2", "moe": ".moe",
                 "prefetch": "..startup.prefetch"}
        source = re.sub(r"^from \.(\w+) import", lambda m: f"from {moved.get(m[1], '.' + m[1])} import",
                        path.read_text(), flags=re.MULTILINE)
    if source is None:
        raise SystemExit(f"--old-src {src}: no dsvl2/model/loader.py (or dsvl2/loader.py) there")
    module = ModuleType("dsvl2.model._loader_old")
    module.__package__, module.__file__ = "dsvl2.model", str(path)
    sys.modules[module.__name__] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def drop_page_cache() -> str:
    """Write back and drop the page cache -> "dropped", or "kept" where not permitted."""
    if os.geteuid() != 0:
        return "kept"
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return "kept"
    return "dropped"


@contextlib.contextmanager
def gil_busy(enabled: bool) -> Iterator[None]:
    """A thread that runs Python bytecode (and so wants the interpreter lock) for as long as the block lasts."""
    if not enabled:
        yield
        return
    done = threading.Event()

    def spin() -> None:
        x = 0
        while not done.is_set():
            for i in range(1000):
                x += i

    thread = threading.Thread(target=spin, name="gil-busy", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--old-src", type=Path, required=True,
                    help="a folder holding the earlier dsvl2/model/loader.py (or dsvl2/loader.py)")
    ap.add_argument("--runs", type=int, default=3, help="loads per loader")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=None, help="load_into's workers (default: each loader's own)")
    ap.add_argument("--keep-page-cache", action="store_true", help="do not drop the page cache between loads")
    ap.add_argument("--gil-busy", action="store_true", help="a pure-Python thread beside each load")
    args = ap.parse_args()

    loaders = {"old": import_old_loader(args.old_src), "new": loader}
    device = torch.device(args.device)
    model = loader.allocate_model(ModelConfig.from_file(args.checkpoint / "config.json"), device, torch.bfloat16)
    params = list(model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    runs: list[dict] = []
    interval = sys.getswitchinterval()
    for i in range(args.runs):
        for name, module in loaders.items():
            with torch.no_grad():
                for p in params:  # as allocated: zero-filled
                    p.zero_()
            sync(device)
            prefetch._read_ahead_started.clear()  # each load starts its read-ahead, as in a fresh process
            cache = "kept" if args.keep_page_cache else drop_page_cache()
            sys.setswitchinterval(min(interval, SWITCH_INTERVAL))
            with gil_busy(args.gil_busy):
                t0 = time.perf_counter()
                module.load_into(model, args.checkpoint, workers=args.workers)
                sync(device)
                seconds = time.perf_counter() - t0
            sys.setswitchinterval(interval)
            for t in threading.enumerate():  # the read-ahead ends with the load; none left to overlap the next
                if t.name.startswith("dsvl2-read-ahead"):
                    t.join()
            with torch.no_grad():
                checksum = torch.stack([p.sum(dtype=torch.float32) for p in params]).sum().item()
            runs.append({"loader": name, "run": i + 1, "seconds": round(seconds, 3), "gb": round(n_bytes / 1e9, 3),
                         "gb_per_s": round(n_bytes / 1e9 / seconds, 3), "page_cache": cache,
                         "gil_busy": args.gil_busy, "checksum": checksum})
            print(json.dumps(runs[-1]), flush=True)
    summary = {name: {"median_s": round(statistics.median(r["seconds"] for r in runs if r["loader"] == name), 3),
                      "min_s": round(min(r["seconds"] for r in runs if r["loader"] == name), 3)} for name in loaders}
    print(json.dumps({"summary": summary, "device": str(device), "workers": args.workers,
                      "same_weights": len({r["checksum"] for r in runs}) == 1}))


if __name__ == "__main__":
    main()
