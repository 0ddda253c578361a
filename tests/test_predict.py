"""The Cog adapter called from Python (no server): setup, input checks, metrics and the schema."""

import asyncio
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
from dsvl2 import settings
from dsvl2.errors import CheckpointError, InputError

ROOT = Path(__file__).resolve().parent.parent
SHORT = {"max_length_tokens": 4, "temperature": 0}


def call(runner: predict.Runner, **inputs):
    """``run`` as coglet calls it: awaited, then the generator it returns iterated (here on this thread)."""
    return asyncio.run(runner.run(**inputs))


def load_make_schema():
    spec = importlib.util.spec_from_file_location("make_schema", ROOT / "scripts" / "make_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "picture.png"
    Image.new("RGB", (96, 64), (200, 120, 40)).save(path)
    return path


@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path) -> predict.Runner:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(settings.WEIGHTS_ENV, str(tiny_checkpoint))
        mp.setenv(settings.DEVICE_ENV, os.environ.get(settings.DEVICE_ENV, "cpu"))
        r = predict.Runner()
        r.setup()
    return r


def test_python_call_applies_input_defaults(runner: predict.Runner, image_path: Path) -> None:
    """Arguments left out arrive as the Input() objects themselves; run() must use their defaults."""
    out = "".join(call(runner, image=image_path, prompt="Describe this image.", max_length_tokens=3))
    assert isinstance(out, str)


def test_python_call_is_deterministic_when_greedy(runner: predict.Runner, image_path: Path) -> None:
    first = "".join(call(runner, image=image_path, prompt="Describe this image.", **SHORT))
    assert first == "".join(call(runner, image=str(image_path), prompt="Describe this image.", **SHORT))


def test_same_seed_same_sample(runner: predict.Runner, image_path: Path) -> None:
    sample = dict(image=image_path, prompt="Describe this image.", max_length_tokens=6, temperature=1.0,
                  seed=7)
    assert "".join(call(runner, **sample)) == "".join(call(runner, **sample))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 1.5, "temperature must be between"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("temperature", "0.5", "temperature must be a number"),
        ("top_p", -0.1, "top_p must be between"),
        ("top_p", None, "top_p is required"),
        ("max_length_tokens", 0, "max_length_tokens must be between"),
        ("max_length_tokens", 5000, "max_length_tokens must be between"),
        ("max_length_tokens", 8.5, "max_length_tokens must be an integer"),
        ("max_length_tokens", float("inf"), "max_length_tokens must be an integer"),
        ("max_length_tokens", True, "max_length_tokens must be an integer"),
        ("repetition_penalty", 0, "repetition_penalty must be between"),
        ("repetition_penalty", 3, "repetition_penalty must be between"),
        ("top_k", -1, "top_k must be at least 0"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("seed", -5, "seed must be between"),
        ("seed", 1.5, "seed must be an integer"),
        ("prompt", None, "prompt is required"),
        ("prompt", 42, "prompt must be a string"),
        ("prompt", "   ", "prompt"),
        ("prompt", "x" * 100_001, "prompt is 100001 characters, over the limit of 100000"),
        ("prompt", "caf\u00e9 \ud800", "prompt is not valid Unicode: a lone surrogate at character 5"),
        ("prompt", "<image> and <image>", "2 <image> tags but 1 image was given"),
        ("image", None, "image is required"),
        ("image", 3, "image must be a file path"),
        ("image2", 3, "image2 must be a file path"),
    ],
)
def test_python_call_refuses_bad_input(
    runner: predict.Runner, image_path: Path, field: str, value, message: str
) -> None:
    inputs = {"image": image_path, "prompt": "Describe this image.", **SHORT, field: value}
    with pytest.raises(InputError, match=message):
        list(call(runner, **inputs))


def test_whole_number_floats_are_integers(runner: predict.Runner, image_path: Path) -> None:
    """JSON Schema's "integer" admits 16.0 and coglet passes it on as a float: the same value as 16 here too."""
    sample = dict(image=image_path, prompt="Describe this image.", temperature=1.0)
    as_ints = "".join(call(runner, **sample, max_length_tokens=5, seed=5, top_k=5))
    assert "".join(call(runner, **sample, max_length_tokens=5.0, seed=5.0, top_k=5.0)) == as_ints


def test_top_k_past_the_vocabulary_means_no_limit(runner: predict.Runner, image_path: Path) -> None:
    """The schema puts no ceiling on top_k; one past int64 once failed inside the scheduler."""
    sample = dict(image=image_path, prompt="Describe this image.", max_length_tokens=5, temperature=1.0, seed=3)
    assert "".join(call(runner, **sample, top_k=10**30)) == "".join(call(runner, **sample, top_k=0))


