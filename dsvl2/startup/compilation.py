"""Keeping torch.compile's start-up cost off the service's setup.

The service compiles while its weights stream from disk (``dsvl2.startup.sequence``). Inductor's compiler stack is
imported on one thread first (``import_compiler``); its run-time choice between a generated kernel's block-size
configurations, which benchmarks every configuration about 100 times the first time the kernel runs (tens of
seconds in all for this model's prefill and vision kernels), is kept short (``quick_autotune``); and what the
warm-up found in the compile caches is reported (``cache_report``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# Per configuration: Triton's do_bench (Inductor's default benchmarker) runs for warm-up and repetition times in
# milliseconds (Inductor asks for 25 and 40); the experimental benchmarker counts runs (100 each).
QUICK_BENCHMARK_MS = 3
QUICK_BENCHMARK_ITERS = 10


def import_compiler() -> None:
    """Import Dynamo and Inductor (a few seconds on a cold start). Call it on one thread before starting threads
    that compile: these modules import each other in cycles, and a second
    thread that imports one of them while the first is half-way through gets a "partially initialized module"
    error."""
    import torch._dynamo  # noqa: F401
    import torch._inductor.async_compile  # noqa: F401
    import torch._inductor.utils  # noqa: F401


@contextlib.contextmanager
def quick_autotune(iters: int = QUICK_BENCHMARK_ITERS) -> Iterator[None]:
    """While active, Inductor times each block-size configuration of a generated kernel for about 3 ms (or
    ``iters`` runs) instead of 65 ms (or 100 runs after 100 cache flushes): the choice between a kernel's 2-6
    configurations rarely needs more, and these benchmarks otherwise take a third of the first compilation.
    The choices are cached on disk like the compiled code. A no-op where this torch has no such benchmarker."""
    try:
        from torch._inductor.runtime import benchmarking

        bench = benchmarking.benchmarker
        original = bench.benchmark_gpu
        own = vars(bench).get("benchmark_gpu")  # an instance attribute to put back, if any
    except (ImportError, AttributeError):
        yield
        return

    def benchmark_gpu(fn, *args, **kwargs):
        # Each benchmarker ignores the other's keywords.
        for key in ("warmup", "rep"):
            kwargs[key] = min(kwargs.get(key, QUICK_BENCHMARK_MS), QUICK_BENCHMARK_MS)
        kwargs.setdefault("memory_warmup_iters", iters)
        kwargs.setdefault("benchmark_iters", iters)
        return original(fn, *args, **kwargs)

    bench.benchmark_gpu = benchmark_gpu  # the instance attribute shadows the class's method
    try:
        yield
    finally:
        if own is None:
            del bench.benchmark_gpu
        else:
            bench.benchmark_gpu = own



def cache_report() -> str:
    """How this process's compilations met the compile caches so far: Inductor's graphs and AOTAutograd's entries found
    (hits), compiled (misses) or not cacheable (bypasses), and how many frames Dynamo compiled."""
    from torch._dynamo.utils import counters

    inductor, aot, frames = counters["inductor"], counters["aot_autograd"], counters["frames"]
    return (f"graphs {inductor['fxgraph_cache_hit']} found, {inductor['fxgraph_cache_miss']} compiled, "
            f"{inductor['fxgraph_cache_bypass']} not cacheable; AOTAutograd {aot['autograd_cache_hit']} found, "
            f"{aot['autograd_cache_miss']} compiled; Dynamo compiled {frames['ok']} frames")
