"""Many streams at once: continuous batching measured in-process and through the real server.

    python benchmarks/batching.py inproc --workdir /tmp/dsvl2-bench --out inproc.json
    python benchmarks/batching.py http   --workdir /tmp/dsvl2-bench --out http.json

Every request is the issue's: a 1428-token prompt (a 3x2-tiled 800x600 image and a short question) and 256 new
tokens, on random weights of the real shapes (built once under --workdir; ``--preset demo --device cpu`` is a
smoke test on a tiny checkpoint).

``inproc`` (the engine in this process): batch 1 (time to first token, decode tokens/s greedy and sampled);
steady-state decode with 1, 8, 32 and 64 running streams (aggregate and per-stream tokens/s, measured while all of
them decode); batch invariance (64 requests, greedy and seeded samples of every sampler mode, each one's ids alone
and among the 64); the closed loop (N clients sending requests back to back) at 32 and 64 clients.

``http`` (a coglet server started as the image starts it, timed from the process start to READY): the same
closed loop through HTTP with an SSE load generator (time to first token measured by the client, from sending
the request to its first text).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsvl2.model.tiny import build_random_checkpoint  # noqa: E402
from dsvl2.serving.engine import Engine, EngineConfig  # noqa: E402
from dsvl2.serving.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
DEFAULT = SamplingParams(temperature=0.1, top_p=0.9, top_k=50, repetition_penalty=1.1)
PROMPT = "<image>\nDescribe this image."


def picture(i: int = 0) -> Image.Image:
    """800x600 (tiled 3x2: 1415 image tokens), a little different for each i."""
    base = Image.radial_gradient("L").resize((800, 600))
    return Image.merge("RGB", [base, base.rotate(90 * (i % 4)).resize((800, 600)),
                               Image.new("L", (800, 600), (37 * i) % 256)])


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def variety(i: int) -> SamplingParams:
    """Request i's decoding: greedy, then seeded samples in the "top" and "full" sampler modes."""
    kinds = [GREEDY, SamplingParams(temperature=0.1, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=i),
             SamplingParams(temperature=0.8, top_p=0.95, top_k=0, repetition_penalty=1.0, seed=1000 + i),
             SamplingParams(temperature=0.6, top_p=1.0, top_k=20, repetition_penalty=1.3, seed=2000 + i)]
    return kinds[i % len(kinds)]


def run_clients(client, n: int) -> float:
    """client(0) ... client(n - 1) side by side, a thread each -> wall time."""
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def generate_all(engine: Engine, reqs: list) -> float:
    """Run the requests side by side (a thread each, as coglet does) -> wall time."""
    return run_clients(lambda i: engine.generate(reqs[i]), len(reqs))


def steady_state(engine: Engine, streams: int, window_s: float, images: list) -> dict:
    """Aggregate and per-stream decode rate while ``streams`` requests are all decoding."""
    reqs = [engine.prepare(PROMPT, [images[i % len(images)]], DEFAULT, 4000) for i in range(streams)]
    cancel = threading.Event()
    threads = [threading.Thread(target=engine.generate, args=(r, cancel)) for r in reqs]
    for t in threads:
        t.start()
    while sum(1 for r in reqs if r.output_ids) < streams:
        time.sleep(0.005)
    time.sleep(0.3)
    n0, t0 = sum(len(r.output_ids) for r in reqs), time.perf_counter()
    time.sleep(window_s)
    n1, t1 = sum(len(r.output_ids) for r in reqs), time.perf_counter()
    running = len(engine.scheduler.rows)
    cancel.set()
    for t in threads:
        t.join()
    rate = (n1 - n0) / (t1 - t0)
    return {"streams": streams, "running_at_end": running, "tok_s": round(rate, 1),
            "per_stream_tok_s": round(rate / streams, 1)}


def closed_loop_inproc(engine: Engine, clients: int, per_client: int, new_tokens: int, images: list) -> dict:
    ttfts, tokens, gaps = [], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            req = engine.prepare(PROMPT, [images[(c + k) % len(images)]], variety(c * 7 + k), new_tokens)
            engine.generate(req)
            with lock:
                ttfts.append((k, req.stats.time_to_first_token_s))
                tokens.append(req.stats.output_tokens)
                gaps.append(req.stats.max_gap_s)

    wall = run_clients(client, clients)
    out = summary(clients, wall, tokens, ttfts)
    out.update(longest_pause_ms_p50=round(1e3 * pct(gaps, 0.5), 1), longest_pause_ms_max=round(1e3 * max(gaps), 1))
    return out


