"""Inputs through the real Cog HTTP server (coglet), on a tiny checkpoint on the CPU: what the schema refuses, what
the service refuses with a reason, hostile images and prompts, and that the server still serves after all of it.
The server (``coglet_server.Server``, fixture ``server`` in conftest.py) is started once for this module.
"""

import json
import time
from pathlib import Path

import pytest
from coglet_server import (
    GOLDEN_IMAGE,
    IMAGE,
    ROOT,
    SHORT,
    Server,
    animated_gif,
    assert_still_serves,
    bomb_png,
    cmyk_jpeg,
    data_uri,
    exif_rotated_jpeg,
    failure,
    picture,
    png,
    png_16bit,
    text,
    truncated_png,
)


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
    assert_still_serves(server)  # READY (after coglet's moment of BUSY once a prediction returns), and answers


