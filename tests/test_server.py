"""The predictor behind the real Cog HTTP server (coglet), on a tiny checkpoint on the CPU.

The server is started once for this module, exactly as the image starts it
(`python -m cog.server.http`), from the project root so that it serves `.cog/openapi_schema.json`.
"""

import base64
import io
import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from dsvl2.inputs.images import MAX_IMAGE_BYTES

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180
SHORT = {"max_length_tokens": 6, "temperature": 0}  # greedy: the same text every time
GOLDEN_IMAGE = Path("tests") / "fixtures" / "golden" / "images" / "tiny_20x15.png"  # relative to the server's cwd


# ---------------------------------------------------------------------------------------------
# Images, as the bytes a client would upload


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


# ---------------------------------------------------------------------------------------------
# The server, a webhook receiver and small HTTP helpers


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


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.wait_until_set_up()
        yield srv
    finally:
        srv.stop()


class Webhooks:
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
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

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


@pytest.fixture(scope="module")
def webhooks():
    hooks = Webhooks()
    yield hooks
    hooks.httpd.shutdown()


class Files:
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
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture(scope="module")
def files():
    served = Files()
    yield served
    served.httpd.shutdown()


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


# ---------------------------------------------------------------------------------------------
# Tests


def test_health_goes_from_starting_to_ready(server: Server) -> None:
    assert server.statuses == ["STARTING", "READY"], server.log_tail()
    # Each phase of setup is logged with its time. The server's log is checked, not the health
    # check's copy of the setup logs: coglet 0.23 can close that copy before the last lines arrive.
    expected = [f"setup: {phase} done in" for phase in ("checkpoint", "load", "warm-up")]
    deadline = time.monotonic() + 10
    while not all(e in (logs := server.log_path.read_text()) for e in expected):
        assert time.monotonic() < deadline, logs
        time.sleep(0.1)
    assert "setup: checkpoint done in" in server.health()["setup"]["logs"]


def test_setup_failure_is_reported_with_advice(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, broken)
    missing = sorted(broken.glob("model-*.safetensors"))[0]
    missing.unlink()
    srv = Server(broken, tmp_path / "server.log")
    try:
        srv.wait_until_set_up()
        health = srv.health()
    finally:
        srv.stop()
    assert health["status"] == "SETUP_FAILED", health
    assert missing.name in health["setup"]["logs"] and "Point DSVL2_WEIGHTS at" in health["setup"]["logs"]


def test_openapi_schema_is_served(server: Server) -> None:
    served = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert served == json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())


def test_sync_prediction_returns_text_and_metrics(server: Server) -> None:
    response = server.predict({"image": IMAGE, "prompt": "Describe this image.", **SHORT})
    prediction = response.json()
    assert response.status_code == 200 and prediction["status"] == "succeeded", prediction
    assert isinstance(prediction["output"], list) and all(isinstance(c, str) for c in prediction["output"])
    assert text(prediction).strip()
    metrics = prediction["metrics"]
    assert metrics["input_token_count"] > 0
    assert 1 <= metrics["output_token_count"] <= SHORT["max_length_tokens"]
    assert metrics["time_to_first_token"] > 0 and metrics["tokens_per_second"] > 0
    assert metrics["predict_time"] >= metrics["time_to_first_token"]
    again = server.predict({"image": IMAGE, "prompt": "Describe this image.", **SHORT}).json()
    assert text(again) == text(prediction)  # greedy decoding is deterministic


