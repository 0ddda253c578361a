"""End-to-end benchmark on random weights of the real shapes, fast path and plain path side by side.

    python benchmarks/bench.py --workdir /tmp/dsvl2-bench --out results.json

Builds (once) a full-size random checkpoint in the official layout on local disk, loads it the way
the service does, captures the decode graph, then measures: load and setup time, time to first
token for one 3x2-tiled image + short prompt, batch-1 decode tokens/s (greedy and sampled), peak
GPU memory for a request that fills the 4096-token context, and the same prefill/decode on the
plain path (eager, one expert at a time). It also checks that the fast path agrees with the plain
path (greedy ids for 64 tokens, last-position logits). ``--preset demo --device cpu`` runs the same
script on a tiny checkpoint, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsvl2 import kernels  # noqa: E402
from dsvl2.model.moe import set_impl  # noqa: E402
from dsvl2.model.tiny import build_random_checkpoint  # noqa: E402
from dsvl2.serving.engine import Engine, EngineConfig  # noqa: E402
from dsvl2.serving.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=50, repetition_penalty=1.0, seed=0)
DEFAULT = SamplingParams(temperature=0.1, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(engine: Engine, prompt: str, images: list, params: SamplingParams, n: int) -> tuple[object, float]:
    t0 = time.perf_counter()
    req = engine.prepare(prompt, images, params, n)
    t_prep = time.perf_counter() - t0
    for _ in engine.stream(req):
        pass
    return req, t_prep


def plain_path(engine: Engine):
    """Switch the engine to the plain path; returns a function that switches back."""
    compiled = {}
    for module in [*engine.model.language.model.layers, *engine.model.vision.blocks]:
        compiled[module] = {k: module.__dict__.pop(k) for k in ("decode", "forward") if k in module.__dict__}
    graphs, engine.runner.decode_graphs = engine.runner.decode_graphs, {}
    engine.runner.replay_prefill = False
    saved_triton, kernels.launch.triton = kernels.launch.triton, None
    set_impl(engine.model, "loop")

    def restore() -> None:
        set_impl(engine.model, "grouped")
        kernels.launch.triton = saved_triton
        engine.runner.decode_graphs = graphs
        engine.runner.replay_prefill = True
        for module, attrs in compiled.items():
            module.__dict__.update(attrs)

    return restore


def teacher_forced(engine: Engine, prompt_embeds: torch.Tensor, ids: list[int]) -> dict:
    """Score a generated greedy sequence with the current path: per position, does its argmax equal the id,
    and where not, by how much does it prefer its own choice."""
    lm = engine.model.language
    tokens = torch.tensor(ids, device=prompt_embeds.device)
    embeds = torch.cat([prompt_embeds, lm.model.embed_tokens(tokens[:-1])])[None]
    cache = lm.new_cache(1, embeds.shape[1])
    logits = lm.logits(lm.prefill(embeds, cache)[0, -len(ids):])  # the predictions of ids[0], ids[1], ...
    best = logits.argmax(-1)
    margin = logits.max(-1).values - logits.gather(-1, tokens[:, None])[:, 0]
    return {"teacher_forced_argmax_equal": int((best == tokens).sum()), "teacher_forced_compared": len(ids),
            "teacher_forced_max_margin": round(float(margin.max()), 4)}


def kernel_checks() -> dict:
    """Relative error of the fused decode MoE block (router, routed and shared expert kernels) against the
    plain block (experts in a loop, cuBLAS), fresh random inputs."""
    from dsvl2.model.config import LanguageConfig
    from dsvl2.model.moe import MoE

    out = {}
    cfg = LanguageConfig()
    for tokens in (1, 2, 4):
        with torch.device("cuda"):
            layer = MoE(cfg).to(torch.bfloat16)
        for p in layer.parameters():
            p.data.normal_(0, 0.02)
        layer.shared_experts.fuse()
        x = torch.randn(1, tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        set_impl(layer, "loop")
        saved, kernels.launch.triton = kernels.launch.triton, None
        ref = layer(x).float()
        kernels.launch.triton = saved
        set_impl(layer, "grouped")
        got = layer(x).float()
        out[f"moe_fused_{tokens}_tokens"] = float((got - ref).norm() / ref.norm())
    return out


def host_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/dsvl2-bench")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    res: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version()}
    if dev == "cuda":
        import triton

        res.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    ckpt = Path(args.workdir) / f"ckpt-{args.preset}"
    if not (ckpt / "config.json").exists():
        t0 = time.perf_counter()
        build_random_checkpoint(ckpt, args.preset, std=0.02, n_shards=4, device=dev)
        res["write_checkpoint_s"] = round(time.perf_counter() - t0, 1)
        print(f"wrote checkpoint in {res['write_checkpoint_s']} s", flush=True)
    res["checkpoint_gb"] = round(sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9, 2)

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(ckpt, EngineConfig(device=dev, dtype=dtype, background_load=False),
                                    log=lambda s: print(s, flush=True))
    sync(dev)
    res["load_s"] = round(time.perf_counter() - t0, 1)
    res["params_b"] = round(sum(p.numel() for p in engine.model.parameters()) / 1e9, 3)
    res["host_peak_after_load_gb"] = round(host_peak_gb(), 1)
    if dev == "cuda":
        res["gpu_after_load_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
    t1 = time.perf_counter()
    engine.warmup()
    sync(dev)
    res["warmup_s"] = round(time.perf_counter() - t1, 1)
    res["setup_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res), flush=True)

    image = Image.radial_gradient("L").resize((800, 600)).convert("RGB")  # tiles 3x2: 1415 image tokens
    prompt = "<image>\nDescribe this image."
    ttfts, preps = [], []
    for _ in range(9):
        req, t_prep = run(engine, prompt, [image], GREEDY, 1)
        ttfts.append(req.stats.time_to_first_token_s)
        preps.append(t_prep)
    res["prompt_tokens"] = req.stats.prompt_tokens
    res["ttft_ms"] = round(1e3 * statistics.median(ttfts), 1)
    res["ttft_ms_all"] = [round(1e3 * t, 1) for t in ttfts]
    res["preprocess_ms"] = round(1e3 * statistics.median(preps), 1)
    for name, params in (("greedy", GREEDY), ("sampled", DEFAULT)):
        rates = [run(engine, prompt, [image], params, args.decode_tokens)[0].stats.tokens_per_second
                 for _ in range(3)]
        res[f"decode_tok_s_{name}"] = round(statistics.median(rates), 1)
    t0 = time.perf_counter()
    req, _ = run(engine, prompt, [image], DEFAULT, 500)
    res["answer_500_tokens_s"] = round(time.perf_counter() - t0, 2)
    res["answer_500_tokens_generated"] = req.stats.output_tokens
    print(json.dumps(res), flush=True)

    if dev == "cuda":
        res["kernel_rel_err"] = kernel_checks()
    # Fast path against the plain path (eager, cuBLAS, one expert at a time): same request, greedy.
    fast, _ = run(engine, prompt, [image], GREEDY, 64)
    with torch.inference_mode():
        enc = fast.encoded
        emb = engine.model.embed(enc.input_ids, enc.image_mask, enc.pixel_values, enc.spatial_crops)
        cache = engine.model.language.new_cache(1)
        fast_logits = engine.model.language.logits(engine.model.language.prefill(emb[None], cache)[:, -1])
        restore = plain_path(engine)
        plain_logits = engine.model.language.logits(engine.model.language.prefill(emb[None], cache)[:, -1])
        # Teacher forcing: the plain path reads the prompt plus the fast path's 64 greedy ids in one prefill;
        # at every position its own greedy choice should be the fast path's id, or a near tie (the margin by
        # which the plain path prefers its choice is then within bf16 noise).
        res.update(teacher_forced(engine, emb, fast.output_ids))
    plain, _ = run(engine, prompt, [image], GREEDY, 64)
    n_same = next((i for i, (a, b) in enumerate(zip(fast.output_ids, plain.output_ids, strict=False)) if a != b),
                  min(len(fast.output_ids), len(plain.output_ids)))
    res["fast_vs_plain_greedy_ids_equal_prefix"] = n_same
    res["fast_vs_plain_greedy_ids_compared"] = min(len(fast.output_ids), len(plain.output_ids))
    res["fast_vs_plain_logits_max_abs"] = float((fast_logits - plain_logits).abs().max())
    res["logits_abs_max"] = float(plain_logits.abs().max())
    res["fast_vs_plain_logits_rel_l2"] = float((fast_logits - plain_logits).norm() / plain_logits.norm())
    ttfts = [run(engine, prompt, [image], GREEDY, 1)[0].stats.time_to_first_token_s for _ in range(2)]
    res["plain_ttft_ms"] = round(1e3 * min(ttfts), 1)
    res["plain_decode_tok_s"] = round(run(engine, prompt, [image], GREEDY, 16)[0].stats.tokens_per_second, 1)
    restore()
    print(json.dumps(res), flush=True)

    # A request that fills the context: a 3x3 image (2017 tokens) + long text, decoded to 4096.
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    big = Image.radial_gradient("L").resize((1152, 1152)).convert("RGB")
    long_prompt = "<image>\n" + "Describe every detail of the picture please. " * 40
    req = engine.prepare(long_prompt, [big], GREEDY, 4096)
    for _ in engine.stream(req):
        pass
    res["full_context_tokens"] = req.stats.prompt_tokens + req.stats.output_tokens
    res["full_context_prompt_tokens"] = req.stats.prompt_tokens
    if dev == "cuda":
        res["gpu_peak_full_context_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    res["host_peak_gb"] = round(host_peak_gb(), 1)
    print(json.dumps(res), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
