"""Fetch the official checkpoint from the Hugging Face Hub: resumable, verified and atomic.

Files stream into a sibling staging directory ``<dest>.partial`` (kept between attempts, so an interrupted
download resumes with HTTP Range requests). Each file is checked against the size and hash the Hub lists; only
then is a marker written and the staging directory renamed to ``dest``: a directory without it is never used.
"""

import hashlib
import http.client
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsvl2.errors import CheckpointError

DEFAULT_REPO = "deepseek-ai/deepseek-vl2-small"
MARKER = ".complete.json"
_WANTED = (".json", ".safetensors")
_CHUNK = 1 << 20
_NETWORK_ERRORS = (OSError, http.client.HTTPException)
_AUTH_HINT = (" Not authorized: set HF_TOKEN to a token with access to the repo (and accept its terms),"
              " and check the repo id.")


class DownloadError(CheckpointError):
    """The checkpoint could not be fetched (network, authorization, missing repo or file)."""


class _Retry(Exception):
    """A transient failure (dropped connection, truncated body, 5xx): the step may be tried again."""


@dataclass(frozen=True)
class _File:
    name: str
    size: int
    sha256: str | None  # content hash of an LFS file
    blob_sha1: str | None  # git blob id of a non-LFS file

    def hasher(self) -> Any:  # for the expected digest; a git blob sha1 starts with a header
        return hashlib.sha256() if self.sha256 else hashlib.sha1(b"blob %d\0" % self.size)


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects; the Authorization header goes only to the same host, never to a CDN."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        same = urllib.parse.urlsplit(newurl).netloc == urllib.parse.urlsplit(req.full_url).netloc
        if new is not None and auth and same:
            new.add_unredirected_header("Authorization", auth)
        return new


_OPENER = urllib.request.build_opener(_Redirect)


