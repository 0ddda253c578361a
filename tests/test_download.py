"""dsvl2.download against a fake Hugging Face Hub served on 127.0.0.1 from a thread."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dsvl2 import download
from dsvl2.download import DownloadError, ensure_checkpoint, is_complete_checkpoint
from dsvl2.errors import CheckpointError

REPO = "fake-org/fake-vl2-small"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARD1 = "model-00001-of-000002.safetensors"
SHARD2 = "model-00002-of-000002.safetensors"
WANTED = [SHARD1, SHARD2, "model.safetensors.index.json", "config.json", "tokenizer.json"]
UNWANTED = ["README.md", ".gitattributes", "modeling_deepseek.py", "images/logo.png"]


class FakeHub:
    """A tiny Hub: the revision API, /resolve/ (LFS files redirect to a 'CDN' path) and faults."""

    def __init__(self) -> None:
        rng = random.Random(0)
        index = {"metadata": {}, "weight_map": {"a.weight": SHARD1, "b.weight": SHARD2, "c.bias": SHARD2}}
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
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.token: str | None = None
        self.drop_first: set[str] = set()  # first GET of these sends half the body, then hangs up
        self.drop_always: set[str] = set()
        self.corrupt: set[str] = set()  # served with one byte flipped (right size, wrong hash)
        self.ignore_range = False
        self.api_failures = 0  # answer the listing with 503 this many times first
        self.lock = threading.Lock()

    def listing(self) -> dict:
        siblings = []
        for name, data in self.files.items():
            if name.endswith(".safetensors"):
                lfs = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                siblings.append({"rfilename": name, "size": len(data), "blobId": "f" * 40, "lfs": lfs})
            else:
                blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                siblings.append({"rfilename": name, "size": len(data), "blobId": blob})
        return {"id": REPO, "sha": COMMIT, "siblings": siblings}

    def resolve_requests(self, name: str) -> list[dict[str, str]]:
        """Headers of the /resolve/ requests for ``name`` (not of the redirected CDN requests)."""
        return [h for p, h in self.requests if p.endswith("/" + name) and "/resolve/" in p]


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        with hub.lock:
            hub.requests.append((self.path, dict(self.headers)))
        if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self.send_error(401)
        api, resolve = f"/api/models/{REPO}/revision/", f"/{REPO}/resolve/{COMMIT}/"
        if self.path.startswith(api):
            rev, _, query = self.path[len(api):].partition("?")
            if rev not in ("main", COMMIT) or query != "blobs=true":
                return self.send_error(404)
            if hub.api_failures:
                hub.api_failures -= 1
                return self.send_error(503)
            return self._send(json.dumps(hub.listing()).encode())
        if self.path.startswith(resolve) and self.path[len(resolve):] in hub.files:
            name = self.path[len(resolve):]
            if name.endswith(".safetensors"):  # LFS: redirect, like the Hub does to its CDN
                self.send_response(302)
                self.send_header("Location", f"/cdn/{name}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._serve(hub, name)
        if self.path.startswith("/cdn/") and self.path[5:] in hub.files:
            return self._serve(hub, self.path[5:])
        return self.send_error(404)

    def _serve(self, hub: FakeHub, name: str) -> None:
        data = hub.files[name]
        if name in hub.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        start, rng = 0, self.headers.get("Range")
        if rng and not hub.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        with hub.lock:
            drop = name in hub.drop_always or name in hub.drop_first
            hub.drop_first.discard(name)
        self._send(data[start:], 206 if start else 200, headers, drop)

    def _send(self, body: bytes, status: int = 200, headers: dict | None = None, drop: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if drop else body)
        self.close_connection = True


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    for var in ("HF_TOKEN", "HF_ENDPOINT", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.hub = fake  # type: ignore[attr-defined]
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def fetch(hub: FakeHub, dest: Path, logs: list[str] | None = None, **kw) -> Path:
    kw = {"endpoint": hub.url, "retries": 3, "backoff_s": 0.01, **kw}  # type: ignore[attr-defined]
    return ensure_checkpoint(dest, kw.pop("repo_id", REPO), log=(logs if logs is not None else []).append, **kw)


def assert_checkpoint(hub: FakeHub, dest: Path) -> None:
    assert is_complete_checkpoint(dest)
    for name in WANTED:
        assert (dest / name).read_bytes() == hub.files[name], name
    assert sorted(p.name for p in dest.iterdir()) == sorted([*WANTED, ".complete.json"])
    assert not dest.with_name(dest.name + ".partial").exists()


def test_fresh_download(hub: FakeHub, tmp_path: Path) -> None:
    logs: list[str] = []
    dest = tmp_path / "weights"
    assert fetch(hub, dest, logs) == dest
    assert_checkpoint(hub, dest)
    marker = json.loads((dest / ".complete.json").read_text())
    assert marker["commit"] == COMMIT and marker["repo_id"] == REPO
    assert marker["files"][SHARD1] == {"size": 300_000, "sha256": hashlib.sha256(hub.files[SHARD1]).hexdigest()}
    assert set(marker["files"]) == set(WANTED)
    for name in UNWANTED:  # never even requested
        assert not hub.resolve_requests(name)
    assert any("checkpoint ready" in line for line in logs)
    assert not any("Authorization" in h for _, h in hub.requests)


def test_second_call_makes_no_requests(hub: FakeHub, tmp_path: Path) -> None:
    dest = fetch(hub, tmp_path / "weights")
    seen = len(hub.requests)
    assert fetch(hub, dest) == dest
    assert len(hub.requests) == seen


def test_dropped_connection_resumes_with_range(hub: FakeHub, tmp_path: Path) -> None:
    hub.drop_first = {SHARD1, "config.json"}
    logs: list[str] = []
    dest = fetch(hub, tmp_path / "weights", logs)
    assert_checkpoint(hub, dest)
    ranges = [h.get("Range") for h in hub.resolve_requests(SHARD1) if h.get("Range")]
    assert ranges and int(ranges[0].removeprefix("bytes=").rstrip("-")) > 0
    assert any("retry" in line for line in logs)


def test_resume_across_calls(hub: FakeHub, tmp_path: Path) -> None:
    hub.drop_always = {SHARD1}
    dest = tmp_path / "weights"
    with pytest.raises(DownloadError, match=f"{SHARD1}: giving up after 2 attempts"):
        fetch(hub, dest, retries=2)
    assert not dest.exists() and not is_complete_checkpoint(dest)
    partial = tmp_path / "weights.partial" / (SHARD1 + ".incomplete")
    assert 0 < partial.stat().st_size < 300_000
    have = partial.stat().st_size
    hub.drop_always.clear()
    n_shard2 = len(hub.resolve_requests(SHARD2))
    fetch(hub, dest)
    assert_checkpoint(hub, dest)
    assert hub.resolve_requests(SHARD1)[-1].get("Range") == f"bytes={have}-"
    assert len(hub.resolve_requests(SHARD2)) == n_shard2  # finished files are kept, not fetched again


@pytest.mark.parametrize(("name", "kind"), [(SHARD1, "sha256"), ("config.json", "git blob sha1")])
def test_corrupt_content_is_rejected(hub: FakeHub, tmp_path: Path, name: str, kind: str) -> None:
    hub.corrupt = {name}
    dest = tmp_path / "weights"
    with pytest.raises(CheckpointError, match=f"{name}: {kind} mismatch"):
        fetch(hub, dest)
    assert not dest.exists() and not is_complete_checkpoint(dest)
    staging = tmp_path / "weights.partial"
    assert not (staging / name).exists() and not (staging / (name + ".incomplete")).exists()
    hub.corrupt.clear()  # a later attempt with good content completes
    assert_checkpoint(hub, fetch(hub, dest))


def test_stale_partial_is_restarted(hub: FakeHub, tmp_path: Path) -> None:
    staging = tmp_path / "weights.partial"
    staging.mkdir()
    (staging / ".commit").write_text(COMMIT)
    (staging / (SHARD1 + ".incomplete")).write_bytes(b"\0" * 1000)  # wrong prefix from a bad attempt
    dest = fetch(hub, tmp_path / "weights")
    assert_checkpoint(hub, dest)
    assert [h.get("Range") for h in hub.resolve_requests(SHARD1)] == ["bytes=1000-", None]


def test_staging_from_another_commit_is_discarded(hub: FakeHub, tmp_path: Path) -> None:
    staging = tmp_path / "weights.partial"
    staging.mkdir()
    (staging / ".commit").write_text("f" * 40)
    (staging / SHARD2).write_bytes(b"x" * 123_457)  # right size, but from another commit
    assert_checkpoint(hub, fetch(hub, tmp_path / "weights"))


def test_404_names_the_repo(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404.*[Cc]heck the repo id"):
        fetch(hub, tmp_path / "weights", repo_id="nobody/missing")
    with pytest.raises(DownloadError, match="404"):
        fetch(hub, tmp_path / "weights", revision="no-such-branch")
    assert not (tmp_path / "weights").exists()


def test_401_asks_for_a_token(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.token = "hf_secret"
    with pytest.raises(DownloadError, match="401.*HF_TOKEN"):
        fetch(hub, tmp_path / "weights")
    hub.requests.clear()
    assert_checkpoint(hub, fetch(hub, tmp_path / "weights", token="hf_secret"))
    assert all(h.get("Authorization") == "Bearer hf_secret" for _, h in hub.requests)  # redirects too
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert_checkpoint(hub, fetch(hub, tmp_path / "other"))


def test_5xx_is_retried(hub: FakeHub, tmp_path: Path) -> None:
    hub.api_failures = 2
    assert_checkpoint(hub, fetch(hub, tmp_path / "weights"))
    hub.api_failures = 5
    with pytest.raises(DownloadError, match="giving up after 3 attempts: HTTP 503"):
        fetch(hub, tmp_path / "again")


def test_incomplete_dest_is_not_taken(hub: FakeHub, tmp_path: Path) -> None:
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / "config.json").write_bytes(hub.files["config.json"])
    (dest / SHARD1).write_bytes(hub.files[SHARD1][:1000])
    (dest / "my-notes.txt").write_text("keep me")
    assert not is_complete_checkpoint(dest)
    assert_checkpoint(hub, fetch(hub, dest))
    (aside,) = tmp_path.glob("weights.incomplete-*")  # moved aside, never deleted
    assert (aside / "my-notes.txt").read_text() == "keep me"


def test_marker_with_truncated_file_is_incomplete(hub: FakeHub, tmp_path: Path) -> None:
    dest = fetch(hub, tmp_path / "weights")
    with open(dest / SHARD2, "r+b") as fh:
        fh.truncate(100)
    assert not is_complete_checkpoint(dest)
    (dest / SHARD2).unlink()
    assert not is_complete_checkpoint(dest)
    assert not is_complete_checkpoint(tmp_path / "nothing-here")


def test_empty_dest_dir_is_replaced(hub: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    assert_checkpoint(hub, fetch(hub, tmp_path / "weights"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_server_ignoring_range(hub: FakeHub, tmp_path: Path) -> None:
    hub.ignore_range = True
    hub.drop_first = {SHARD1}
    assert_checkpoint(hub, fetch(hub, tmp_path / "weights"))
    assert [bool(h.get("Range")) for h in hub.resolve_requests(SHARD1)] == [False, True]


def test_index_naming_a_missing_shard(hub: FakeHub, tmp_path: Path) -> None:
    index = json.loads(hub.files["model.safetensors.index.json"])
    index["weight_map"]["d.weight"] = "model-00003-of-000002.safetensors"
    hub.files["model.safetensors.index.json"] = json.dumps(index).encode()
    with pytest.raises(CheckpointError, match="model-00003-of-000002.safetensors"):
        fetch(hub, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()


def test_authorization_is_not_sent_to_another_host() -> None:
    req = urllib.request.Request("https://huggingface.co/org/repo/resolve/abc/model.safetensors")
    req.add_unredirected_header("Authorization", "Bearer hf_secret")
    handler = download._Redirect()
    cdn = handler.redirect_request(req, None, 302, "Found", {}, "https://cdn-lfs.hf.co/abc?sig=1")
    same = handler.redirect_request(req, None, 307, "Temporary Redirect", {}, "https://huggingface.co/api/x")
    assert cdn is not None and not cdn.has_header("Authorization")
    assert same is not None and same.get_header("Authorization") == "Bearer hf_secret"
