"""Speed and exactness of the service as each GPU it is served on, emulated on one H200 (issue 13, part 3), and the
fast path against the plain path on weights with outliers (part 1). On the device, from the repository root:

    python3 benchmarks/gpu_profiles.py --workdir /tmp/bench --out $OUT/gpu_profiles.json --outliers

Each profile of dsvl2/gpus.py (--profiles; default h200,l40s,a100-80,a100-40) runs in a process of its own with
DSVL2_EMULATE_GPU set: kernel choices are made at start-up and per device, compiled into the layers and captured in
graphs, and the slots are sized from the (emulated) memory, so profiles cannot share a setup. Each sets up as the
service does and reports its kernel choices (PDL, the prefill's expert product and tiles, slots), time to first token
(median of 5), batch-1 decode tokens/s (median of 3, greedy and sampled), the fused MoE decode block against the
plain one, and the fast path against the plain path (eager, experts in a loop): greedy ids over --tokens new tokens,
logits after the prompt and after each id, inf/nan in hidden states, logits and KV caches.
--outliers then (in the h200 process, else the first) sets 4 hidden channels of every RMSNorm gain to 50-100 and
scales the lm_head so that the largest logit is about 50, in place (the graphs read the same memory), and compares
the paths again, greedy and sampled. One JSON (--out), each process's log beside it, and a printed table.

Emulation forces what dsvl2 chooses, not the hardware: cuBLAS, torch._grouped_mm and Inductor still run H200 code,
and the speeds are the H200's. Wall time: ≈ 35 s to write the checkpoint (once; kept in --workdir), ≈ 75-95 s a
profile, --outliers ≈ 20 s more. A profile that would end after --budget-s is skipped (said in the JSON): run it in
another call with --profiles. --preset demo --device cpu runs the same on a tiny checkpoint (there the profiles
change nothing: their choices are CUDA's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench import DEFAULT, GREEDY, kernel_checks, plain_path, run, teacher_forced  # noqa: E402

from dsvl2 import gpus, kernels  # noqa: E402
from dsvl2.kernels import grouped_gemm  # noqa: E402
from dsvl2.model.moe import MoE  # noqa: E402
from dsvl2.serving.engine import Engine, EngineConfig  # noqa: E402

PROMPT = "<image>\nDescribe this image."
REL_L2_TOLERANCE = 0.05  # logits after bf16 kernels (the H200 measured 2.6e-2 on the last prompt position)


def safe(fn):
    """fn(), or its error: a report, not a check (an API that changed must not lose the run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {e}"


def kernel_choices(engine: Engine) -> dict:
    lm, dev = engine.model.language, engine.device
    layer = next(layer for layer in lm.model.layers if isinstance(layer.mlp, MoE))
    one = torch.zeros(1, 1, lm.cfg.hidden_size, device=dev, dtype=engine.model.dtype)
    ex, cuda = layer.mlp.experts, dev.type == "cuda"
    triton_gemm = lambda: (grouped_gemm.grouped_mm_ok(one[0], ex.w13, silu_pairs=True)  # noqa: E731
                           and grouped_gemm.grouped_mm_ok(one[0], ex.w2))
    return {k: safe(f) for k, f in {
        "capability": lambda: gpus.capability(dev) if cuda else None,
        "smem_optin_kib": lambda: gpus.shared_memory_optin(dev) // 1024 if cuda else None,
        "pdl": lambda: kernels.launch.use_pdl(one),
        "prefill_experts": lambda: "triton grouped GEMM" if triton_gemm() else "torch._grouped_mm",
        "grouped_gemm_tiles": lambda: {site: {**c, "smem_kib": grouped_gemm.shared_memory(c, 2) // 1024}
                                       for site, c in grouped_gemm.CONFIGS.items()},
        "tma": lambda: bool(triton_gemm() and grouped_gemm._tma_ok(one[0], ex.w13)),
        "decode_moe_kernels": lambda: layer.mlp.decode_kernels_ok(one),
        "decode_attention_kernels": lambda: layer.self_attn._kernels_ok(one),
        "slots": lambda: engine.slots,
        "graph_fallbacks": lambda: vars(engine.runner.fallbacks),
    }.items()}


def score(engine: Engine, emb: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The current path's prefill of the prompt and ids but the last -> float32 logits after the prompt and after each
    id [len(ids), V], the final hidden states (the residual stream: every layer's output added in) and their inf/nan
    count together with the latent cache's (every layer's normed input)."""
    lm = engine.model.language
    x = torch.cat([emb, lm.model.embed_tokens(torch.tensor(ids[:-1], device=emb.device))])[None]
    cache = lm.new_cache(1)
    hidden = lm.prefill(x, cache)
    return lm.logits(hidden[0, emb.shape[0] - 1:]), hidden, nonfinite(hidden, cache)


def prompt_embeds(engine: Engine, image: Image.Image) -> torch.Tensor:
    enc = engine.prepare(PROMPT, [image], GREEDY, 1).encoded
    return engine.model.embed(enc.input_ids, enc.image_mask, enc.pixel_values, enc.spatial_crops)


def nonfinite(*tensors: torch.Tensor) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors)


def same_prefix(a: list[int], b: list[int]) -> str:
    """"n/m": the first n of the m ids both have are the same."""
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"{n}/{min(len(a), len(b))}"


def float32_reference(engine: Engine, emb: torch.Tensor, ids: list[int], fast: torch.Tensor,
                      plain: torch.Tensor) -> dict:
    """Both bf16 paths' logits (fast, plain [len(ids), V]) against the plain path in float32 (the language model cast
    in place; cast back after, which is exact, but the fast path's graphs then point at freed memory: last use)."""
    lm = engine.model.language
    dtype = lm.lm_head.weight.dtype
    lm.float()
    try:
        with torch.inference_mode():
            ref = score(engine, emb.float(), ids)[0]
    finally:
        lm.to(dtype)
    best = ref.argmax(-1)
    return {f"{name}_vs_float32": {"rel_l2": float((x - ref).norm() / ref.norm()),
                                   "argmax_equal": int((x.argmax(-1) == best).sum()), "compared": len(ids)}
            for name, x in (("fast", fast), ("plain", plain))}


def compare(engine: Engine, image: Image.Image, n: int, sampled: bool = False, reference: bool = False) -> dict:
    """The fast path against the plain path on one request, greedy (and sampled with one seed); ``reference``: both
    against the plain path in float32 as well (the engine's fast path is unusable after it)."""
    modes = {"greedy": GREEDY, **({"sampled": DEFAULT} if sampled else {})}
    fast = {m: run(engine, PROMPT, [image], p, n)[0] for m, p in modes.items()}
    out = {"cache_nonfinite_after_fast": nonfinite(*engine.runner.cache)}  # every layer and position
    ids = fast["greedy"].output_ids
    with torch.inference_mode():
        emb = prompt_embeds(engine, image)
        fast_logits, hidden, out["fast_hidden_nonfinite"] = score(engine, emb, ids)
        out["fast_hidden_abs_max"] = float(hidden.abs().max())
        restore = plain_path(engine)
    try:
        with torch.inference_mode():
            plain_logits, hidden, out["plain_hidden_nonfinite"] = score(engine, emb, ids)
            out["plain_hidden_abs_max"] = float(hidden.abs().max())
            out.update(teacher_forced(engine, emb, ids))  # the plain path's argmax on the fast path's ids
        plain = {m: run(engine, PROMPT, [image], p, n)[0] for m, p in modes.items()}
        out["cache_nonfinite_after_plain"] = nonfinite(*engine.runner.cache)
        if reference:
            out.update(float32_reference(engine, emb, ids, fast_logits, plain_logits))
    finally:
        restore()
    for m in modes:
        out[f"{m}_ids_equal"] = same_prefix(fast[m].output_ids, plain[m].output_ids)
    d = fast_logits - plain_logits
    out["logits_nonfinite"] = nonfinite(fast_logits, plain_logits)
    out.update(logits_max_abs=float(d[0].abs().max()), logits_rel_l2=float(d[0].norm() / plain_logits[0].norm()),
               logits_rel_l2_all_positions=float(d.norm() / plain_logits.norm()),
               logits_abs_max=float(plain_logits.abs().max()),
               top1_prob_mean=float(plain_logits.softmax(-1).max(-1).values.mean()),
               plain_decode_tok_s=round(plain["greedy"].stats.tokens_per_second, 1))
    return out


def add_outliers(engine: Engine, image: Image.Image, channels: int = 4, target: float = 50.0) -> dict:
    """In place: ``channels`` hidden channels of every RMSNorm gain (input, post-attention, final) set to 50-100, then
    the lm_head scaled so that the fast path's largest logit after the prompt is about ``target``."""
    lm = engine.model.language
    gen = torch.Generator().manual_seed(13)
    ch = torch.randperm(lm.cfg.hidden_size, generator=gen)[:channels].to(engine.device)
    gains = (50 + 50 * torch.rand(channels, generator=gen)).to(engine.device, engine.model.dtype)
    norms = [lm.model.norm, *(n for x in lm.model.layers for n in (x.input_layernorm, x.post_attention_layernorm))]
    with torch.inference_mode():
        for norm in norms:
            norm.weight[ch] = gains
        emb = prompt_embeds(engine, image)
        scale = target / float(lm.logits(lm.prefill(emb[None], lm.new_cache(1))[:, -1]).abs().max())
        lm.lm_head.weight.mul_(scale)
    return {"channels": ch.tolist(), "gains": [round(float(g), 1) for g in gains], "norms": len(norms),
            "lm_head_scale": round(scale, 2)}


def child(args: argparse.Namespace, name: str, outliers: bool, save: Path) -> None:
    """Profile ``name`` (set up, measure, compare), its results written to ``save`` after each stage."""
    dev, t0 = args.device, time.perf_counter()
    res: dict = {"profile": name, "emulated": os.environ.get(gpus.EMULATE_ENV),
                 "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"}
    ckpt, logged = Path(args.workdir) / f"ckpt-{args.preset}", []
    log = lambda s: (logged.append(s), print(s, flush=True))  # noqa: E731
    # Set up as the service does: on the GPU the weights stream in while the warm-up compiles.
    engine = Engine.from_pretrained(ckpt, EngineConfig(device=dev, warmup=True), log=log)
    res["setup_s"] = round(time.perf_counter() - t0, 1)
    res["kernels"] = kernel_choices(engine)
    res["kernels"]["slots_from"] = next((s for s in logged if "batch slots" in s), None)  # the engine's reason
    image = Image.radial_gradient("L").resize((800, 600)).convert("RGB")  # tiles 3x2: 1428 prompt tokens
    ttfts = [run(engine, PROMPT, [image], GREEDY, 1)[0].stats.time_to_first_token_s for _ in range(5)]
    res["ttft_ms"] = round(1e3 * statistics.median(ttfts), 1)
    for mode, params in (("greedy", GREEDY), ("sampled", DEFAULT)):
        rates = [run(engine, PROMPT, [image], params, args.decode_tokens)[0].stats.tokens_per_second for _ in range(3)]
        res[f"decode_tok_s_{mode}"] = round(statistics.median(rates), 1)
    if dev == "cuda":
        res["moe_decode_rel_err"] = safe(kernel_checks)
        res["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)

    def done(part: dict) -> None:  # after each stage: a child that fails later keeps what it measured
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        save.write_text(json.dumps(res, indent=2))
        print(json.dumps(part), flush=True)

    done(res)
    res["exactness"] = compare(engine, image, args.tokens)
    done(res["exactness"])
    if outliers:
        res["outliers"] = {**add_outliers(engine, image),
                           **compare(engine, image, args.tokens, sampled=True, reference=True)}
        done(res["outliers"])


def bad_values(x: dict) -> int:
    return sum(v for k, v in x.items() if "nonfinite" in k)


def verdict(x: dict) -> str:  # ok: greedy ids all the same, logits after the prompt within tolerance, no inf/nan
    n, m = x["greedy_ids_equal"].split("/")
    return "ok" if n == m and x["logits_rel_l2"] <= REL_L2_TOLERANCE and bad_values(x) == 0 else "DIFFERS"


def table(profiles: dict) -> str:
    rows = [("profile", "slots", "PDL", "prefill experts", "TTFT ms", "tok/s greedy", "sampled", "greedy ids",
             "max|dlogit|", "rel L2", "inf/nan", "check", "setup s")]
    for name, r in profiles.items():
        if "exactness" not in r:
            rows.append((name, r.get("skipped") or f"{r.get('error', 'failed')}, exit {r.get('exit')}: see its log"))
            continue
        k = r["kernels"]
        speed = (r["ttft_ms"], r["decode_tok_s_greedy"], r["decode_tok_s_sampled"], r["setup_s"])
        for label, x in ((name, r["exactness"]), (f"{name}+outliers", r.get("outliers"))):
            if x is not None:
                rows.append((label, k["slots"], k["pdl"], k["prefill_experts"], *speed[:3], x["greedy_ids_equal"],
                             f"{x['logits_max_abs']:.3g}", f"{x['logits_rel_l2']:.2e}", bad_values(x), verdict(x),
                             speed[3]))
                speed = ("",) * 4  # measured before the outliers
    widths = [max(len(str(row[i])) for row in rows if len(row) == len(rows[0])) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows)


def profile_process(name: str, work: Path, log: Path, timeout: float) -> dict:
    """This script again, as a child that runs profile ``name`` with DSVL2_EMULATE_GPU set -> its results (kept if
    the child failed or hung after some stages: with its exit and the end of its log)."""
    env = {**os.environ, gpus.EMULATE_ENV: name, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--child", name]
    result = work / f"gpu_profiles-{name}.json"
    result.unlink(missing_ok=True)
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"killed after {timeout:.0f} s (--budget-s)"
    res = json.loads(result.read_text()) if result.exists() else {"error": "no results"}
    result.unlink(missing_ok=True)
    return {**res, "exit": rc, "log_tail": log.read_text().splitlines()[-15:]} if rc else res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/dsvl2-bench", help="the random checkpoint (shared with bench.py)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_profiles.json")
    ap.add_argument("--profiles", default="h200,l40s,a100-80,a100-40")
    ap.add_argument("--outliers", action="store_true")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens compared between the paths")
    ap.add_argument("--decode-tokens", type=int, default=128, help="new tokens of each timed request")
    ap.add_argument("--budget-s", type=float, default=530, help="skip profiles that would end after this")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = [p.strip().lower() for p in args.profiles.split(",") if p.strip()]
    if any(n not in gpus.PROFILES for n in names):
        ap.error(f"unknown profile in {names}; known: {', '.join(gpus.PROFILES)}")
    outlier_profile = ("h200" if "h200" in names else names[0]) if args.outliers else None
    work, t0, out = Path(args.workdir), time.perf_counter(), Path(args.out)
    if args.child:
        return child(args, args.child, args.child == outlier_profile, work / f"gpu_profiles-{args.child}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "preset": args.preset,
                 "device_kind": args.device, "tokens_compared": args.tokens, "decode_tokens": args.decode_tokens,
                 "rel_l2_tolerance": REL_L2_TOLERANCE, "outliers_in": outlier_profile, "profiles": {}}
    ckpt = work / f"ckpt-{args.preset}"
    if not (ckpt / "config.json").exists():  # in a process of its own: this one must hold no GPU memory
        code = (f"from dsvl2.model.tiny import build_random_checkpoint as b; "
                f"b({str(ckpt)!r}, {args.preset!r}, std=0.02, n_shards=4, device={args.device!r})")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        res["write_checkpoint_s"] = round(time.perf_counter() - t0, 1)
        print(f"wrote the checkpoint in {res['write_checkpoint_s']} s", flush=True)
    last = 0.0
    for name in names:
        left, t1 = args.budget_s - (time.perf_counter() - t0), time.perf_counter()
        if left < last:
            res["profiles"][name] = {"skipped": f"{left:.0f} s left of --budget-s, the last profile took {last:.0f} s"}
            continue
        r = res["profiles"][name] = profile_process(name, work, out.parent / f"gpu_profiles-{name}.log", left)
        last = r["process_s"] = round(time.perf_counter() - t1, 1)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(res, indent=2))  # after each profile: a run cut short keeps what it measured
        print(f"{name}: {last} s, exit {r.get('exit', 0)}: {json.dumps(r.get('kernels') or r)}", flush=True)
    if args.device != "cuda":
        print("(on the CPU the profiles change no choice: they are CUDA's)")
    print(table(res["profiles"]))
    print(f"wrote {out} in {round(time.perf_counter() - t0, 1)} s")


if __name__ == "__main__":
    main()