def is_complete_checkpoint(dest: Path) -> bool:
    """True if ``dest`` has the marker written last and every file it lists, at the listed size."""
    dest = Path(dest)
    try:
        files = json.loads((dest / MARKER).read_text())["files"]
        return bool(files) and all((dest / n).stat().st_size == int(f["size"]) for n, f in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _open(url: str, token: str | None, start: int = 0) -> http.client.HTTPResponse:
    """GET ``url`` (from byte ``start``); map HTTP errors to DownloadError or _Retry."""
    req = urllib.request.Request(url, headers={"User-Agent": "dsvl2-download/1"})
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    if start:
        req.add_header("Range", f"bytes={start}-")
    try:
        return _OPENER.open(req, timeout=60)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code >= 500 or e.code in (408, 416, 429):
            raise _Retry(f"HTTP {e.code}") from None
        hint = {401: _AUTH_HINT, 403: _AUTH_HINT, 404: " Not found: check the repo id and revision."}.get(e.code, "")
        raise DownloadError(f"HTTP {e.code} for {url}.{hint}") from None
    except _NETWORK_ERRORS as e:
        raise _Retry(f"{type(e).__name__}: {e}") from None


def _with_retries(fn: Callable[[], Any], what: str, retries: int, backoff_s: float, log: Callable) -> Any:
    """Call ``fn``; on _Retry wait (exponential backoff) and call it again, up to ``retries`` times."""
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except _Retry as e:
            if attempt >= retries:
                raise DownloadError(f"{what}: giving up after {retries} attempts: {e}") from None
            log(f"download: {what}: {e}; retry {attempt}/{retries - 1} in {backoff_s * 2 ** (attempt - 1):.1f}s")
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise ValueError("retries must be >= 1")


def _list_files(endpoint: str, repo_id: str, revision: str, token: str | None) -> tuple[str, list[_File]]:
    """The commit sha of ``revision`` and the checkpoint files (*.json, *.safetensors) it holds."""
    rev = urllib.parse.quote(revision, safe="")
    with _open(f"{endpoint}/api/models/{repo_id}/revision/{rev}?blobs=true", token) as resp:
        try:
            info = json.loads(resp.read())
        except _NETWORK_ERRORS as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
    files = []
    for s in [s for s in info.get("siblings") or [] if s["rfilename"].endswith(_WANTED)]:
        name, lfs = s["rfilename"], s.get("lfs") or None
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise DownloadError(f"unsafe file name in repo listing: {name!r}")
        size = int(lfs["size"] if lfs else s["size"])
        files.append(_File(name, size, lfs["sha256"] if lfs else None, None if lfs else s.get("blobId")))
    if not any(f.name.endswith(".safetensors") for f in files):
        raise DownloadError(f"{repo_id}@{revision} lists no *.safetensors files; check the repo id")
    return info["sha"], files


class _Progress:
    """Thread-safe count of the bytes fetched; logs the overall rate every ``every_s`` seconds."""

    def __init__(self, total: int, log: Callable, every_s: float = 10.0) -> None:
        self.total, self.log, self.every_s, self.fetched, self.lock = total, log, every_s, 0, threading.Lock()
        self.t0 = self.last = time.monotonic()

    def add(self, n: int) -> None:
        with self.lock:
            self.fetched, now = self.fetched + n, time.monotonic()
            if now - self.last >= self.every_s:
                self.last = now
                self.log(f"download: {self.fetched / 1e9:.2f} GB fetched (checkpoint: {self.total / 1e9:.2f} GB), "
                         f"{self.fetched / 1e6 / (now - self.t0):.0f} MB/s")


def _fetch(f: _File, url: str, staging: Path, token: str | None, progress: _Progress, log: Callable) -> None:
    """Download one file into ``staging`` (resuming its partial), verify it, then rename it in place."""
    final, part = staging / f.name, staging / (f.name + ".incomplete")
    if final.is_file() and final.stat().st_size == f.size:  # verified by an earlier attempt
        return
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    have = 0 if have > f.size else have  # (a bigger partial is rewritten from the start)
    resumed, hasher, t0 = have, f.hasher(), time.monotonic()
    if have:  # re-hash the prefix kept from an earlier attempt
        with open(part, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                hasher.update(chunk)
    if have < f.size:
        with _open(url, token, start=have) as resp:
            if have and (resp.status != 206 or not resp.getheader("Content-Range", "").startswith(f"bytes {have}-")):
                have, hasher = 0, f.hasher()  # the server ignored the Range request: start over
            with open(part, "ab" if have else "wb") as out:
                while have < f.size:
                    try:
                        chunk = resp.read(min(_CHUNK, f.size - have))
                    except _NETWORK_ERRORS as e:
                        raise _Retry(f"{type(e).__name__}: {e} after {have} of {f.size} bytes") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    hasher.update(chunk)
                    have += len(chunk)
                    progress.add(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        if have < f.size:
            raise _Retry(f"connection closed after {have} of {f.size} bytes")
    want, kind = (f.sha256, "sha256") if f.sha256 else (f.blob_sha1, "git blob sha1")
    if want and hasher.hexdigest() != want:
        part.unlink()
        if resumed:  # the kept prefix may be stale: one more try from scratch
            raise _Retry(f"{kind} mismatch after resuming; restarting from scratch")
        raise CheckpointError(f"{f.name}: {kind} mismatch (got {hasher.hexdigest()}, expected {want}); "
                              "the download was discarded")
    os.replace(part, final)
    dt = max(time.monotonic() - t0, 1e-6)
    log(f"download: {f.name} done ({f.size / 1e6:.1f} MB, {(f.size - resumed) / 1e6 / dt:.0f} MB/s)")


def _move_aside(dest: Path, log: Callable) -> None:
    """Clear the way for ``dest``: remove it if an empty dir, else rename it (nothing is deleted)."""
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        dest.rmdir()
    elif os.path.lexists(dest):
        aside = dest.with_name(f"{dest.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(dest, aside)
        log(f"download: {dest} held no complete checkpoint; moved it to {aside} (delete it if unneeded)")


def ensure_checkpoint(dest: Path, repo_id: str = DEFAULT_REPO, revision: str = "main",
                      endpoint: str | None = None, token: str | None = None, log: Callable = print,
                      *, workers: int = 8, retries: int = 5, backoff_s: float = 1.0) -> Path:
    """Return ``dest``, downloading ``repo_id`` at ``revision`` into it unless already complete."""
    dest = Path(dest)
    if is_complete_checkpoint(dest):
        return dest
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = token or os.environ.get("HF_TOKEN") or None
    t0 = time.monotonic()
    commit, files = _with_retries(lambda: _list_files(endpoint, repo_id, revision, token),
                                  f"listing {repo_id}", retries, backoff_s, log)
    staging = dest.with_name(dest.name + ".partial")
    stamp = staging / ".commit"  # staged files are valid only for the commit they came from
    if staging.exists() and (not stamp.is_file() or stamp.read_text() != commit):
        log(f"download: discarding {staging} (from another commit)")
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    stamp.write_text(commit)
    total = sum(f.size for f in files)
    log(f"download: {repo_id}@{commit[:12]}: {len(files)} files, {total / 1e9:.2f} GB into {staging}")
    progress = _Progress(total, log)

    def fetch(f: _File) -> None:
        url = f"{endpoint}/{repo_id}/resolve/{commit}/{urllib.parse.quote(f.name)}"
        _with_retries(lambda: _fetch(f, url, staging, token, progress, log), f.name, retries, backoff_s, log)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(fetch, f) for f in sorted(files, key=lambda f: -f.size)]
        wait(futures, return_when=FIRST_EXCEPTION)
        pool.shutdown(cancel_futures=True)  # on error: running files finish (and stay staged), others don't start
    if errors := [fut.exception() for fut in futures if not fut.cancelled() and fut.exception()]:
        raise errors[0]  # type: ignore[misc]
    index = staging / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    if missing := sorted(s for s in shards if not (staging / s).is_file()):
        raise CheckpointError(f"model.safetensors.index.json names shards the repo lacks: {missing}")
    marker = {"repo_id": repo_id, "revision": revision, "commit": commit,
              "files": {f.name: {"size": f.size, "sha256": f.sha256} for f in files}}
    (staging / (MARKER + ".tmp")).write_text(json.dumps(marker, indent=1))  # a torn marker reads as incomplete
    os.replace(staging / (MARKER + ".tmp"), staging / MARKER)
    stamp.unlink()
    _move_aside(dest, log)
    os.replace(staging, dest)
    dt = max(time.monotonic() - t0, 1e-6)
    log(f"download: checkpoint ready in {dest} ({progress.fetched / 1e9:.2f} GB fetched in {dt:.1f}s, "
        f"{progress.fetched / 1e6 / dt:.0f} MB/s)")
    return dest