def test_sse_prediction_streams_chunks(server: Server) -> None:
    inputs = {"image": IMAGE, "prompt": "Describe this image.", **SHORT}
    with server.request("POST", "/predictions", json={"input": inputs}, stream=True,
                        headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(response)
    kinds = [kind for kind, _ in events]
    chunks = [data["chunk"] for kind, data in events if kind == "output"]
    assert kinds[0] == "start" and kinds[-1] == "completed", kinds
    assert len(chunks) >= 2, events
    completed = events[-1][1]
    assert completed["status"] == "succeeded"
    assert "".join(chunks) == text(completed)
    assert text(completed) == text(server.predict(inputs).json())


def test_async_prediction_posts_webhooks(server: Server, webhooks: Webhooks) -> None:
    response = server.request(
        "POST", "/predictions",
        json={"input": {"image": IMAGE, "prompt": "What is this?", **SHORT}, "webhook": webhooks.url("async")},
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202, response.text
    bodies = webhooks.wait_for("async", lambda b: b["status"] not in ("starting", "processing"))
    final = bodies[-1]
    assert final["status"] == "succeeded", final
    assert final["id"] == response.json()["id"]
    assert text(final) and final["metrics"]["output_token_count"] >= 1


def test_cancel_stops_generation(server: Server, webhooks: Webhooks) -> None:
    prediction_id = f"cancel-{uuid.uuid4().hex}"
    limit = 4096
    response = server.request(
        "PUT", f"/predictions/{prediction_id}",
        json={"input": {"image": IMAGE, "prompt": "Tell a very long story.", "max_length_tokens": limit,
                        "temperature": 0},
              "webhook": webhooks.url("cancel")},
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202, response.text
    webhooks.wait_for("cancel", lambda b: bool(b.get("output")))  # generation is under way
    assert server.request("POST", f"/predictions/{prediction_id}/cancel").status_code == 200
    final = webhooks.wait_for("cancel", lambda b: b["status"] not in ("starting", "processing"))[-1]
    assert final["status"] == "canceled", final
    assert final["metrics"]["output_token_count"] < limit // 4, final["metrics"]
    assert server.wait_ready() == "READY"
    after = server.predict({"image": IMAGE, "prompt": "Still there?", **SHORT}).json()
    assert after["status"] == "succeeded", after


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 1.5), ("temperature", -0.1), ("temperature", "hot"),
        ("top_p", 1.01), ("top_p", -0.5),
        ("max_length_tokens", 0), ("max_length_tokens", 4097), ("max_length_tokens", 12.5),
        ("repetition_penalty", 0), ("repetition_penalty", 2.5),
        ("top_k", -1), ("seed", -1), ("seed", 2**32),
        ("image", None), ("prompt", None), ("prompt", 42),
        # Fractions for integers (whole numbers pass: test_whole_number_floats_are_integers), wrong JSON types
        ("seed", 5.5), ("top_k", 2.5), ("max_length_tokens", -5), ("max_length_tokens", "16"), ("seed", True),
        ("temperature", [0.5]), ("top_p", {"value": 0.5}), ("prompt", ["a"]), ("prompt", {"text": "a"}),
        ("image", 42), ("image2", 3.5), ("image", [IMAGE]), ("image", {"url": IMAGE}),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 20 else None,
)
def test_invalid_input_is_refused_with_422(server: Server, field: str, value) -> None:
    inputs = {"image": IMAGE, "prompt": "Describe this image.", **SHORT}
    if value is None:
        del inputs[field]
    else:
        inputs[field] = value
    response = server.predict(inputs)
    assert response.status_code == 422, response.text
    assert any(detail["loc"][-1] == field for detail in response.json()["detail"]), response.text


def test_whole_number_floats_are_integers(server: Server) -> None:
    """JSON Schema's "integer" admits 16.0 (coglet lets it through, 16.5 gets a 422): run() takes it as 16."""
    inputs = {"image": IMAGE, "prompt": "Describe this image.", "temperature": 1.0}
    as_floats = server.predict({**inputs, "max_length_tokens": 6.0, "seed": 5.0, "top_k": 5.0}).json()
    as_ints = server.predict({**inputs, "max_length_tokens": 6, "seed": 5, "top_k": 5}).json()
    assert as_floats["status"] == as_ints["status"] == "succeeded", (as_floats, as_ints)
    assert text(as_floats) == text(as_ints)


@pytest.mark.parametrize("field", ["image", "image2"])
def test_server_paths_are_refused_alike(server: Server, field: str, tmp_path: Path) -> None:
    """A plain string reaches run() as it was sent: the server's disk is not for clients to read, or probe."""
    (tmp_path / "notes.png").write_text("not an image")
    paths = [str(ROOT / GOLDEN_IMAGE), str(GOLDEN_IMAGE), "/etc/hostname", str(tmp_path / "notes.png"),
             str(tmp_path / "missing.png"), str(tmp_path), "/proc/self/environ", "../../../../etc/passwd",
             f"file://{ROOT / GOLDEN_IMAGE}", "", "HTTP://127.0.0.1/picture.png", "ftp://127.0.0.1/picture.png"]
    errors = set()
    for path in paths:
        prediction = server.predict({"image": IMAGE, "prompt": "Describe.", **SHORT, field: path}).json()
        error = failure(prediction)
        assert not path or path not in error.replace(field, "") + prediction["logs"], prediction
        errors.add(error)
    assert len(errors) == 1, errors
    assert f"{field} must be an http://, https:// or data: URI" in errors.pop()
    assert_still_serves(server)


def test_url_inputs_are_downloaded_by_coglet(server: Server, files: Files) -> None:
    """coglet fetches http(s) URLs before run(), loopback ones included; its own errors for a failed download."""
    fetched = server.predict({"image": files.url("picture.png"), "prompt": "Describe.", **SHORT}).json()
    assert fetched["status"] == "succeeded", fetched
    assert "/picture.png" in files.requested
    missing = failure(server.predict({"image": files.url("missing.png"), "prompt": "Describe.", **SHORT}).json())
    assert "404" in missing
    huge = failure(server.predict({"image2": files.url("huge.png"), "image": IMAGE, "prompt": "Compare.",
                                   **SHORT}).json())
    assert f"image2 is {MAX_IMAGE_BYTES + 1} bytes, over the limit of {MAX_IMAGE_BYTES} bytes" in huge
    assert_still_serves(server)


def test_prompt_length_limits(server: Server) -> None:
    """Megabytes of prompt are refused before tokenizing; one at the limit is tokenized and too long."""
    huge = server.predict({"image": IMAGE, "prompt": "x" * 3_000_000, **SHORT})
    assert huge.status_code == 422
    assert [d["msg"].endswith("is longer than 100000 characters") for d in huge.json()["detail"]] == [True]
    error = failure(server.predict({"image": IMAGE, "prompt": "word " * 20_000, **SHORT}).json())
    assert error.count("PromptTooLong") == 1 and "PromptTooLong: the prompt is" in error, error
    assert "context is 4096 tokens" in error
    assert_still_serves(server)


def test_oversized_request_is_refused_with_413(server: Server) -> None:
    """coglet buffers at most 100 MiB of request body."""
    body = json.dumps({"input": {"image": data_uri(bytes(76 * 2**20)), "prompt": "Describe."}})
    assert len(body) > 100 * 2**20
    response = server.request("POST", "/predictions", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text[:200]
    assert_still_serves(server)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('{"input": {"image": "IMAGE", "prompt": "a", "temperature": NaN}}', id="NaN"),
        pytest.param('{"input": {"image": "IMAGE", "prompt": "a", "temperature": Infinity}}', id="Infinity"),
        pytest.param('{"input": {"image": "IMAGE", "prompt": "a", "top_k": 1e309}}', id="1e309"),
        pytest.param('{"input": {"image": "IMAGE", "prompt": "a\\ud800"}}', id="lone-surrogate"),
        pytest.param('{"input": {"image": "IMAGE", "prompt": "a\udcff"}}', id="invalid-utf8"),
        pytest.param('{"input": {"image": "IMAGE", ', id="truncated"),
    ],
)
def test_unparseable_json_is_refused_with_400(server: Server, body: str) -> None:
    raw = body.replace("IMAGE", IMAGE).encode("utf-8", "surrogateescape")  # \udcff: the byte 0xff
    response = server.request("POST", "/predictions", data=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.text.startswith("Failed to parse the request body as JSON")
    assert_still_serves(server)


def test_unknown_fields_are_dropped(server: Server) -> None:
    """coglet strips fields the schema does not name (logging them) before validating; run() never sees them."""
    prediction = server.predict({"image": IMAGE, "prompt": "Describe.", **SHORT, "max_tokens": 1, "bogus": [1]})
    assert prediction.json()["status"] == "succeeded", prediction.text
    deadline = time.monotonic() + 10
    while "Stripped unknown input fields" not in server.log_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("inputs", "error"),
    [
        pytest.param({"prompt": "<image>" * 1000}, "1000 <image> tags but 1 image was given", id="many-tags"),
        pytest.param({"image2": IMAGE, "prompt": "<image> only"}, "1 <image> tag but 2 images were given",
                     id="more-images-than-tags"),
        pytest.param({"prompt": "Describe\u0000 this.\u0000"}, None, id="nul-bytes"),
        pytest.param({"prompt": "Describe \U0001F600 \u202e this."}, None, id="emoji-and-bidi"),
        pytest.param({"image": data_uri(png(picture(1, 1)))}, None, id="1x1-image"),
        pytest.param({"image": data_uri(png(picture(1, 10000)))}, "image is 1x10000, an aspect ratio of 10000:1, "
                     "over the limit of 500:1", id="1x10000-image"),
        pytest.param({"image": data_uri(png(picture(32, 32)), "text/plain")}, None, id="png-labelled-text"),
        pytest.param({"image": data_uri(b"hello", "text/plain")}, "image is not a recognised image",
                     id="text-data-uri"),
        pytest.param({"image": data_uri(bytes(30 * 2**20))}, "image is not a recognised image",
                     id="30MB-data-uri"),
        pytest.param({"image": "data:image/png;base64,"}, "image is empty (0 bytes)", id="empty-data-uri"),
        pytest.param({"image": "data:image/png;base64,abcde"}, "Invalid base64", id="bad-base64"),
        pytest.param({"top_k": 10**19, "temperature": 1.0}, None, id="top_k-past-int64"),
        pytest.param({"top_k": 1e30, "temperature": 1.0}, None, id="top_k-1e30"),
    ],
)
def test_hostile_input_fails_clearly_or_works(server: Server, inputs: dict, error: str | None) -> None:
    prediction = server.predict({"image": IMAGE, "prompt": "Describe this image.", **SHORT, **inputs}).json()
    if error is None:
        assert prediction["status"] == "succeeded", prediction
    else:
        assert error in failure(prediction)
    assert_still_serves(server)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        pytest.param(lambda: b"plain text, not a picture", "not a recognised image", id="not-an-image"),
        pytest.param(truncated_png, "truncated", id="truncated-png"),
        pytest.param(lambda: b"", "empty", id="zero-bytes"),
        pytest.param(bomb_png, "over the limit", id="decompression-bomb"),
        pytest.param(animated_gif, None, id="animated-gif"),
        pytest.param(cmyk_jpeg, None, id="cmyk-jpeg"),
        pytest.param(png_16bit, None, id="16-bit-png"),
    ],
)
def test_bad_image_fails_clearly_or_works(server: Server, make, error: str | None) -> None:
    prediction = server.predict({"image": data_uri(make()), "prompt": "Describe this image.", **SHORT}).json()
    if error is None:
        assert prediction["status"] == "succeeded", prediction
        assert prediction["metrics"]["output_token_count"] >= 1
    else:
        assert prediction["status"] == "failed", prediction
        assert error in prediction["error"], prediction["error"]
    assert server.wait_ready() == "READY"


