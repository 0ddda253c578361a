"""The compiler's start-up pieces (dsvl2.startup.compilation): the quick autotune and the compiler imported once."""

from __future__ import annotations

import pytest
from torch._inductor.runtime import benchmarking

from dsvl2.startup.compilation import QUICK_BENCHMARK_ITERS, QUICK_BENCHMARK_MS, quick_autotune


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


def test_background_load_imports_the_compiler_before_any_thread_needs_it(tiny_checkpoint) -> None:
    """The model's construction no longer imports Dynamo and Inductor (no random initialisation on the meta device),
    so from_pretrained imports them on its own thread once the load has started: threads importing them at the same
    time fail ("partially initialized module", seen on an H200). In a fresh process: not imported by building the
    model, imported when from_pretrained returns."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys, torch
from dsvl2.serving.engine import Engine, EngineConfig
from dsvl2.model.config import ModelConfig
from dsvl2.model.deepseek_vl2 import DeepseekVL2
with torch.device("meta"):
    DeepseekVL2(ModelConfig.from_file({str(tiny_checkpoint / "config.json")!r}))
assert "torch._dynamo" not in sys.modules, "building the model imported the compiler"
engine = Engine.from_pretrained({str(tiny_checkpoint)!r}, EngineConfig(device="cpu", background_load=True), log=print)
assert "torch._dynamo" in sys.modules and "torch._inductor.utils" in sys.modules
engine.wait_loaded()
print("ok")
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": "/tmp"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_cache_report_counts_what_was_found_and_what_compiled(monkeypatch) -> None:
    import collections

    from dsvl2.startup.compilation import cache_report

    fake = collections.defaultdict(collections.Counter)
    fake["inductor"].update(fxgraph_cache_hit=5, fxgraph_cache_miss=1)
    fake["aot_autograd"].update(autograd_cache_hit=4)
    fake["frames"].update(ok=7)
    monkeypatch.setattr("torch._dynamo.utils.counters", fake)
    assert cache_report() == ("graphs 5 found, 1 compiled, 0 not cacheable; AOTAutograd 4 found, 0 compiled; "
                              "Dynamo compiled 7 frames")