def summary(clients: int, wall: float, tokens: list[int], ttfts: list[tuple[int, float]]) -> dict:
    all_t = [t for _, t in ttfts]
    later = [t for k, t in ttfts if k > 0] or all_t
    return {"clients": clients, "requests": len(tokens), "wall_s": round(wall, 2),
            "tok_s": round(sum(tokens) / wall, 1), "req_s": round(len(tokens) / wall, 2),
            "ttft_p50_ms": round(1e3 * pct(all_t, 0.5), 1), "ttft_p95_ms": round(1e3 * pct(all_t, 0.95), 1),
            "ttft_p50_ms_after_first_wave": round(1e3 * pct(later, 0.5), 1),
            "ttft_p95_ms_after_first_wave": round(1e3 * pct(later, 0.95), 1)}


def invariance(engine: Engine, n: int, new_tokens: int, images: list) -> dict:
    def make() -> list:
        return [engine.prepare(f"<image>\nDescribe this image. ({i})", [images[i % len(images)]], variety(i),
                               new_tokens) for i in range(n)]

    alone = []
    for r in make():
        engine.generate(r)
        alone.append(r.output_ids)
    together = make()
    generate_all(engine, together)
    same = [a == r.output_ids for a, r in zip(alone, together, strict=True)]
    first_diff = [next((j for j, (x, y) in enumerate(zip(a, r.output_ids, strict=False)) if x != y), None)
                  for a, r in zip(alone, together, strict=True)]
    return {"requests": n, "identical": sum(same), "first_difference_at": [d for d in first_diff if d is not None],
            "tokens_each": new_tokens}