def test_local_paths_are_refused_alike_when_served(
    runner: predict.Runner, image_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set up as the HTTP server sets it up by default: whatever is (or is not) at the path, one answer, no path."""
    monkeypatch.delenv(settings.LOCAL_FILES_ENV, raising=False)
    monkeypatch.setattr(runner, "local_files", settings.local_files_allowed(served=True))
    monkeypatch.chdir(image_path.parent)
    (tmp_path / "text.png").write_text("not an image")
    paths = [str(image_path), "picture.png", str(tmp_path / "text.png"), str(tmp_path / "missing.png"),
             str(tmp_path), "/proc/self/environ", f"file://{image_path}", "", "HTTP://127.0.0.1/x.png"]
    messages = set()
    for field in ("image", "image2"):
        for path in paths:
            with pytest.raises(InputError) as refused:
                list(call(runner, **{"image": image_path, "prompt": "Describe.", **SHORT, field: path}))
            messages.add(str(refused.value).replace(field, "FIELD"))
    (message,) = messages
    assert message.startswith("FIELD must be an http://, https:// or data: URI")
    assert "DSVL2_ALLOW_LOCAL_FILES=1" in message
    # What coglet makes of a URL or data URI, a path object to the file it downloaded, is read.
    assert "".join(call(runner, image=image_path, prompt="Describe.", **SHORT))


def test_local_files_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.LOCAL_FILES_ENV, raising=False)
    assert settings.local_files_allowed(served=False) and not settings.local_files_allowed(served=True)
    monkeypatch.setenv(settings.LOCAL_FILES_ENV, "0")
    assert not settings.local_files_allowed(served=True)
    monkeypatch.setenv(settings.LOCAL_FILES_ENV, "1")
    assert settings.local_files_allowed(served=True)
    monkeypatch.setenv(settings.LOCAL_FILES_ENV, "yes")
    with pytest.raises(RuntimeError, match="DSVL2_ALLOW_LOCAL_FILES='yes' is not supported"):
        settings.local_files_allowed(served=True)


def test_pdl_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # DSVL2_PDL is read here only, into the engine's config: anything but 0 is on.
    monkeypatch.delenv(settings.PDL_ENV, raising=False)
    assert settings.engine_config("cpu").pdl
    monkeypatch.setenv(settings.PDL_ENV, "0")
    assert not settings.engine_config("cpu").pdl


def test_image_errors_name_the_field_not_the_file(runner: predict.Runner, image_path: Path, tmp_path: Path) -> None:
    notes = tmp_path / "tmpdownload.png"
    notes.write_text("plain text")
    with pytest.raises(InputError, match="^image2 is not a recognised image") as refused:
        list(call(runner, image=image_path, image2=notes, prompt="Compare.", **SHORT))
    assert str(tmp_path) not in str(refused.value) and "tmpdownload" not in str(refused.value)


def test_bad_image_is_an_input_error(runner: predict.Runner, tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        list(call(runner, image=empty, prompt="Describe this image.", **SHORT))


def test_closing_the_stream_stops_generation(runner: predict.Runner, image_path: Path) -> None:
    """What coglet does on cancel: an exception inside the generator. The next call still works."""
    stream = call(runner, image=image_path, prompt="Tell a long story.", max_length_tokens=4096, temperature=0)
    next(stream)
    stream.close()
    assert "".join(call(runner, image=image_path, prompt="Describe this image.", **SHORT)) is not None


def test_setup_without_gpu_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    monkeypatch.setenv(settings.WEIGHTS_ENV, str(tiny_checkpoint))
    monkeypatch.delenv(settings.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA GPU.*DSVL2_DEVICE=cpu"):
        predict.Runner().setup()


def test_setup_refuses_unknown_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.DEVICE_ENV, "tpu")
    with pytest.raises(RuntimeError, match="DSVL2_DEVICE='tpu' is not supported"):
        predict.Runner().setup()


def test_incomplete_checkpoint_fails_setup_with_advice(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    monkeypatch.setenv(settings.WEIGHTS_ENV, str(broken))
    monkeypatch.setenv(settings.DEVICE_ENV, "cpu")
    monkeypatch.setattr(predict, "ensure_checkpoint", lambda *a, **k: pytest.fail("unexpected download"))
    with pytest.raises(CheckpointError, match="Point DSVL2_WEIGHTS at a complete"):
        predict.Runner().setup()


def test_missing_checkpoint_is_downloaded(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    calls = []

    def fake_download(dest: Path, repo_id: str, log) -> Path:
        calls.append((dest, repo_id))
        log("download: (test) copying the tiny checkpoint")
        shutil.copytree(tiny_checkpoint, dest)
        return dest

    target = tmp_path / "weights"
    monkeypatch.setenv(settings.WEIGHTS_ENV, str(target))
    monkeypatch.setenv(settings.DEVICE_ENV, "cpu")
    monkeypatch.setattr(predict, "ensure_checkpoint", fake_download)
    predict.Runner().setup()
    assert calls == [(target, "deepseek-ai/deepseek-vl2-small")]


def test_openapi_schema_file_is_current() -> None:
    make_schema = load_make_schema()
    committed = (ROOT / ".cog" / "openapi_schema.json").read_text()
    assert make_schema.render(make_schema.build_schema()) == committed, "run: python scripts/make_schema.py"


def test_inputs_match_the_published_replicate_model() -> None:
    """Existing callers send these names and get these defaults; the extras are all optional."""
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    inputs = schema["components"]["schemas"]["Input"]
    props = inputs["properties"]
    assert inputs["required"] == ["image", "prompt"]
    assert props["image"]["format"] == "uri" and props["prompt"]["type"] == "string"
    expected = {
        "top_p": (0.9, 0, 1),
        "temperature": (0.1, 0, 1),
        "max_length_tokens": (2048, 1, 4096),
        "repetition_penalty": (1.1, 0.01, 2),
    }
    for name, (default, minimum, maximum) in expected.items():
        prop = props[name]
        assert (prop["default"], prop["minimum"], prop["maximum"]) == (default, minimum, maximum), name
    assert props["max_length_tokens"]["type"] == "integer"
    assert props["top_k"]["default"] == 50
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    assert schema["components"]["schemas"]["Output"]["x-cog-array-display"] == "concatenate"
