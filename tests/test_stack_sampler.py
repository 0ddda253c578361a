"""The pure-Python sampling profiler that benchmarks/setup_time.py --sample-stacks uses on the lent machines."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stack_sampler import StackSampler  # noqa: E402


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(500))


def test_sampler_finds_the_busy_and_the_sleeping_thread() -> None:
    sampler = StackSampler(interval=0.005, depth=3)
    sampler.start()
    busy = threading.Thread(target=_spin, args=(0.4,), name="busy")
    idle = threading.Thread(target=time.sleep, args=(0.4,), name="idle")
    busy.start(), idle.start()
    busy.join(), idle.join()
    sampler.stop()
    report = sampler.report(top=3)
    assert report["frames"]["busy"][0] == ("test_stack_sampler.py:_spin", 1.0)
    assert report["wall_s"] >= 0.4
    if sys.platform.startswith("linux"):  # per-thread CPU time from /proc, kept after the threads ended
        assert report["cpu_s"]["busy"] > 0.1 > report["cpu_s"]["idle"]
