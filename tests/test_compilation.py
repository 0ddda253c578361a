from __future__ import annotations

import pytest
from torch._inductor.runtime import benchmarking

from dsvl2.compilation import QUICK_BENCHMARK_ITERS, QUICK_BENCHMARK_MS, quick_autotune


def test_quick_autotune_shortens_inductors_benchmarks_and_restores_them(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def recording(fn, **kwargs):
        calls.append(kwargs)
        return 1.0

    bench = benchmarking.benchmarker
    monkeypatch.setattr(bench, "benchmark_gpu", recording)  # stands in for the real (GPU-only) method
    with quick_autotune():
        # How Inductor's generated kernels call it (through benchmark(), with its own rep argument).
        assert bench.benchmark(lambda: None, device="cuda", rep=40, is_vetted_benchmarking=True) == 1.0
        bench.benchmark_gpu(lambda: None, benchmark_iters=3)  # an explicit count is kept
    bench.benchmark_gpu(lambda: None)
    assert calls[0]["benchmark_iters"] == calls[0]["memory_warmup_iters"] == QUICK_BENCHMARK_ITERS
    assert calls[0]["rep"] == calls[0]["warmup"] == QUICK_BENCHMARK_MS  # do_bench's milliseconds, capped
    assert calls[1]["benchmark_iters"] == 3
    assert "benchmark_iters" not in calls[2]  # restored on exit


def test_quick_autotune_puts_back_what_was_there() -> None:
    bench = benchmarking.benchmarker
    before = vars(bench).get("benchmark_gpu")
    with quick_autotune():
        assert vars(bench)["benchmark_gpu"] is not before
    assert vars(bench).get("benchmark_gpu") is before