def inproc(args, res: dict) -> None:
    dev = args.device
    t0 = time.perf_counter()
    config = EngineConfig(device=dev, slots=args.slots, batch_invariant=not args.no_invariant, warmup=True)
    engine = Engine.from_pretrained(args.ckpt, config, log=lambda s: print(s, flush=True))
    res.update(setup_s=round(time.perf_counter() - t0, 1), slots=engine.slots, batch_invariant=not args.no_invariant,
               eager_fallbacks=vars(engine.runner.fallbacks))
    images = [picture(i) for i in range(8)]
    tt, rates = [], {"greedy": [], "sampled": []}
    for _ in range(0 if "batch1" in args.skip else 7):
        r = engine.prepare(PROMPT, [images[0]], GREEDY, 1)
        engine.generate(r)
        tt.append(r.stats.time_to_first_token_s)
    if tt:
        res["prompt_tokens"] = r.stats.prompt_tokens
        res["batch1_ttft_ms"] = round(1e3 * statistics.median(tt), 1)
    for name, params in (("greedy", GREEDY), ("sampled", SamplingParams(**{**vars(DEFAULT), "seed": 0}))):
        if "batch1" in args.skip:
            break
        for _ in range(3):
            r = engine.prepare(PROMPT, [images[0]], params, args.decode_tokens)
            engine.generate(r)
            rates[name].append(r.stats.tokens_per_second)
        res[f"batch1_decode_tok_s_{name}"] = round(statistics.median(rates[name]), 1)
    print(json.dumps(res), flush=True)
    res["steady_state"] = [steady_state(engine, s, args.window, images) for s in args.streams if s <= engine.slots]
    print(json.dumps(res), flush=True)
    res["invariance"] = invariance(engine, min(args.invariance, engine.slots), args.invariance_tokens, images)
    print(json.dumps(res), flush=True)
    # The longest prefill a running stream can wait for (one runs between two decode steps): a prompt that fills
    # the context (a 3x3-tiled image and text).
    big = Image.radial_gradient("L").resize((1152, 1152)).convert("RGB")
    if "longest" not in args.skip:
        words = "Describe every detail of the picture please. " * 200
        n = len(words)
        while engine.processor.encode("<image>\n" + words[:n], [big]).input_ids.numel() >= engine.context - 8:
            n -= 100
        long_prompt = "<image>\n" + words[:n]
        longest = []
        for _ in range(3):
            r = engine.prepare(long_prompt, [big], GREEDY, 1)
            engine.generate(r)
            longest.append(r.stats.prefill_s)
        res["longest_prefill"] = {"prompt_tokens": r.stats.prompt_tokens, "ms": round(1e3 * min(longest), 1)}
    if "closed" in args.skip:
        return
    res["closed_loop_inproc"] = [closed_loop_inproc(engine, c, args.per_client, args.new_tokens, images)
                                 for c in args.clients]
    if dev == "cuda":
        res["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)


def http(args, res: dict) -> None:
    import requests

    port = 5123
    env = dict(os.environ, COG_PREDICT_TYPE_STUB="predict.py:Runner", PORT=str(port), DSVL2_WEIGHTS=str(args.ckpt),
               DSVL2_DEVICE=args.device, COG_MAX_CONCURRENCY=str(max(args.clients)), PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    log = open(Path(args.out).with_suffix(".server.log"), "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if requests.get(f"{url}/health-check", timeout=5).json()["status"] == "READY":
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        res["server_start_to_ready_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res), flush=True)
        files = {}
        for i in range(8):
            buf = io.BytesIO()
            picture(i).save(buf, format="JPEG", quality=90)
            files[f"/{i}.jpg"] = buf.getvalue()
        if args.files == "data":  # inline in the request
            uris = ["data:image/jpeg;base64," + base64.b64encode(b).decode() for b in files.values()]
        else:  # as on Replicate: a URL the server downloads (here from a file server in this process)
            uris = [f"{serve_files(files)}{name}" for name in files]
        res["image_bytes"] = [len(b) for b in files.values()]
        res["closed_loop_http"] = [closed_loop_http(url, c, args.per_client, args.new_tokens, uris)
                                   for c in args.clients]
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def serve_files(files: dict[str, bytes]) -> str:
    """Serve ``files`` (path -> bytes) on 127.0.0.1 from a thread -> the base URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def closed_loop_http(url: str, clients: int, per_client: int, new_tokens: int, uris: list[str]) -> dict:
    import requests

    ttfts, tokens, events, errors, server_ttfts = [], [], [0], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        session = requests.Session()
        for k in range(per_client):
            p = variety(c * 7 + k)
            inputs = {"image": uris[(c + k) % len(uris)], "prompt": PROMPT.removeprefix("<image>\n"),
                      "max_length_tokens": new_tokens, "temperature": p.temperature, "top_p": p.top_p,
                      "top_k": p.top_k, "repetition_penalty": p.repetition_penalty}
            if p.seed is not None:
                inputs["seed"] = p.seed
            while True:
                sent = time.perf_counter()
                with session.post(f"{url}/predictions", json={"input": inputs}, stream=True, timeout=600,
                                  headers={"Accept": "text/event-stream"}) as r:
                    if r.status_code == 409:  # coglet frees a slot a moment after a response
                        time.sleep(0.02)
                        continue
                    first, kind, n_events, final = None, None, 0, None
                    for line in r.iter_lines(decode_unicode=True):
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            if kind == "output":
                                n_events += 1
                                first = first or time.perf_counter()
                            elif kind in ("completed", "failed", "canceled"):
                                final = json.loads(line[6:])
                    break
            with lock:
                events[0] += n_events
                if final is None or final.get("status") != "succeeded":
                    errors.append(str(final)[:300])
                    continue
                ttfts.append((k, (first or time.perf_counter()) - sent))
                tokens.append(final["metrics"]["output_token_count"])
                server_ttfts.append(final["metrics"].get("time_to_first_token", 0.0))

    wall = run_clients(client, clients)
    out = summary(clients, wall, tokens, ttfts)
    out.update(sse_output_events=events[0], sse_events_s=round(events[0] / wall, 1), errors=errors[:3],
               failed=len(errors), server_ttft_p50_ms=round(1e3 * pct(server_ttfts, 0.5), 1),
               server_ttft_p95_ms=round(1e3 * pct(server_ttfts, 0.95), 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["inproc", "http"])
    ap.add_argument("--workdir", default="/tmp/dsvl2-bench")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="batching.json")
    ap.add_argument("--slots", type=int, default=None)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--clients", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--window", type=float, default=2.0)
    ap.add_argument("--invariance", type=int, default=64)
    ap.add_argument("--invariance-tokens", type=int, default=128)
    ap.add_argument("--files", choices=["url", "data"], default="url", help="http: how the images are sent")
    ap.add_argument("--no-invariant", action="store_true", help="library kernels above 8 rows (not batch invariant)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["batch1", "longest", "closed"],
                    help="inproc: parts left out")
    args = ap.parse_args()
    res: dict = {"mode": args.mode, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                 "python": platform.python_version(), "command": " ".join(sys.argv)}
    if args.device == "cuda":
        import triton

        res.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    args.ckpt = Path(args.workdir) / f"ckpt-{args.preset}"
    if not (args.ckpt / "config.json").exists():
        t0 = time.perf_counter()
        build_random_checkpoint(args.ckpt, args.preset, std=0.02, n_shards=4, device=args.device)
        res["write_checkpoint_s"] = round(time.perf_counter() - t0, 1)
    (inproc if args.mode == "inproc" else http)(args, res)
    print(json.dumps(res), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
