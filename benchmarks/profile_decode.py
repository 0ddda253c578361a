"""Where decode and prefill time goes, with kernel checks (CUDA).

    python benchmarks/profile_decode.py [CHECKPOINT_DIR] [--trace DIR]

Without a checkpoint the model is built with random weights of the real shapes directly on the GPU
(``dsvl2.model.tiny.random_model``), which takes seconds rather than the minutes of writing and loading 32 GB.
Prints JSON lines: the Triton kernels against the plain paths, graph-replay times of the parts of a
decode step (kernels on and off), the compiled step per sampler mode, the time to first token, fast
against plain greedy ids, and kernel tables of one decode step and one prefill. ``--trace DIR`` also writes
a gzipped Chrome trace (host and GPU) of one request's time to first token, ``DIR/ttft_trace.json.gz``, to see
where the host and the GPU wait for each other (open it in Perfetto).
"""

from __future__ import annotations

import gzip
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
from gpu_timing import graph_ms, replay_ms  # noqa: E402

from dsvl2 import kernels  # noqa: E402
from dsvl2.inputs.processor import Processor  # noqa: E402
from dsvl2.model import moe  # noqa: E402
from dsvl2.model.tiny import random_model, write_processor_files  # noqa: E402
from dsvl2.serving.engine import Engine, EngineConfig  # noqa: E402
from dsvl2.serving.sampling import SamplingParams  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def without_kernels(fn):
    saved, kernels.launch.triton = kernels.launch.triton, None
    try:
        return fn()
    finally:
        kernels.launch.triton = saved


