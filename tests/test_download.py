"""dsvl2.startup.download against a fake Hugging Face Hub on 127.0.0.1, reached through HF_ENDPOINT.

The fake speaks what huggingface_hub's snapshot_download needs: the revision API (with file sizes and hashes),
the tree API, and HEAD/GET on /resolve/ with ETag, X-Repo-Commit, Content-Length and Range.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest

from dsvl2.startup import download
from dsvl2.startup.download import DownloadError, ensure_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPO = "fake-org/fake-vl2-small"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARD1 = "model-00001-of-000002.safetensors"
SHARD2 = "model-00002-of-000002.safetensors"
WANTED = [SHARD1, SHARD2, "model.safetensors.index.json", "config.json", "tokenizer.json"]
UNWANTED = ["README.md", ".gitattributes", "modeling_deepseek.py", "images/logo.png"]


class FakeHub:
    """The files of one repo at one commit, the requests seen, and the faults to inject."""

    def __init__(self) -> None:
        rng = random.Random(0)
        index = {"metadata": {}, "weight_map": {"a.weight": SHARD1, "b.weight": SHARD2}}
        self.files = {
            SHARD1: rng.randbytes(300_000),
            SHARD2: rng.randbytes(123_457),
            "model.safetensors.index.json": json.dumps(index).encode(),
            "config.json": b'{"model_type": "deepseek_vl_v2"}',
            "tokenizer.json": b'{"model": {"vocab": {}}}',
            "README.md": b"# must not be downloaded\n",
            ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
            "modeling_deepseek.py": b"raise SystemExit\n",
            "images/logo.png": b"\x89PNG not really",
        }
        self.listed_size: dict[str, int] = {}  # sizes the API claims instead of the real ones
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers in lower case)
        self.token: str | None = None
        self.refusal = (401, "")  # status and X-Error-Code without the token
        self.drop_first: set[str] = set()  # the first GET sends half the body, then hangs up
        self.stall: dict[str, threading.Event] = {}  # GETs send half the body, then wait for the event
        self.fail: dict[str, int] = {}  # GETs (not HEADs) answered with this status
        self.corrupt: set[str] = set()  # served with one byte flipped (right size, wrong hash)
        self.lock = threading.Lock()
        self.url = ""

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_id(data)

    def listing(self, api: str) -> list[dict]:
        """The files as the revision API lists them (its "siblings", with blobs=true) or the tree API does."""
        entries = []
        for name, data in self.files.items():
            size = self.listed_size.get(name, len(data))
            entry = ({"rfilename": name, "size": size, "blobId": git_blob_id(data)} if api == "revision" else
                     {"type": "file", "path": name, "size": size, "oid": git_blob_id(data)})
            if name.endswith(".safetensors"):  # stored with LFS
                sha = "sha256" if api == "revision" else "oid"
                entry["lfs"] = {sha: self.etag(name), "size": size, "pointerSize": 134}
            entries.append(entry)
        return entries

    def gets(self, name: str) -> list[dict[str, str]]:
        """Headers of the GET requests for file ``name``."""
        return [h for m, p, h in self.requests if m == "GET" and p.endswith(f"/resolve/{COMMIT}/{name}")]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        path = self.path.partition("?")[0]
        with hub.lock:
            hub.requests.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
            status, code = hub.refusal
            return self._send(b"", status, {"X-Error-Code": code} if code else {})
        for api in ("revision", "tree"):
            prefix = f"/api/models/{REPO}/{api}/"
            if path.startswith(prefix):
                if path[len(prefix):] not in ("main", COMMIT):
                    return self._send(b"", 404, {"X-Error-Code": "RevisionNotFound"})
                entries = hub.listing(api)
                body = {"id": REPO, "sha": COMMIT, "siblings": entries} if api == "revision" else entries
                return self._send(json.dumps(body).encode(), 200, {"Content-Type": "application/json"})
        resolve = f"/{REPO}/resolve/{COMMIT}/"
        if not path.startswith(resolve) or path[len(resolve):] not in hub.files:
            return self._send(b"", 404, {"X-Error-Code": "RepoNotFound" if REPO not in path else "EntryNotFound"})
        name = path[len(resolve):]
        data = hub.files[name]
        headers = {"ETag": f'"{hub.etag(name)}"', "X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
        if self.command == "HEAD":
            return self._send(data, 200, headers)
        if name in hub.fail:
            return self._send(b"", hub.fail[name])
        if name in hub.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").rstrip("-"))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        with hub.lock:
            cut = name in hub.drop_first or name in hub.stall
            hub.drop_first.discard(name)
        self._send(data[start:], 206 if start else 200, headers, cut=cut, wait=hub.stall.get(name))

    def _send(self, body: bytes, status: int, headers: dict[str, str] | None = None, *, cut: bool = False,
              wait: threading.Event | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        try:
            self.wfile.write(body[: len(body) // 2] if cut else body)
            self.wfile.flush()
            if wait is not None:
                wait.wait(30)
        except OSError:  # the client is gone
            pass


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fake Hub, and the environment that points huggingface_hub at it (HF_ENDPOINT, and HF_HOME in tmp_path)."""
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.hub = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    set_env(monkeypatch, HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1")
    yield fake
    server.shutdown()
    server.server_close()
    monkeypatch.undo()
    importlib.reload(huggingface_hub.constants)


def set_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Set environment variables and let huggingface_hub read them again, as it does when first imported."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    importlib.reload(huggingface_hub.constants)


def fetch(dest: Path, logs: list[str] | None = None, **kw) -> Path:
    return ensure_checkpoint(dest, kw.pop("repo_id", REPO), log=(logs if logs is not None else []).append, **kw)


def assert_checkpoint(hub: FakeHub, dest: Path) -> None:
    """``dest`` holds exactly the wanted files, byte for byte, and no staging directory is left."""
    assert sorted(p.name for p in dest.iterdir()) == sorted(WANTED)
    for name in WANTED:
        assert (dest / name).read_bytes() == hub.files[name], name
    assert not dest.with_name(dest.name + ".partial").exists()


def test_download(hub: FakeHub, tmp_path: Path) -> None:
    logs: list[str] = []
    dest = tmp_path / "weights"
    assert fetch(dest, logs) == dest
    assert_checkpoint(hub, dest)
    assert all(len(hub.gets(name)) == 1 for name in WANTED)
    assert not any(hub.gets(name) for name in UNWANTED)
    assert any("checkpoint ready" in line for line in logs)
    assert not any("authorization" in h for _, _, h in hub.requests)
    seen = len(hub.requests)
    assert fetch(dest) == dest  # a checkpoint is there: no request at all
    assert len(hub.requests) == seen


def test_dropped_connection_resumes_with_range(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The library writes what it received in chunks of this size (10 MB): smaller, so that the half shard counts.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub.drop_first = {SHARD1}
    assert_checkpoint(hub, fetch(tmp_path / "weights"))
    first, second = hub.gets(SHARD1)
    assert "range" not in first and second["range"] == f"bytes={(150_000 >> 16) << 16}-"


def test_killed_download_never_leaves_a_partial_checkpoint(hub: FakeHub, tmp_path: Path) -> None:
    """A process started with HF_ENDPOINT and HF_HOME set is killed mid-shard; the next attempts fetch only what
    is missing, and the checkpoint directory appears only when complete."""
    hub.stall = {SHARD1: threading.Event()}
    dest, staging = tmp_path / "weights", tmp_path / "weights.partial"
    code = f"from dsvl2.startup.download import ensure_checkpoint; ensure_checkpoint({str(dest)!r}, {REPO!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # The shard's GET must have reached the hub (its .incomplete file is made before the request is sent).
        while not ((staging / SHARD2).is_file() and any(staging.rglob("*.incomplete")) and hub.gets(SHARD1)):
            assert proc.poll() is None and time.monotonic() < deadline, "the download did not get under way"
            assert not dest.exists()
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    hub.stall.pop(SHARD1).set()
    assert not dest.exists() and any(staging.rglob("*.incomplete"))
    hub.fail = {SHARD1: 503}  # a second attempt fails too: the killed one's partial file is removed all the same
    with pytest.raises(DownloadError, match=f"HTTP 503 for .*/{SHARD1}; try again later"):
        fetch(dest)
    assert not dest.exists() and not any(staging.rglob("*.incomplete"))
    hub.fail.clear()
    assert_checkpoint(hub, fetch(dest))
    assert len(hub.gets(SHARD1)) == 3 and len(hub.gets(SHARD2)) == 1


def test_too_little_disk_space_is_refused_before_downloading(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.listed_size[SHARD1] = 20_000_000_000
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(100e9, 95e9, 5_000_000_000))
    with pytest.raises(DownloadError, match=rf"20\.00 GB to download into {re.escape(str(tmp_path))}/weights\.partial, "
                                            r"but only 5\.00 GB free"):
        fetch(tmp_path / "weights")
    assert not any(m == "GET" and "/resolve/" in p for m, p, _ in hub.requests)


@pytest.mark.parametrize(("status", "code"), [(401, ""), (403, "GatedRepo")])
def test_refused_without_a_token_names_hf_token(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                status: int, code: str) -> None:
    hub.token, hub.refusal = "hf_secret", (status, code)
    with pytest.raises(DownloadError, match=f"HTTP {status} for .*{REPO}.*set HF_TOKEN"):
        fetch(tmp_path / "weights")
    refused = len(hub.requests)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert_checkpoint(hub, fetch(tmp_path / "weights"))
    assert all(h.get("authorization") == "Bearer hf_secret" for _, _, h in hub.requests[refused:])


def test_token_from_hf_home(hub: FakeHub, tmp_path: Path) -> None:
    hub.token = "hf_saved"
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text("hf_saved")  # where `hf auth login` saves it
    assert_checkpoint(hub, fetch(tmp_path / "weights"))


def test_offline_without_a_checkpoint(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, HF_HUB_OFFLINE="1")
    with pytest.raises(DownloadError, match=f"HF_HUB_OFFLINE is set.*unset it, or put a complete checkpoint.* in "
                                            f"{re.escape(str(tmp_path))}/weights"):
        fetch(tmp_path / "weights")
    assert not hub.requests


def test_not_found(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404 for .*nobody/missing.*[Cc]heck the repo id"):
        fetch(tmp_path / "weights", repo_id="nobody/missing")
    with pytest.raises(DownloadError, match=f"{REPO} has no revision 'no-such-branch'"):
        fetch(tmp_path / "weights", revision="no-such-branch")
    assert not any(tmp_path.glob("weights*"))


def test_hub_unreachable(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, HF_ENDPOINT="http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(DownloadError, match=r"ConnectError.*Check the network connection and HF_ENDPOINT "
                                            r"\(http://127.0.0.1:9\)"):
        fetch(tmp_path / "weights")


def test_corrupt_file_is_rejected_and_fetched_again(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt = {SHARD1}
    dest = tmp_path / "weights"
    with pytest.raises(DownloadError, match=f"{SHARD1}: sha256 mismatch"):
        fetch(dest)
    assert not dest.exists() and not (tmp_path / "weights.partial" / SHARD1).exists()
    hub.corrupt.clear()
    assert_checkpoint(hub, fetch(dest))
    assert len(hub.gets(SHARD1)) == 2 and len(hub.gets(SHARD2)) == 1


def test_directory_without_a_checkpoint_is_moved_aside(hub: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_checkpoint(hub, fetch(tmp_path / "empty"))  # an empty directory is simply replaced
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / SHARD1).write_bytes(hub.files[SHARD1][:1000])
    (dest / "my-notes.txt").write_text("keep me")
    assert_checkpoint(hub, fetch(dest))
    (aside,) = tmp_path.glob("weights.incomplete-*")  # moved aside, never deleted
    assert (aside / "my-notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["empty", aside.name, "weights"])
