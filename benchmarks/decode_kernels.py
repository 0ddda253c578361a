"""The decode step at several batch sizes on the GPU: speed, and batch invariance of every row's logits.

    python benchmarks/decode_kernels.py [--batches 1,8,32,64] [--sweep]

Builds ``random_model("small")`` in GPU memory (random weights of the real shapes) and compiles each decoder layer's
decode step as ``Engine.compile`` does. 64 rows of state (a token, a position, a cache of random values) are fixed
up front; for each batch size B the first B rows are decoded:

- the model's step (no sampler) replayed from a CUDA graph: milliseconds per step and tokens/s (B per step);
- each row's float32 logits against the same row decoded alone (B = 1): the largest absolute difference and how
  many rows have the same argmax (batch invariant: exactly 0, and all of them); the graph's output against the
  compiled step run directly (equal);
- fast against plain: greedy ids of the fast step for a few steps of 8 rows, scored under teacher forcing by the
  plain step (eager, no kernels, experts in a loop): how many argmaxes agree, and the largest margin by which
  the plain step prefers another token where they do not.

``--sweep`` also times the tiles of the tensor-core matrix and expert kernels at 1, 8 and 64 rows (graph replays;
``--sweep-experts`` the expert kernels' only); ``--adopt`` then runs the step again with the expert tiles fastest
at one row among those no slower at 64 rows (the numbers to set in ``kernels/moe.py``);
``--cuda-cores`` runs the CUDA-core kernels instead, at every batch size (``kernels.launch.CUDA_CORE_ROWS``).
Prints JSON lines (device and versions first); with OUT set, also writes them all to $OUT/``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import replay_ms  # noqa: E402

from dsvl2 import kernels  # noqa: E402
from dsvl2.model.language import LanguageModel  # noqa: E402
from dsvl2.model.moe import set_impl  # noqa: E402
from dsvl2.model.tiny import random_model  # noqa: E402

ROWS, CONTEXT, GREEDY_STEPS = 64, 2048, 16
RECORD: dict[str, object] = {}


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)
    RECORD.update(kw)
    RECORD.setdefault("lines", []).append(kw)  # every line, also those a later line's keys overwrite above


def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn run twice on a side stream, then captured -> (graph, its output, refilled by each replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_us(fn: Callable[[], object]) -> float:
    graph, _ = capture(fn)
    return round(1e3 * replay_ms(graph), 1)


@contextlib.contextmanager
def plain(lm: LanguageModel) -> Iterator[None]:
    """The plain path: each layer's uncompiled decode, no Triton kernels, the routed experts in a loop."""
    compiled = [layer.__dict__.pop("decode", None) for layer in lm.model.layers]
    saved, kernels.launch.triton = kernels.launch.triton, None
    set_impl(lm, "loop")
    try:
        yield
    finally:
        set_impl(lm, "grouped")
        kernels.launch.triton = saved
        for layer, fn in zip(lm.model.layers, compiled, strict=True):
            if fn is not None:
                layer.decode = fn


def invariance_and_speed(lm: LanguageModel, batches: list[int]) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, lm.cfg.vocab_size, (ROWS,), generator=g, device="cuda")
    pos = torch.randint(16, CONTEXT - 1, (ROWS,), generator=g, device="cuda")
    cache = lm.new_cache(ROWS, CONTEXT).normal_(generator=g)
    # Each row alone, from its own copy of its cache (a step writes the row at pos: the same bits each time).
    alone = torch.stack([lm.decode(tokens[r:r + 1], pos[r:r + 1], cache[:, r:r + 1].clone())[0] for r in range(ROWS)])
    for b in batches:
        rows = (tokens[:b], pos[:b], cache[:, :b].clone())
        t0 = time.perf_counter()
        direct = lm.decode(*rows)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0  # includes compiling for this batch size
        graph, out = capture(lambda rows=rows: lm.decode(*rows))
        ms = replay_ms(graph)
        same = direct.argmax(-1) == alone[:b].argmax(-1)
        emit(batch=b, step_ms=round(ms, 3), tokens_per_s=round(b / ms * 1e3, 1), first_call_s=round(first_s, 1),
             max_abs_diff_vs_alone=float((direct - alone[:b]).abs().max()), argmax_same_as_alone=int(same.sum()),
             graph_equals_direct=bool(torch.equal(out, direct)))
        del graph, out, rows


