"""The predictor behind the real Cog HTTP server (coglet), on a tiny checkpoint on the CPU: start-up, predictions
(sync, SSE, webhooks), cancel, URL inputs. Inputs refused or survived: test_server_inputs.py; many predictions at
once: test_concurrency.py. The server (``coglet_server.Server``, fixture ``server`` in conftest.py) is started once
for this module.
"""

import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
import requests
from coglet_server import (
    IMAGE,
    ROOT,
    SHORT,
    Files,
    Server,
    Webhooks,
    assert_still_serves,
    failure,
    sse_events,
    text,
)

from dsvl2.inputs.images import MAX_IMAGE_BYTES


@pytest.fixture(scope="module")
def webhooks():
    hooks = Webhooks()
    yield hooks
    hooks.httpd.shutdown()



@pytest.fixture(scope="module")
def files():
    served = Files()
    yield served
    served.httpd.shutdown()



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


