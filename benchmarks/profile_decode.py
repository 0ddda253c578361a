"""Where a decode step's time goes: graph-replay time of its parts and a kernel table (CUDA).

    python benchmarks/profile_decode.py CHECKPOINT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsvl2 import kernels, moe  # noqa: E402
from dsvl2.engine import Engine  # noqa: E402


def graph_ms(fn, reps: int = 50) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@torch.inference_mode()
def main() -> None:
    engine = Engine.from_pretrained(sys.argv[1], "cuda", torch.bfloat16)
    lm = engine.model.language
    layer = lm.model.layers[1].mlp
    x = torch.randn(1, lm.cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    w, ids = layer.route(x)
    ref = moe.looped_experts(x, w, ids, layer.experts).float()
    for name, fn in (("grouped", lambda: moe.grouped_experts(x, w, ids, layer.experts)),
                     ("triton", lambda: kernels.routed_experts(x, w, ids, layer.experts.w13, layer.experts.w2))):
        out = fn().float()
        rel = ((out - ref).norm() / ref.norm()).item()
        print(f"{name}: rel err vs loop {rel:.2e}; graph {graph_ms(fn) * 1e3:.1f} us per layer")
    results = []
    for bn in (8, 16, 32):
        for bk in (128, 256, 512):
            for nw in (2, 4, 8):
                cfg = (bn, bk, nw)
                t_gu = graph_ms(lambda c=cfg: kernels.routed_experts(x, w, ids, layer.experts.w13, layer.experts.w2,
                                                                     gate_up_config=c, down_config=(16, 256, 4)))
                t_dn = graph_ms(lambda c=cfg: kernels.routed_experts(x, w, ids, layer.experts.w13, layer.experts.w2,
                                                                     gate_up_config=(16, 256, 4), down_config=c))
                results.append((t_gu, t_dn, cfg))
    print("best gate_up config:", min(results)[2], "best down config:", min(results, key=lambda r: r[1])[2])
    print("sweep (us, gate_up varied / down varied):",
          [(round(a * 1e3, 1), round(b * 1e3, 1), c) for a, b, c in results])
    engine.pos.fill_(1500)
    engine.temperature.fill_(0.1)
    engine.top_k.fill_(50)
    engine.top_p.fill_(0.9)
    for impl in ("grouped", "auto"):
        if impl == "grouped":
            saved, kernels.triton = kernels.triton, None
        print(f"[{impl}] model decode: {graph_ms(lambda: lm.decode(engine.tokens, engine.pos, engine.cache)):.3f} ms")
        print(f"[{impl}] full step: {graph_ms(engine._step_eager):.3f} ms")
        if impl == "grouped":
            kernels.triton = saved
    logits = lm.decode(engine.tokens, engine.pos, engine.cache)
    from dsvl2.sampling import sample
    print("sampler:", round(graph_ms(lambda: sample(logits, engine.seen, engine.temperature, engine.top_p,
                                                      engine.top_k, engine.penalty, engine.noise)), 3), "ms")
    print("lm_head+norm:", round(graph_ms(lambda: lm.logits(x[:, None])), 3), "ms")
    att = lm.model.layers[1].self_attn
    cs = lm.rope[engine.pos][:, None]
    print("attention layer:", round(graph_ms(lambda: att.decode(x[:, None], cs, engine.cache[1], engine.pos)) * 1e3, 1),
          "us")
    print("shared expert:", round(graph_ms(lambda: layer.shared_experts(x)) * 1e3, 1), "us")
    print("route:", round(graph_ms(lambda: layer.route(x)) * 1e3, 1), "us")
    engine.compile()
    for mode in ("greedy", "top", "full"):
        print(f"[compiled] full step, sampler {mode}: {graph_ms(lambda m=mode: engine._step_eager(m)):.3f} ms")
    print(f"[compiled] model decode: {graph_ms(lambda: lm.decode(engine.tokens, engine.pos, engine.cache)):.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine._step_eager()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
    from PIL import Image

    from dsvl2.sampling import SamplingParams
    req = engine.prepare("<image>\nDescribe.", [Image.new("RGB", (800, 600))], SamplingParams(temperature=0), 1)
    list(engine.stream(req))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        list(engine.stream(req))
        torch.cuda.synchronize()
    print(f"prefill ttft {req.stats.time_to_first_token_s * 1e3:.1f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


if __name__ == "__main__":
    main()
