"""Fetch the official checkpoint from the Hugging Face Hub with huggingface_hub (and hf_xet, where installed).

The library does the transfer, so HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME mean here what they mean to
every other tool that uses it. It fetches from Xet storage when hf_xet is installed, resumes a dropped connection
with a Range request, and copies a file already in the HF_HOME cache instead of fetching it again. Only what the
model needs is fetched: the *.json files (config, tokenizer, processor, shard index) and the *.safetensors shards.

What a server's setup needs on top of that is here:
- the checkpoint directory holds a complete checkpoint or nothing: files go into the sibling ``<dest>.partial``
  (kept between attempts, so that finished files are not fetched again; a file cut off by a killed process starts
  over), are checked against the Hub's sha256 and git hashes, and only then is that directory renamed to ``dest``;
- the free disk space is checked before a download starts (the checkpoint is 32 GB);
- errors name the file (its URL) or repo and say what to do.
"""

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    FileMetadataError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from dsvl2.errors import CheckpointError

DEFAULT_REPO = "deepseek-ai/deepseek-vl2-small"
FILES = ["*.json", "*.safetensors"]
# What the library raises when the Hub cannot be reached or refuses (some wrapped: the cause says why).
_HUB_ERRORS = (HfHubHTTPError, httpx.HTTPError, ConnectionError, FileMetadataError, LocalEntryNotFoundError)


class DownloadError(CheckpointError):
    """The checkpoint could not be fetched (network, authorisation, missing repo, revision or file, disk space)."""


def ensure_checkpoint(dest: Path, repo_id: str = DEFAULT_REPO, revision: str = "main",
                      log: Callable[[str], None] = print) -> Path:
    """Return ``dest``, downloading ``repo_id`` at ``revision`` into it unless it has a ``config.json``."""
    dest = Path(dest)
    if (dest / "config.json").is_file():
        return dest
    staging = dest.with_name(dest.name + ".partial")
    api, t0 = HfApi(), time.monotonic()
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        wanted = {name: sizes[name] for name in filter_repo_objects(sizes, allow_patterns=FILES)}
        if not any(name.endswith(".safetensors") for name in wanted):
            raise DownloadError(f"{repo_id}@{revision} has no *.safetensors files; check the repo id")
        for stale in staging.rglob("*.incomplete"):  # left by a killed attempt: the library starts those afresh
            stale.unlink()
        needed = sum(size for name, size in wanted.items() if not (staging / name).is_file())
        dest.parent.mkdir(parents=True, exist_ok=True)
        if needed > (free := shutil.disk_usage(dest.parent).free):
            raise DownloadError(f"not enough disk space for {repo_id}: {needed / 1e9:.2f} GB to download into "
                                f"{staging}, but only {free / 1e9:.2f} GB free there; free some space or choose a "
                                "checkpoint directory on another disk")
        log(f"download: {repo_id}@{info.sha}: {len(wanted)} files, {sum(wanted.values()) / 1e9:.2f} GB "
            f"({needed / 1e9:.2f} GB to fetch) into {staging}")
        snapshot_download(repo_id, revision=info.sha, local_dir=staging, allow_patterns=FILES)
        log(f"download: fetched in {time.monotonic() - t0:.0f}s; checking the files' hashes")
        check = api.verify_repo_checksums(repo_id, revision=info.sha, local_dir=staging)
    except _HUB_ERRORS as e:
        raise DownloadError(_advice(e, repo_id, revision, dest, staging)) from e
    if check.mismatches:
        for bad in check.mismatches:
            (staging / bad["path"]).unlink()  # so that the next attempt fetches it again
        raise DownloadError("; ".join(f"{m['path']}: {m['algorithm']} mismatch (got {m['actual']}, the Hub lists "
                                      f"{m['expected']})" for m in check.mismatches)
                            + f"; deleted from {staging}: run again to fetch it anew")
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # the library's download state, not the checkpoint's
    _move_aside(dest, log)
    os.replace(staging, dest)
    log(f"download: checkpoint ready in {dest} ({time.monotonic() - t0:.0f}s)")
    return dest


def _advice(e: BaseException, repo_id: str, revision: str, dest: Path, staging: Path) -> str:
    """What failed (a URL names the file) and what to do about it."""
    err: BaseException | None = e
    while err is not None and not isinstance(err, (OfflineModeIsEnabled, httpx.HTTPError)):
        err = err.__cause__  # e.g. a LocalEntryNotFoundError raised from the failed request
    err = err or e
    if isinstance(err, OfflineModeIsEnabled):
        return (f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded: unset it, or put a complete checkpoint "
                f"(with its config.json) in {dest}")
    status = err.response.status_code if isinstance(err, HfHubHTTPError) else None
    try:
        url = str((err.response if isinstance(err, HfHubHTTPError) else err).request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # (httpx raises RuntimeError for an error without its request)
        url = repo_id
    kept = f"files already downloaded stay in {staging} for the next attempt"
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} (HTTP {status} for {url})"
    if isinstance(err, RepositoryNotFoundError) or status in (401, 403):  # the Hub says 401 for a missing repo too
        return (f"HTTP {status} for {url}: not authorised, or no such repo. Check the repo id, and set HF_TOKEN to "
                f"a Hugging Face token that can read {repo_id} (for a gated model, accept its terms on the Hub first)")
    if status == 404:
        return f"HTTP 404 for {url}: not found; check the repo id and revision"
    if status is not None:
        return f"HTTP {status} for {url}; try again later ({kept})"
    return (f"{url}: {type(err).__name__}: {err}. Check the network connection and HF_ENDPOINT "
            f"({constants.ENDPOINT}), then try again ({kept})")


def _move_aside(dest: Path, log: Callable[[str], None]) -> None:
    """Clear the way for ``dest``: remove it if an empty directory, else rename it (nothing is deleted)."""
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        dest.rmdir()
    elif os.path.lexists(dest):
        aside = dest.with_name(f"{dest.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(dest, aside)
        log(f"download: {dest} held no complete checkpoint; moved it to {aside} (delete it if unneeded)")
