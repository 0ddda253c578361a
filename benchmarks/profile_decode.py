"""Where decode and prefill time goes, with kernel checks (CUDA).

    python benchmarks/profile_decode.py [CHECKPOINT_DIR]

Without a checkpoint the model is built with random weights of the real shapes directly on the GPU
(``dsvl2.tiny.random_model``), which takes seconds rather than the minutes of writing and loading 32 GB.
Prints JSON lines: the Triton kernels against the plain paths, graph-replay times of the parts of a
decode step (kernels on and off), the compiled step per sampler mode, the time to first token, fast
against plain greedy ids, and kernel tables of one decode step and one prefill.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp())  # cold compile cache: honest times
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp())

import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import plain_path, teacher_forced  # noqa: E402

from dsvl2 import kernels, moe  # noqa: E402
from dsvl2.engine import Engine, capture_graph  # noqa: E402
from dsvl2.processor import Processor  # noqa: E402
from dsvl2.sampling import SamplingParams  # noqa: E402
from dsvl2.tiny import random_model, write_processor_files  # noqa: E402


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 100) -> float:
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graph_ms(fn, reps: int = 50) -> float:
    graph, _ = capture_graph(fn, None, warmups=1)
    return replay_ms(graph, reps)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def without_kernels(fn):
    saved, kernels.triton = kernels.triton, None
    try:
        return fn()
    finally:
        kernels.triton = saved


@torch.inference_mode()
def main() -> None:
    t0 = time.perf_counter()
    if len(sys.argv) > 1:
        engine = Engine.from_pretrained(sys.argv[1], "cuda", torch.bfloat16)
    else:
        model = random_model("small", "cuda")
        engine = Engine(model, Processor.from_pretrained(write_processor_files(tempfile.mkdtemp())))
    emit(build_s=round(time.perf_counter() - t0, 1), device=torch.cuda.get_device_name(), torch=torch.__version__)
    lm = engine.model.language
    d = lm.cfg.hidden_size
    block = lm.model.layers[1]
    x = torch.randn(1, 1, d, device="cuda", dtype=torch.bfloat16)

    # Kernels against the plain paths (bf16, real shapes).
    checks = {}
    for tokens in (1, 4):
        xt = torch.randn(1, tokens, d, device="cuda", dtype=torch.bfloat16)
        moe.MoE.impl = "loop"
        ref = without_kernels(lambda xt=xt: block.mlp(xt))
        moe.MoE.impl = "grouped"
        checks[f"moe_fused_{tokens}_tokens"] = rel(block.mlp(xt), ref)
    engine.pos.fill_(1500)
    engine.cache.normal_()
    cs = lm.rope[engine.pos][:, None]
    att = block.self_attn
    ref = without_kernels(lambda: att.decode(x, cs, engine.cache[1].clone(), engine.pos))
    checks["attention_pos1500"] = rel(att.decode(x, cs, engine.cache[1].clone(), engine.pos), ref)
    emit(kernel_rel_err=checks)

    # Parts of a decode step, eager (graph replay), kernels on and off.
    parts = {}
    for name, fn in (("attention_us", lambda: att.decode(x, cs, engine.cache[1], engine.pos)),
                     ("moe_us", lambda: block.mlp(x)),
                     ("model_decode_ms", lambda: lm.decode(engine.tokens, engine.pos, engine.cache)),
                     ("lm_head_ms", lambda: lm.logits(x[:, 0]))):
        scale = 1e3 if name.endswith("us") else 1
        parts[name] = [round(graph_ms(fn) * scale, 2), round(without_kernels(lambda fn=fn: graph_ms(fn)) * scale, 2)]
    emit(eager_parts_kernels_on_off=parts)

    # Block-size sweeps of the new kernels (graph replay, microseconds).
    sweep = {}
    q_lat = torch.randn(1, 16, 512, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(1, 16, 64, device="cuda", dtype=torch.bfloat16)
    kv_b = block.self_attn.kv_b_proj.weight
    for splits in (16, 32, 64):
        for bs in (16, 32, 64):
            kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK_S = splits, bs
            sweep[f"attention_{splits}x{bs}"] = round(1e3 * graph_ms(
                lambda: kernels.latent_attention(q_lat, q_rope, engine.cache[1], engine.pos, 0.07)), 2)
    q_nope = torch.randn(1, 16, 128, device="cuda", dtype=torch.bfloat16)
    sweep["absorb_query"] = round(1e3 * graph_ms(lambda: kernels.absorb_query(q_nope, kv_b, 128)), 2)
    w_uk = kv_b.view(16, 256, 512)[:, :128]
    sweep["absorb_query_cublas"] = round(1e3 * graph_ms(lambda: torch.einsum("bhd,hdr->bhr", q_nope, w_uk)), 2)
    kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK_S = 64, 32
    for be in (1, 2, 4, 8):
        kernels.ROUTER_BLOCK_E = be
        sweep[f"moe_router_block_{be}"] = round(1e3 * graph_ms(lambda: block.mlp(x)), 2)
    kernels.ROUTER_BLOCK_E = 1
    for name, configs in (("GATE_UP_CONFIG", ((8, 512, 2), (16, 512, 4), (8, 256, 2), (4, 512, 1), (8, 1024, 4))),
                          ("DOWN_CONFIG", ((16, 128, 8), (8, 256, 4), (32, 128, 8), (16, 256, 8), (16, 64, 4)))):
        default = getattr(kernels, name)
        for cfg in configs:
            setattr(kernels, name, cfg)
            sweep[f"moe_{name}_{cfg}"] = round(1e3 * graph_ms(lambda: block.mlp(x)), 2)
        setattr(kernels, name, default)
    wq, wo = block.self_attn.q_kv_a, block.self_attn.o_proj.weight
    for cfg in ((16, 512, 4), (8, 512, 2), (8, 1024, 4), (4, 512, 1), (16, 256, 4), (32, 512, 8)):
        kernels.GEMV_CONFIG = cfg
        sweep[f"gemv_q_kv_a_{cfg}"] = round(1e3 * graph_ms(lambda: kernels.gemv(x, wq)), 2)
        sweep[f"gemv_o_proj_{cfg}"] = round(1e3 * graph_ms(lambda: kernels.gemv(x, wo)), 2)
    sweep["cublas_q_kv_a"] = round(1e3 * graph_ms(lambda: torch.nn.functional.linear(x, wq)), 2)
    sweep["cublas_o_proj"] = round(1e3 * graph_ms(lambda: torch.nn.functional.linear(x, wo)), 2)
    kernels.GEMV_CONFIG = (4, 512, 1)
    checks = {"gemv_q_kv_a": rel(kernels.gemv(x, wq), torch.nn.functional.linear(x, wq))}
    emit(sweep_us=sweep, gemv_rel_err=checks)

    t1 = time.perf_counter()
    engine.pos.zero_()
    engine.cache.zero_()
    engine.warmup()
    emit(warmup_s_cold_cache=round(time.perf_counter() - t1, 1))
    steps = {m: round(replay_ms(engine.graphs[m]), 3) for m in ("greedy", "top", "full")}
    emit(step_ms=steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine._step_eager("greedy")
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))

    engine.cache.zero_()
    engine.pos.zero_()
    image = Image.radial_gradient("L").resize((800, 600)).convert("RGB")
    greedy = SamplingParams(temperature=0.0, seed=0)
    ttft = []
    for _ in range(5):
        req = engine.prepare("<image>\nDescribe this image.", [image], greedy, 64)
        list(engine.stream(req))
        ttft.append(round(req.stats.time_to_first_token_s * 1e3, 1))
    emit(ttft_ms=ttft, prompt_tokens=req.stats.prompt_tokens, decode_tok_s=round(req.stats.tokens_per_second, 1))
    req1 = engine.prepare("<image>\nDescribe this image.", [image], greedy, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        list(engine.stream(req1))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))

    # Fast against plain: last-position prefill logits, then 64 greedy ids.
    enc = req1.encoded
    emb = engine.model.embed(enc.input_ids, enc.image_mask, enc.pixel_values, enc.spatial_crops)
    cache = lm.new_cache(1)
    fast_logits = lm.logits(lm.prefill(emb[None], cache)[:, -1])
    ids = req.output_ids
    restore = plain_path(engine)
    emb_plain = engine.model.embed(enc.input_ids, enc.image_mask, enc.pixel_values, enc.spatial_crops)
    plain_logits = lm.logits(lm.prefill(emb_plain[None], cache)[:, -1])
    tf = teacher_forced(engine, emb_plain, ids)
    top2 = plain_logits[0].topk(2).values
    emit(**tf, prefill_logits_rel_l2=rel(fast_logits, plain_logits), embeds_rel_l2=rel(emb, emb_plain),
         argmax_fast=int(fast_logits.argmax()), argmax_plain=int(plain_logits.argmax()),
         plain_top2_gap=float(top2[0] - top2[1]), logits_abs_max=float(plain_logits.abs().max()))
    req2 = engine.prepare("<image>\nDescribe this image.", [image], greedy, 64)
    list(engine.stream(req2))
    restore()
    same = next((i for i, (a, b) in enumerate(zip(ids, req2.output_ids, strict=False)) if a != b), len(ids))
    emit(fast_vs_plain_equal_prefix=same, compared=len(ids), fast_ids=ids[:8], plain_ids=req2.output_ids[:8],
         plain_ttft_ms=round(req2.stats.time_to_first_token_s * 1e3))

    # Time to first token without the captured prefill, then with parts of it left eager (what each buys).
    engine.graph_prefill = False
    for label, modules in (("no_prefill_graph", []), ("eager_lm_prefill", lm.model.layers),
                           ("eager_vision_too", engine.model.vision.blocks)):
        for module in modules:
            module.__dict__.pop("forward", None)
        ttft = []
        for _ in range(4):
            r = engine.prepare("<image>\nDescribe this image.", [image], greedy, 1)
            list(engine.stream(r))
            ttft.append(round(r.stats.time_to_first_token_s * 1e3, 1))
        emit(**{f"ttft_ms_{label}": ttft})


if __name__ == "__main__":
    main()
