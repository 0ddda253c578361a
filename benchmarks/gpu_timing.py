"""CUDA-graph timing shared by the benchmark scripts (CUDA only)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsvl2.serving.runner import capture_graph  # noqa: E402


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 100) -> float:
    """Milliseconds per replay of a captured graph: one untimed replay, then ``reps`` timed back to back."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graph_ms(fn: Callable[[], object], reps: int = 50) -> float:
    """Milliseconds per call of ``fn`` captured in a CUDA graph (after one warm-up call) and replayed."""
    graph, _ = capture_graph(fn, None, warmups=1)
    return replay_ms(graph, reps)
