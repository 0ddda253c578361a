"""What one streamed output event costs in coglet, the server the image runs (issue 12: "measure coglet's cost
per event"): a stub predictor with no model streams short chunks as fast as it can to N SSE clients at once.

    python benchmarks/coglet_events.py --out coglet_events.json [--streams 1 8 64] [--events 4000]

The stub's ``run`` is async and returns a plain generator, as predict.py's does, so each prediction's chunks come
from a thread of its own through coglet's worker and orchestrator to the client. For each number of streams it
reports the events per second that reached the clients and the CPU time the server's processes (orchestrator and
worker, read from /proc) spent per event: the per-event cost that the service's coalescing of text
(``DSVL2_STREAM_INTERVAL_MS``) keeps off the host. Clients and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_schema  # noqa: E402

STUB = '''
import time

from cog import BaseRunner, ConcatenateIterator, Input, streaming


class Runner(BaseRunner):
    def setup(self) -> None:
        pass

    @streaming
    async def run(self, events: int = Input(default=100)) -> ConcatenateIterator[str]:
        def chunks():
            for _ in range(events):
                yield "tok "
        return chunks()
'''


def cpu_seconds(root: int) -> dict[str, float]:
    """User + system CPU seconds of process ``root`` and of each of its descendants, by command line."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, times, names = {}, {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        pid = int(entry.name)
        parents[pid], times[pid], names[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd
    family, grew = {root}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return {"worker" if "_run_worker" in names[p] else "orchestrator" if p == root else names[p][:40]: times[p]
            for p in family if p in times}


def stream(url: str, events: int, out: list[int], i: int) -> None:
    for _ in range(200):  # coglet answers 409 for a moment after a prediction returns: retry, as clients do
        r = requests.post(f"{url}/predictions", json={"input": {"events": events}}, stream=True, timeout=600,
                          headers={"Accept": "text/event-stream"})
        if r.status_code != 409:
            break
        r.close()
        time.sleep(0.02)
    with r:
        r.raise_for_status()
        out[i] = sum(1 for line in r.iter_lines(decode_unicode=True) if line == "event: output")


def run_streams(url: str, pid: int, streams: int, events: int) -> dict:
    counts = [0] * streams
    before = cpu_seconds(pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(url, events, counts, i)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = cpu_seconds(pid)
    cpu = {k: round(after[k] - before.get(k, 0.0), 2) for k in after}
    total = sum(counts)
    return {"streams": streams, "events": total, "expected": streams * events, "wall_s": round(wall, 2),
            "events_per_s": round(total / wall), "server_cpu_s": cpu,
            "server_cpu_us_per_event": round(1e6 * sum(cpu.values()) / max(total, 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--events", type=int, default=4000, help="events per round, split over the streams")
    ap.add_argument("--out", default="coglet_events.json")
    args = ap.parse_args()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "python": platform.python_version(),
                 "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "stub.py").write_text(STUB)
        make_schema.ROOT = Path(tmp)
        (Path(tmp) / ".cog").mkdir()
        schema = make_schema.render(make_schema.build_schema("stub.py:Runner"))
        (Path(tmp) / ".cog" / "openapi_schema.json").write_text(schema)
        with socket.socket() as sock:  # a free port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = dict(os.environ, COG_PREDICT_TYPE_STUB="stub.py:Runner", PORT=str(port),
                   COG_MAX_CONCURRENCY=str(max(args.streams)),
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        server = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=tmp, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if requests.get(f"{url}/health-check", timeout=5).json()["status"] == "READY":
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the stub server did not become ready")
                time.sleep(0.1)
            run_streams(url, server.pid, 1, 100)  # warm-up
            for n in args.streams:
                time.sleep(0.5)  # coglet frees a slot a moment after a prediction returns
                res["rounds"].append(run_streams(url, server.pid, n, max(args.events // n, 1)))
                print(json.dumps(res["rounds"][-1]), flush=True)
        finally:
            server.terminate()
            server.wait(30)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
