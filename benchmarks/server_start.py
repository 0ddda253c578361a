"""What a user waits for when the service starts: the real coglet server's process start to READY, then one answer.

    python benchmarks/server_start.py CHECKPOINT_DIR [--plan first:all,first:-prefetch,restart:all] [--out F]

Each item of ``--plan`` is one server start, in the order given (alternate the variants to spread the machine's
drift over all of them):

- ``first``: a first start on a fresh machine: the page cache dropped (needs root) and the compile cache empty (the
  shipped compile bundle is all it has);
- ``restart``: the compile cache of the run before kept, the page cache dropped (the disk is as cold as at a first
  start);
- ``warm``: both kept (a restart on the same host, the weights still in its memory).

The variant after the colon chooses the start-up mechanisms (``dsvl2.startup.sequence``): ``all``, or items joined
by ``+``: ``-NAME`` leaves that mechanism out (DSVL2_STARTUP_SKIP), ``load_workers=N`` copies N shards side by side
(DSVL2_LOAD_WORKERS); e.g. ``-prefetch+-switch_interval``. The server's
output is timestamped from its process start; every ``setup: ... done in`` phase is reported. After READY one
greedy prediction with an image checks that the server answers. Prints one JSON line per start; with OUT set,
all of them (and each server's log) are written under $OUT.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PORT = 5125
CACHE = Path("/tmp/dsvl2-start-cache")  # the compile cache the starts use (emptied for a first start)
PHASE = re.compile(r"setup: (.+?) done in ([\d.]+)s")
MARKS = {"weights_loaded_s": re.compile(r"loaded [\d.]+ GB from .* in ([\d.]+) s"),
         "compiled_and_warmed_s": re.compile(r"compiled and warmed up in ([\d.]+) s"),
         "waited_for_weights_s": re.compile(r"waited ([\d.]+) s for the weights")}


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def image_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (30, 140, 200)).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def start(ckpt: Path, kind: str, variant: str, log_path: Path, drop: bool = True) -> dict:
    if kind == "first":
        shutil.rmtree(CACHE, ignore_errors=True)
    dropped = drop and kind != "warm" and drop_page_cache()
    items = [] if variant == "all" else variant.split("+")
    skip = ",".join(v[1:] for v in items if v.startswith("-"))
    workers = next((v.partition("=")[2] for v in items if v.startswith("load_workers=")), "1")
    env = dict(os.environ, COG_PREDICT_TYPE_STUB="predict.py:Runner", PORT=str(PORT), DSVL2_WEIGHTS=str(ckpt),
               DSVL2_COMPILE_CACHE=str(CACHE), DSVL2_STARTUP_SKIP=skip, DSVL2_LOAD_WORKERS=workers,
               PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # the service derives them from its cache
        env.pop(name, None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{PORT}"
    res: dict = {"kind": kind, "variant": variant, "page_cache_dropped": dropped}
    try:
        status = "STARTING"
        while status not in ("READY", "SETUP_FAILED", "DEFUNCT"):
            if proc.poll() is not None:
                status = f"exited {proc.returncode}"
                break
            try:
                status = requests.get(f"{url}/health-check", timeout=5).json()["status"]
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        res["ready_s"] = round(time.perf_counter() - t0, 1)
        res["status"] = status
        if status == "READY":
            t1 = time.perf_counter()
            body = {"input": {"image": image_uri(), "prompt": "<image>\nDescribe this image.", "temperature": 0,
                              "max_length_tokens": 16}}
            r = requests.post(f"{url}/predictions", json=body, timeout=300).json()
            res["prediction"] = {"status": r.get("status"), "s": round(time.perf_counter() - t1, 2),
                                 "output": "".join(r.get("output") or [])[:60]}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(10)
    for t, line in lines:
        if "setup: device" in line:
            res["setup_called_s"] = round(t, 1)  # predict.py imported, setup() begun
        m = PHASE.search(line)
        if m:
            res.setdefault("phases_s", {})[m.group(1)] = float(m.group(2))
        for name, mark in MARKS.items():
            if m := mark.search(line):
                res[name] = float(m.group(1))
    with log_path.open("a") as f:  # one file for every start's log (few files come back from the GPU machine)
        f.write(f"==== {kind}:{variant}\n" + "".join(f"{t:8.2f} {line}\n" for t, line in lines))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--plan", default="first:all,restart:all")
    ap.add_argument("--out", default="server_start.json")
    ap.add_argument("--keep-page-cache", action="store_true", help="do not drop the page cache (a try-out run)")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "/tmp"))
    import torch  # versions only; the servers run in processes of their own

    results: list[dict] = [{"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                            "torch": torch.__version__, "plan": args.plan}]
    print(json.dumps(results[0]), flush=True)
    for item in args.plan.split(","):
        kind, _, variant = item.partition(":")
        res = start(args.ckpt, kind, variant or "all", out / Path(args.out).with_suffix(".log").name,
                    drop=not args.keep_page_cache)
        results.append(res)
        print(json.dumps(res), flush=True)
        (out / args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