@torch.inference_mode()
def main() -> None:
    t0 = time.perf_counter()
    args = sys.argv[1:]
    trace_dir = None
    if "--trace" in args:
        i = args.index("--trace")
        trace_dir = Path(args[i + 1])
        del args[i:i + 2]
    if args:
        engine = Engine.from_pretrained(args[0], EngineConfig(background_load=False))
    else:
        model = random_model("small", "cuda")
        engine = Engine(model, Processor.from_pretrained(write_processor_files(tempfile.mkdtemp())))
    emit(build_s=round(time.perf_counter() - t0, 1), device=torch.cuda.get_device_name(), torch=torch.__version__)
    lm = engine.model.language
    d = lm.cfg.hidden_size
    block = lm.model.layers[1]
    x = torch.randn(1, 1, d, device="cuda", dtype=torch.bfloat16)

    # Kernels against the plain paths (bf16, real shapes), launched with and without PDL.
    checks = {}
    engine.pos.fill_(1500)
    engine.cache.normal_()
    cs = lm.rope[engine.pos][:, None]
    att = block.self_attn
    for pdl in (False, True):
        kernels.launch.PDL = pdl
        tag = "pdl_" if pdl else ""
        for tokens in (1, 4):
            xt = torch.randn(1, tokens, d, device="cuda", dtype=torch.bfloat16)
            moe.set_impl(block.mlp, "loop")
            ref = without_kernels(lambda xt=xt: block.mlp(xt))
            moe.set_impl(block.mlp, "grouped")
            checks[f"{tag}moe_fused_{tokens}_tokens"] = rel(block.mlp(xt), ref)
        ref_cache, got_cache = engine.cache[1].clone(), engine.cache[1].clone()
        ref = without_kernels(lambda c=ref_cache: att.decode(x, cs, c, engine.pos))
        checks[f"{tag}attention_pos1500"] = rel(att.decode(x, cs, got_cache, engine.pos), ref)
        checks[f"{tag}attention_cache_row"] = rel(got_cache[0, 1500], ref_cache[0, 1500])
        ref_cache, got_cache = engine.cache[1].clone(), engine.cache[1].clone()
        ref = without_kernels(lambda c=ref_cache: block.decode(x, cs, c, engine.pos))
        checks[f"{tag}decoder_layer_pos1500"] = rel(block.decode(x, cs, got_cache, engine.pos), ref)
    emit(kernel_rel_err=checks, pdl_supported=kernels.launch.use_pdl(x))

    # Parts of a decode step, eager (graph replay): kernels with PDL, without PDL, and off.
    parts = {}
    for name, fn in (("attention_us", lambda: att.decode(x, cs, engine.cache[1], engine.pos)),
                     ("moe_us", lambda: block.mlp(x)),
                     ("model_decode_ms", lambda: lm.decode(engine.tokens, engine.pos, engine.cache)),
                     ("lm_head_ms", lambda: lm.logits(x[:, 0]))):
        scale = 1e3 if name.endswith("us") else 1
        times = []
        for pdl in (True, False):
            kernels.launch.PDL = pdl
            times.append(round(graph_ms(fn) * scale, 2))
        times.append(round(without_kernels(lambda fn=fn: graph_ms(fn)) * scale, 2))
        parts[name] = times
    kernels.launch.PDL = True
    emit(eager_parts_pdl_nopdl_off=parts)

    # Block sizes of the whole-row (PDL) matrix-vector kernel (graph replay, microseconds).
    sweep = {}
    wq, wo = block.self_attn.q_kv_a, block.self_attn.o_proj.weight
    default = kernels.linear.GEMV_PDL_CONFIG
    for cfg in ((2, 1), (2, 2), (4, 2), (4, 4), (8, 4)):
        kernels.linear.GEMV_PDL_CONFIG = cfg
        sweep[f"gemv_q_kv_a_{cfg}"] = round(1e3 * graph_ms(lambda: kernels.linear.gemv(x, wq)), 2)
        sweep[f"gemv_o_proj_{cfg}"] = round(1e3 * graph_ms(lambda: kernels.linear.gemv(x, wo)), 2)
    kernels.linear.GEMV_PDL_CONFIG = default
    default = kernels.moe.DOWN_CONFIG
    for cfg in ((8, 4), (4, 4), (8, 8), (16, 4)):
        kernels.moe.DOWN_CONFIG = cfg
        sweep[f"moe_down_pdl_{cfg}"] = round(1e3 * graph_ms(lambda: block.mlp(x)), 2)
    kernels.moe.DOWN_CONFIG = default
    kernels.launch.PDL = False
    sweep["gemv_q_kv_a_loop"] = round(1e3 * graph_ms(lambda: kernels.linear.gemv(x, wq)), 2)
    sweep["gemv_o_proj_loop"] = round(1e3 * graph_ms(lambda: kernels.linear.gemv(x, wo)), 2)
    kernels.launch.PDL = True
    checks = {"gemv_q_kv_a": rel(kernels.linear.gemv(x, wq), torch.nn.functional.linear(x, wq))}
    emit(sweep_us=sweep, gemv_rel_err=checks)

    t1 = time.perf_counter()
    engine.pos.zero_()
    engine.cache.zero_()
    engine.warmup()
    emit(warmup_s_cold_cache=round(time.perf_counter() - t1, 1))
    print(torch._dynamo.utils.compile_times(repr="str"), flush=True)
    steps = {m: round(replay_ms(engine.graphs[m]), 3) for m in ("greedy", "top", "full")}
    kernels.launch.PDL = False
    engine.capture()
    steps["greedy_no_pdl"] = round(replay_ms(engine.graphs["greedy"]), 3)
    kernels.launch.PDL = True
    engine.capture()
    steps["greedy_pdl_again"] = round(replay_ms(engine.graphs["greedy"]), 3)
    emit(step_ms=steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.graphs["greedy"].replay()
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
    if trace_dir is not None:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            r = engine.prepare("<image>\nDescribe this image.", [image], greedy, 2)
            list(engine.stream(r))
            torch.cuda.synchronize()
        raw = Path(tempfile.mkdtemp()) / "trace.json"
        prof.export_chrome_trace(str(raw))
        trace_dir.mkdir(parents=True, exist_ok=True)
        with gzip.open(trace_dir / "ttft_trace.json.gz", "wb") as f:
            f.write(raw.read_bytes())
        emit(trace=str(trace_dir / "ttft_trace.json.gz"), traced_ttft_ms=round(r.stats.time_to_first_token_s * 1e3, 1))
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

    # Time to first token without the captured prefill.
    engine.runner.replay_prefill = False
    ttft = []
    for _ in range(4):
        r = engine.prepare("<image>\nDescribe this image.", [image], greedy, 1)
        list(engine.stream(r))
        ttft.append(round(r.stats.time_to_first_token_s * 1e3, 1))
    emit(ttft_ms_no_prefill_graph=ttft)


if __name__ == "__main__":
    main()