def test_exif_orientation_is_applied(server: Server) -> None:
    """A 1200x400 picture stored on its side tiles 3x1, like the upright one, not 1x3."""

    def prompt_tokens(content: bytes, mime: str) -> int:
        prediction = server.predict({"image": data_uri(content, mime), "prompt": "Describe.", **SHORT}).json()
        assert prediction["status"] == "succeeded", prediction
        return prediction["metrics"]["input_token_count"]

    upright = prompt_tokens(png(picture(1200, 400)), "image/png")
    on_its_side = prompt_tokens(png(picture(400, 1200)), "image/png")
    assert upright != on_its_side  # the check below can tell the two apart
    assert prompt_tokens(exif_rotated_jpeg(1200, 400), "image/jpeg") == upright


def test_extra_images_are_used(server: Server) -> None:
    one = server.predict({"image": IMAGE, "prompt": "Compare.", **SHORT}).json()
    two = server.predict({"image": IMAGE, "image2": IMAGE, "prompt": "Compare.", **SHORT}).json()
    assert one["status"] == two["status"] == "succeeded", (one, two)
    assert two["metrics"]["input_token_count"] > one["metrics"]["input_token_count"]
    tagged = server.predict({"image": IMAGE, "image2": IMAGE, "prompt": "<image> vs <image>", **SHORT}).json()
    assert tagged["status"] == "succeeded", tagged
    mismatch = server.predict({"image": IMAGE, "prompt": "<image> vs <image>", **SHORT}).json()
    assert "2 <image> tags but 1 image was given" in failure(mismatch)


def test_server_still_serves_after_errors(server: Server) -> None:
    assert server.health()["status"] == "READY"
    prediction = server.predict({"image": IMAGE, "prompt": "Describe this image.", **SHORT}).json()
    assert prediction["status"] == "succeeded", prediction
