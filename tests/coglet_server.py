"""The real Cog HTTP server (coglet) for the tests, on a tiny checkpoint on the CPU, and what they send it: images as
a client would upload them, a webhook receiver, a file server for URL inputs, and small HTTP helpers.

The server is started exactly as the image starts it (`python -m cog.server.http`), from the project root so that it
serves `.cog/openapi_schema.json`.
"""

import base64
import io
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from dsvl2.inputs.images import MAX_IMAGE_BYTES

ROOT = Path(__file__).resolve().parent.parent


READY_TIMEOUT_S = 180


SHORT = {"max_length_tokens": 6, "temperature": 0}  # greedy: the same text every time


GOLDEN_IMAGE = Path("tests") / "fixtures" / "golden" / "images" / "tiny_20x15.png"  # relative to the server's cwd


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def picture(width: int, height: int) -> Image.Image:
    """A smooth RGB test picture (compresses well, not flat)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def data_uri(content: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(content).decode()}"


def truncated_png() -> bytes:
    whole = png(picture(200, 150))
    return whole[: len(whole) // 2]


def bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (900 MP) that compresses to about 100 KB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    picture(96, 64).convert("CMYK").save(out, format="JPEG", quality=95)
    return out.getvalue()


def png_16bit() -> bytes:
    y, x = np.mgrid[0:64, 0:96]
    return png(Image.fromarray((x * 600 + y * 100).astype(np.uint16)))  # greyscale, 0..62700


def exif_rotated_jpeg(width: int, height: int) -> bytes:
    """A width x height picture stored on its side, with EXIF orientation 6 to turn it upright."""
    stored = picture(width, height).transpose(Image.Transpose.ROTATE_90)  # height x width
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    out = io.BytesIO()
    stored.save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


IMAGE = data_uri(png(picture(128, 96)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(
            os.environ,
            # coglet starts its worker as `python`: make that this interpreter.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            COG_PREDICT_TYPE_STUB="predict.py:Runner",
            PORT=str(self.port),
            DSVL2_WEIGHTS=str(checkpoint),
            DSVL2_DEVICE=os.environ.get("DSVL2_DEVICE", "cpu"),  # DSVL2_DEVICE=cuda: the same tests on a GPU
            PYTHONUNBUFFERED="1",
        )
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.statuses: list[str] = []

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def wait_until_set_up(self) -> None:
        """Poll the health check from the first moment the port answers, recording each status."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                status = self.health()["status"]
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            if not self.statuses or self.statuses[-1] != status:
                self.statuses.append(status)
            if status not in ("STARTING",):
                return
            time.sleep(0.05)
        raise RuntimeError(f"server not set up (statuses {self.statuses}):\n{self.log_tail()}")

    def wait_ready(self, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        status = self.health()["status"]
        while status != "READY" and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.health()["status"]
        return status

    def log_tail(self, n: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """One HTTP request, repeated while the server answers 409 (busy).

        coglet 0.23 sends a prediction's response a moment before it frees the prediction slot, so
        a request sent right after the previous one returns can be refused as "At capacity". Cog's
        HTTP API asks clients to wait for a free slot, as this does.
        """
        deadline = time.monotonic() + 10
        kwargs.setdefault("timeout", 120)
        while True:
            response = requests.request(method, f"{self.url}{path}", **kwargs)
            if response.status_code != 409 or time.monotonic() > deadline:
                return response
            response.close()
            time.sleep(0.05)

    def predict(self, inputs: dict, **kwargs) -> requests.Response:
        return self.request("POST", "/predictions", json={"input": inputs, **kwargs})


def running_server(checkpoint: Path, tmp_path_factory, env: dict[str, str] | None = None):
    """A module's server: started with ``env`` added to this process's environment, set up, yielded, stopped (a
    fixture's body: ``yield from running_server(...)``)."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        srv = Server(checkpoint, tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.wait_until_set_up()
        yield srv
    finally:
        srv.stop()


class LocalHTTP:
    """An HTTP server on 127.0.0.1 in a thread of its own, answering with ``handler``; ``url(name)`` is a path on
    it."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


class Webhooks(LocalHTTP):
    """A local receiver for the server's webhook POSTs; each body lands in `self.received`."""

    def __init__(self) -> None:
        received: queue.Queue = queue.Queue()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.put((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.received = received
        self.serve(Handler)

    def wait_for(self, name: str, done, timeout_s: float = 120) -> list[dict]:
        """Every body posted to `/name` until one satisfies `done(body)` (inclusive)."""
        bodies = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                path, body = self.received.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if path == f"/{name}":
                bodies.append(body)
                if done(body):
                    return bodies
            else:
                self.received.put((path, body))  # another test's; leave it
                time.sleep(0.01)
        raise AssertionError(f"no matching webhook for {name} within {timeout_s}s; got {bodies}")


class Files(LocalHTTP):
    """Image URLs on this machine for the server to download (coglet fetches http(s) URLs itself)."""

    def __init__(self) -> None:
        requested: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requested.append(self.path)
                if self.path == "/picture.png":
                    self.reply([png(picture(64, 48))])
                elif self.path == "/huge.png":  # a PNG signature and then zeros, one byte over our limit
                    size = MAX_IMAGE_BYTES + 1
                    head = png(picture(8, 8))[:8]
                    block = bytes(2**20)
                    self.reply([head, *[block] * ((size - len(head)) // len(block)),
                                bytes((size - len(head)) % len(block))], size)
                else:
                    self.send_error(404)

            def reply(self, parts: list[bytes], size: int | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(size if size is not None else sum(map(len, parts))))
                self.end_headers()
                for part in parts:
                    self.wfile.write(part)

            def log_message(self, *args) -> None:
                pass

        self.requested = requested
        self.serve(Handler)


def sse_events(response: requests.Response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream response."""
    events, kind, data = [], None, []
    for raw in response.iter_lines():
        line = raw.decode("utf-8")  # SSE is UTF-8 by definition; requests would guess Latin-1
        if line.startswith("event:"):
            kind = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())
        elif line == "" and kind is not None:
            events.append((kind, json.loads("\n".join(data))))
            kind, data = None, []
    return events


def text(prediction: dict) -> str:
    return "".join(prediction["output"] or [])


def failure(prediction: dict) -> str:
    """The error of a prediction that must have failed."""
    assert prediction["status"] == "failed", prediction
    return prediction["error"]


def assert_still_serves(server: Server) -> None:
    assert server.wait_ready() == "READY"
    prediction = server.predict({"image": IMAGE, "prompt": "Still there?", "max_length_tokens": 1,
                                 "temperature": 0}).json()
    assert prediction["status"] == "succeeded", prediction


