"""Many predictions at once through the real coglet server (CPU, tiny checkpoint): streams interleave, each gets
what it gets alone, with its own metrics; a request beyond coglet's slots gets 409; a cancel ends one prediction
and leaves the others streaming.

These also pin what this service relies on in coglet 0.23.1: an async ``run`` that returns a plain generator is
streamed chunk by chunk, one thread per prediction, and metrics recorded through the prediction's scope from that
thread land on that prediction.
"""

import json
import threading
import time
from pathlib import Path

import pytest
import requests
from coglet_server import IMAGE, Server, running_server

SLOTS = 3  # coglet's slots and the engine's batch


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {"COG_MAX_CONCURRENCY": str(SLOTS), "DSVL2_MAX_BATCH": str(SLOTS), "DSVL2_STREAM_INTERVAL_MS": "0"}
    for srv in running_server(tiny_checkpoint, tmp_path_factory, env):
        assert srv.wait_ready() == "READY", srv.log_tail()
        yield srv


class SSE:
    """One streamed prediction on a thread: its events with their arrival times."""

    def __init__(self, srv: Server, inputs: dict, t0: float) -> None:
        self.srv, self.inputs, self.t0 = srv, inputs, t0
        self.status = None
        self.events: list[tuple[float, str, dict]] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        # coglet answers 409 for a moment after a prediction returns, before its slot is free again: a client
        # retries (README), and so does this one, for up to 10 s (the test that wants a 409 posts on its own).
        deadline = time.monotonic() + 10
        while True:
            r = requests.post(f"{self.srv.url}/predictions", json={"input": self.inputs}, stream=True, timeout=300,
                              headers={"Accept": "text/event-stream"})
            if r.status_code != 409 or time.monotonic() > deadline:
                break
            r.close()
            time.sleep(0.05)
        with r:
            self.status = r.status_code
            if r.status_code != 200:
                return
            kind = None
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    self.events.append((time.monotonic() - self.t0, kind, json.loads(line[6:])))

    def join(self) -> "SSE":
        self.thread.join(300)
        return self

    def times(self, kind: str) -> list[float]:
        return [t for t, k, _ in self.events if k == kind]

    @property
    def text(self) -> str:
        return "".join(d["chunk"] for _, k, d in self.events if k == "output")

    @property
    def final(self) -> dict:
        return next(d for _, k, d in reversed(self.events) if k in ("completed", "canceled", "failed"))

    @property
    def id(self) -> str:
        return next(d["id"] for _, k, d in self.events if k == "start")


def wait_streaming(streams: list[SSE], timeout_s: float = 60) -> None:
    """Until every stream has had text (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(s.times("output") for s in streams):
        time.sleep(0.02)


def _inputs(prompt: str, n: int, **extra) -> dict:
    return {"image": IMAGE, "prompt": prompt, "max_length_tokens": n, "temperature": 0, **extra}


def _at_once(srv: Server, inputs: list[dict]) -> list[SSE]:
    t0 = time.monotonic()
    return [s.join() for s in [SSE(srv, i, t0) for i in inputs]]


def _alone(srv: Server, inputs: dict) -> SSE:
    time.sleep(0.2)  # coglet frees a slot a moment after the response
    return _at_once(srv, [inputs])[0]


def test_concurrent_streams_interleave_and_each_is_what_it_is_alone(server: Server) -> None:
    inputs = [
        _inputs("Describe this image.", 60),
        _inputs("What colours are there?", 45, temperature=0.8, top_k=20, seed=42),
        _inputs("Tell a story about it.", 50, temperature=1.0, top_k=0, top_p=0.9, seed=7),
    ]
    alone = [_alone(server, i) for i in inputs]
    together = _at_once(server, inputs)
    assert [s.status for s in together] == [200] * SLOTS
    assert all(s.final["status"] == "succeeded" for s in together), [s.final for s in together]
    first_done = min(s.times("completed")[0] for s in together)
    for s in together:
        assert s.times("output") and s.times("output")[0] < first_done  # every stream began before any ended
    assert [s.text for s in together] == [s.text for s in alone]  # greedy and seeded: the same text
    for a, t in zip(alone, together, strict=True):
        for key in ("input_token_count", "output_token_count"):
            assert t.final["metrics"][key] == a.final["metrics"][key], key
        assert t.final["metrics"]["time_to_first_token"] > 0
    counts = [s.final["metrics"]["output_token_count"] for s in together]
    assert len({s.final["metrics"]["input_token_count"] for s in together}) == SLOTS  # each its own
    assert counts == [a.final["metrics"]["output_token_count"] for a in alone]


def test_a_request_beyond_the_slots_gets_409_and_the_others_finish(server: Server) -> None:
    time.sleep(0.2)
    t0 = time.monotonic()
    running = [SSE(server, _inputs("Tell a long story.", 300), t0) for _ in range(SLOTS)]
    wait_streaming(running)
    extra = requests.post(f"{server.url}/predictions", json={"input": _inputs("Hi", 3)}, timeout=30)
    assert extra.status_code == 409, extra.text
    for s in running:
        s.join()
    assert [s.final["status"] for s in running] == ["succeeded"] * SLOTS


def test_cancelling_one_prediction_leaves_the_others_streaming(server: Server) -> None:
    time.sleep(0.2)
    t0 = time.monotonic()
    streams = [SSE(server, _inputs("Tell a long story.", 200), t0) for _ in range(SLOTS)]
    wait_streaming(streams)
    victim = streams[0]
    r = requests.post(f"{server.url}/predictions/{victim.id}/cancel", timeout=30)
    cancelled_at = time.monotonic() - t0
    assert r.status_code == 200
    for s in streams:
        s.join()
    assert victim.final["status"] == "canceled"
    for s in streams[1:]:
        assert s.final["status"] == "succeeded"
        assert any(t > cancelled_at for t in s.times("output"))  # kept streaming after the cancel
    assert server.health()["status"] in ("READY", "BUSY")