def fast_vs_plain(lm: LanguageModel, rows: int = 8) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    first = torch.randint(0, lm.cfg.vocab_size, (rows,), generator=g, device="cuda")
    start = torch.randint(16, CONTEXT // 2, (rows,), generator=g, device="cuda")
    cache = lm.new_cache(rows, CONTEXT).normal_(generator=g)
    fast_cache, plain_cache = cache.clone(), cache
    ids, tok = [], first
    for i in range(GREEDY_STEPS):
        tok = lm.decode(tok, start + i, fast_cache).argmax(-1)
        ids.append(tok)
    agree, margin, tok = 0, 0.0, first
    with plain(lm):
        for i in range(GREEDY_STEPS):
            logits = lm.decode(tok, start + i, plain_cache)
            agree += int((logits.argmax(-1) == ids[i]).sum())
            margin = max(margin, float((logits.max(-1).values - logits.gather(-1, ids[i][:, None])[:, 0]).max()))
            tok = ids[i]  # teacher forcing: the plain step follows the fast step's ids
    emit(fast_vs_plain_argmax_equal=agree, fast_vs_plain_compared=rows * GREEDY_STEPS,
         fast_vs_plain_max_margin=round(margin, 4))


@contextlib.contextmanager
def patched(module: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def sweep(lm: LanguageModel, only_experts: bool = False) -> dict[str, dict[str, list[float]]]:
    """Microseconds per call (graph replay) at 1, 8 and 64 rows of each tensor-core kernel's candidate tiles
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), and cuBLAS for the linear layers:
    {kernel: {tiles: [1 row, 8 rows, 64 rows]}}."""
    d = lm.cfg.hidden_size
    attn, dense, block = lm.model.layers[1].self_attn, lm.model.layers[0].mlp, lm.model.layers[1]
    norm = block.post_attention_layernorm
    sizes = (1, 8, ROWS)
    out: dict[str, dict[str, list[float]]] = {}
    narrow = ((16, 32, 256, 4, 3), (16, 16, 256, 4, 3), (64, 32, 256, 4, 3), (64, 16, 256, 4, 3), (64, 32, 128, 4, 4),
              (64, 64, 128, 4, 3), (64, 16, 128, 4, 4))
    wide = ((16, 64, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 128, 4, 3), (64, 64, 256, 4, 3), (64, 128, 64, 4, 4),
            (64, 64, 128, 8, 3))
    experts = ((16, 32, 128, 4, 4), (16, 32, 128, 4, 3), (16, 16, 128, 4, 3), (16, 16, 128, 4, 4), (16, 16, 256, 4, 3),
               (16, 32, 256, 4, 2), (16, 32, 64, 4, 6), (16, 32, 128, 2, 4), (16, 32, 128, 8, 4), (16, 64, 128, 4, 2),
               (16, 64, 64, 4, 4))
    linear = (("q_kv_a", attn.q_kv_a), ("o_proj", attn.o_proj.weight), ("lm_head", lm.lm_head.weight),
              ("dense_gate_up", dense.gate_up), ("dense_down", dense.down_proj.weight))
    for name, w in () if only_experts else linear:
        xs = [torch.randn(b, w.shape[1], device="cuda", dtype=w.dtype) for b in sizes]
        times = out[f"gemv_{name}"] = {"cublas": [graph_us(lambda x=x, w=w: F.linear(x, w)) for x in xs]}
        knob, cfgs = ("MM_WIDE_CONFIG", wide) if w.shape[0] >= kernels.linear.GEMV_WIDE_N else ("MM_CONFIG", narrow)
        for cfg in cfgs:
            with patched(kernels.linear, knob, cfg):
                times[str(cfg)] = [graph_us(lambda x=x, w=w: kernels.linear.gemv(x, w)) for x in xs]
    inputs = [[torch.randn(b, 1, d, device="cuda", dtype=norm.weight.dtype) for _ in range(2)] for b in sizes]
    for knob in ("GATE_UP_MMA_CONFIG", "DOWN_MMA_CONFIG"):
        times = out[f"moe_block_{knob}"] = {}
        for cfg in experts:
            with patched(kernels.moe, knob, cfg):
                times[str(cfg)] = [graph_us(lambda x=x, a=a: block.mlp.decode_residual(x, a, norm)) for x, a in inputs]
    emit(sweep_us=out)
    return out


def adopt(times: dict[str, dict[str, list[float]]]) -> dict[str, tuple[int, ...]]:
    """For each expert knob, the sweep's tiles fastest at one row among those no more than 2 % slower at 64 rows
    than the current tiles; set in ``kernels.moe`` -> {knob: tiles}."""
    chosen = {}
    for knob in ("GATE_UP_MMA_CONFIG", "DOWN_MMA_CONFIG"):
        cands = times[f"moe_block_{knob}"]
        current = cands[str(getattr(kernels.moe, knob))]
        fine = {cfg: t for cfg, t in cands.items() if t[-1] <= 1.02 * current[-1]}
        best = min(fine, key=lambda cfg: fine[cfg][0])
        chosen[knob] = tuple(int(v) for v in best.strip("()").split(","))
        setattr(kernels.moe, knob, chosen[knob])
    return chosen


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32,64", help="batch sizes, at most 64")
    parser.add_argument("--sweep", action="store_true", help="also time the tensor-core kernels' tiles")
    parser.add_argument("--sweep-experts", action="store_true", help="--sweep of the expert kernels only")
    parser.add_argument("--adopt", action="store_true", help="after a sweep, run the step again with the expert "
                        "tiles fastest at one row (no more than 2 %% slower at 64 rows)")
    parser.add_argument("--cuda-cores", action="store_true", help="the CUDA-core kernels instead of tensor cores")
    parser.add_argument("--out", default="decode_kernels.json", help="file name under $OUT")
    parser.add_argument("--tiles", default="{}", help='tiles to use, e.g. {"MM_CONFIG": [64, 32, 256, 4, 3]}')
    args = parser.parse_args()
    for knob, tiles in json.loads(args.tiles).items():
        setattr(kernels.linear if hasattr(kernels.linear, knob) else kernels.moe, knob, tuple(tiles))
    kernels.launch.CUDA_CORE_ROWS = kernels.launch.MAX_DECODE_TOKENS if args.cuda_cores else 0
    emit(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
         tensor_cores=not args.cuda_cores, tiles=json.loads(args.tiles))
    t0 = time.perf_counter()
    lm = random_model("small", "cuda").language
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in lm.model.layers:
        layer.decode = torch.compile(layer.decode, dynamic=False)
    x = torch.zeros(ROWS, 1, lm.cfg.hidden_size, device="cuda", dtype=lm.lm_head.weight.dtype)
    emit(build_s=round(time.perf_counter() - t0, 1), pdl=kernels.launch.use_pdl(x),
         kernel_paths={"attention": lm.model.layers[1].self_attn._kernels_ok(x),
                       "moe": lm.model.layers[1].mlp.decode_kernels_ok(x),
                       "norm": kernels.norm.rms_norm_ok(x, lm.model.norm.weight),
                       "lm_head": kernels.linear.gemv_ok(x[:, 0], lm.lm_head.weight),
                       "dense_mlp": kernels.linear.gemv_ok(x, lm.model.layers[0].mlp.gate_up)})
    invariance_and_speed(lm, [int(b) for b in args.batches.split(",")])
    fast_vs_plain(lm)
    if args.sweep or args.sweep_experts:
        times = sweep(lm, only_experts=args.sweep_experts)
        if args.adopt:
            emit(adopted={k: list(v) for k, v in adopt(times).items()})
            invariance_and_speed(lm, [int(b) for b in args.batches.split(",")])
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], args.out).write_text(json.dumps(RECORD, indent=1))


if __name__ == "__main__":
    main()
