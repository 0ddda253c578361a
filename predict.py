"""Cog adapter: DeepSeek-VL2-small behind the Cog HTTP server (coglet), streaming text.

`setup()` finds (or downloads) the checkpoint, loads it and warms the engine up; `run()` checks
the inputs, decodes the images and streams the answer. Everything model-related is in `dsvl2`.

Environment:
  DSVL2_WEIGHTS  checkpoint directory (default: `weights/` beside this file). Without a
                 `config.json` there, setup downloads the official checkpoint into it.
  DSVL2_DEVICE   `cuda` (default; bfloat16) or `cpu` (float32; for tests and demos only).
  DSVL2_COMPILE_CACHE  where compiled kernels are cached (default `~/.cache/dsvl2`).
  DSVL2_PDL      `0` launches the decode kernels without programmatic dependent launch (default on for
                 Hopper and later; same results, ≈ 7 % slower decode on an H100).
  DSVL2_MAX_BATCH  how many predictions decode together (default: as many full-context caches as fit in the
                 GPU memory left after the weights, at most 64; 1 on the CPU). Predictions beyond it wait.
  DSVL2_STREAM_INTERVAL_MS  after its first text, a prediction's text is sent at most once per this many
                 milliseconds (default 30), whatever came meanwhile in one chunk.
  DSVL2_BATCH_INVARIANT  `1` (default): a prediction's tokens are the same whatever else is in its batch (seeds
                 hold under load). `0`: above 8 predictions at once the decode step uses library kernels instead,
                 faster at large batches but no longer batch invariant (BENCHMARKS.md has both).
  COG_MAX_CONCURRENCY  coglet's prediction slots (read by coglet when the server starts; cog.yaml's
                 `concurrency.max` in a built image): predictions beyond it get HTTP 409.
  DSVL2_ALLOW_LOCAL_FILES  `1` lets HTTP clients name image files on the server's disk by path, for trusted
                 local use only. Unset (or `0`), image inputs over HTTP must be http(s) URLs or data URIs (coglet
                 downloads them); a path is refused with one message whatever is or is not there. Direct Python
                 calls of `Runner.run` and the command line (`python -m dsvl2`) always read local paths.

Concurrency: `run` is async and returns a plain generator, which coglet streams from a thread of its own per
prediction; every prediction's generator reads its text from the engine's scheduler, which decodes all of them
together on the GPU (continuous batching, dsvl2.scheduler).
"""

# ruff: noqa: E402 - the prefetch starts before anything heavy is imported
import os

# First of all, before torch is imported: the software's own files read into the page cache in the background
# (on a fresh machine the start otherwise waits on thousands of small reads one after another; dsvl2.prefetch).
from dsvl2 import prefetch

if os.environ.get("DSVL2_DEVICE", "cuda").strip().lower() == "cuda":  # as setup() reads it
    prefetch.start()

import asyncio
import inspect
import math
import secrets
import threading
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path as LocalPath

import coglet
import torch
from cog import BaseRunner, ConcatenateIterator, Input, Path, streaming
from cog.input import FieldInfo

from dsvl2.download import ensure_checkpoint
from dsvl2.engine import Engine, GenerationStats, Request
from dsvl2.errors import CheckpointError, InputError
from dsvl2.images import load_image
from dsvl2.sampling import SamplingParams

WEIGHTS_ENV = "DSVL2_WEIGHTS"
DEVICE_ENV = "DSVL2_DEVICE"
CACHE_ENV = "DSVL2_COMPILE_CACHE"
BATCH_ENV = "DSVL2_MAX_BATCH"
INTERVAL_ENV = "DSVL2_STREAM_INTERVAL_MS"
LOCAL_FILES_ENV = "DSVL2_ALLOW_LOCAL_FILES"
MAX_PROMPT_CHARS = 100_000  # far beyond the 4096-token context; refused before it is tokenized
DEFAULT_WEIGHTS = LocalPath(__file__).resolve().parent / "weights"
REPO_ID = "deepseek-ai/deepseek-vl2-small"
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}
EXTRA_IMAGES = ("image2", "image3", "image4")


def log(message: str) -> None:
    """Setup and prediction logs go to stdout, which coglet captures into the response's logs."""
    print(message, flush=True)


@contextmanager
def timed(phase: str) -> Iterator[None]:
    start = time.perf_counter()
    log(f"setup: {phase} ...")
    yield
    log(f"setup: {phase} done in {time.perf_counter() - start:.1f}s")


def resolve_device() -> tuple[str, torch.dtype]:
    """The device from DSVL2_DEVICE; a missing GPU is an error, never a silent CPU fallback."""
    device = os.environ.get(DEVICE_ENV, "cuda").strip().lower()
    if device not in DTYPES:
        raise RuntimeError(f"{DEVICE_ENV}={device!r} is not supported: use 'cuda' (default) or 'cpu'")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "no CUDA GPU is visible to PyTorch. Run the image on an NVIDIA GPU machine "
            f"(`docker run --gpus all ...`), or set {DEVICE_ENV}=cpu for a slow float32 run on the "
            "CPU (meant for tests and the demo)."
        )
    return device, DTYPES[device]


def resolve_checkpoint() -> LocalPath:
    """The checkpoint directory; the official checkpoint is downloaded there if it holds none."""
    configured = os.environ.get(WEIGHTS_ENV)
    directory = LocalPath(configured).expanduser() if configured else DEFAULT_WEIGHTS
    source = f"{WEIGHTS_ENV}={configured}" if configured else "the default weights directory"
    if (directory / "config.json").is_file():
        log(f"setup: checkpoint {directory} ({source})")
        return directory
    log(f"setup: no checkpoint in {directory} ({source}); downloading {REPO_ID}")
    return ensure_checkpoint(directory, repo_id=REPO_ID, log=log)


class Runner(BaseRunner):
    def setup(self) -> None:
        """Load DeepSeek-VL2-small (bfloat16 on the GPU) and run one short generation."""
        started = time.perf_counter()
        # Compiled kernels are cached here, so a restart skips most of the compilation (mount it as a
        # volume with `docker run -v` to keep it across containers).
        cache = LocalPath(os.environ.get(CACHE_ENV, "~/.cache/dsvl2")).expanduser()
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
        device, dtype = resolve_device()
        log(f"setup: device {device}, dtype {str(dtype).removeprefix('torch.')}")
        self.local_files = local_files_allowed(served=coglet.server.active)
        with timed("checkpoint"):
            checkpoint = resolve_checkpoint()
        try:
            with timed("load"):
                # On the GPU the weights stream in while warm-up compiles (the load is disk-bound,
                # compilation CPU-bound); the warm-up's final step waits for the load to finish.
                self.engine = Engine.from_pretrained(checkpoint, device=device, dtype=dtype, log=log,
                                                     background_load=device == "cuda", slots=batch_slots(),
                                                     stream_interval=stream_interval(),
                                                     batch_invariant=batch_invariant())
            with timed("warm-up"):
                self.engine.warmup()
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}\nThe checkpoint in {checkpoint} cannot be loaded. Point {WEIGHTS_ENV} at a "
                f"complete DeepSeek-VL2-small checkpoint, or empty that directory so that setup "
                f"downloads {REPO_ID} into it."
            ) from e
        log(f"setup: ready in {time.perf_counter() - started:.1f}s")
        log(concurrency_summary(self.engine.slots))

    @streaming
    async def run(
        self,
        image: Path = Input(description="Input image", accept="image/*"),
        prompt: str = Input(
            description="Text prompt. Refer to the images with <image> tags, in order (image, image2, "
            "...); without tags, the images come before the text.",
            max_length=MAX_PROMPT_CHARS,
        ),
        top_p: float = Input(
            description="Nucleus sampling: sample from the most probable tokens whose probabilities "
            "add up to top_p",
            default=0.9,
            ge=0.0,
            le=1.0,
        ),
        temperature: float = Input(
            description="Sampling temperature; 0 means greedy decoding", default=0.1, ge=0.0, le=1.0
        ),
        max_length_tokens: int = Input(
            description="Maximum number of new tokens to generate (prompt and answer together fit "
            "in 4096 tokens)",
            default=2048,
            ge=1,
            le=4096,
        ),
        repetition_penalty: float = Input(
            description="Penalty for tokens already in the text (1 = none); not used when "
            "temperature is 0",
            default=1.1,
            ge=0.01,
            le=2.0,
        ),
        seed: int | None = Input(
            description="Random seed for reproducible sampling; leave empty for a random one",
            default=None,
            ge=0,
            le=2**32 - 1,
        ),
        top_k: int = Input(
            description="Sample from the top_k most probable tokens only; 0 means no limit",
            default=50,
            ge=0,
        ),
        image2: Path | None = Input(description="Optional second image", default=None, accept="image/*"),
        image3: Path | None = Input(description="Optional third image", default=None, accept="image/*"),
        image4: Path | None = Input(description="Optional fourth image", default=None, accept="image/*"),
    ) -> ConcatenateIterator[str]:
        """Answer a prompt about one or more images, streaming the text as it is generated."""
        args = checked_inputs(Runner.run, locals(), self.local_files)  # first: locals() holds just the inputs
        scope = self.scope  # this prediction's: the generator runs on another thread, outside its context
        started = time.perf_counter()
        request = await asyncio.to_thread(self.prepare, args)  # images and tokens, off the event loop
        scope.record_metric("input_token_count", request.stats.prompt_tokens)
        return self.generate(request, scope, time.perf_counter() - started)

    def prepare(self, args: dict) -> Request:
        # Named by field in errors: a downloaded file's path is the server's business.
        images = [load_image(args[name], name) for name in ("image", *EXTRA_IMAGES) if args[name] is not None]
        if args["seed"] is None and args["temperature"] > 0:
            args["seed"] = secrets.randbelow(2**32)
            log(f"seed: {args['seed']}")
        params = SamplingParams(
            temperature=args["temperature"],
            top_p=args["top_p"],
            top_k=min(args["top_k"], 2**63 - 1),  # any top_k past the vocabulary keeps every token; int64 fits
            repetition_penalty=args["repetition_penalty"],
            seed=args["seed"],
        )
        return self.engine.prepare(args["prompt"], images, params, args["max_length_tokens"])

    def generate(self, request: Request, scope, prepare_s: float) -> Iterator[str]:
        cancel = threading.Event()
        try:
            yield from self.engine.stream(request, cancel=cancel)
        finally:
            cancel.set()  # however this ends (done, cancelled, client gone, error), the engine stops
            record_stats(scope, request.stats)
            s = request.stats
            log(f"prediction: {s.prompt_tokens} prompt tokens (inputs {1e3 * prepare_s:.0f} ms, waited "
                f"{1e3 * s.queued_s:.0f} ms to start, prefill {1e3 * s.prefill_s:.0f} ms), {s.output_tokens} tokens "
                f"at {s.tokens_per_second:.1f}/s (first text with token {s.first_text_tokens}, longest pause "
                f"{1e3 * s.max_gap_s:.0f} ms), "
                f"{s.finish_reason or 'stopped'}")


def record_stats(scope, stats: GenerationStats) -> None:
    """Output size and speed as prediction metrics (names as Replicate's language models use)."""
    scope.record_metric("output_token_count", stats.output_tokens)
    if stats.time_to_first_token_s > 0:
        scope.record_metric("time_to_first_token", stats.time_to_first_token_s)
    if stats.tokens_per_second > 0:  # needs two tokens
        scope.record_metric("tokens_per_second", stats.tokens_per_second)


def batch_slots() -> int | None:
    raw = os.environ.get(BATCH_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise RuntimeError(f"{BATCH_ENV}={raw!r} is not supported: use an integer from 1 to 64, or leave it unset")
    return int(raw)


def batch_invariant() -> bool:
    raw = os.environ.get("DSVL2_BATCH_INVARIANT", "1").strip()
    if raw not in ("0", "1"):
        raise RuntimeError(f"DSVL2_BATCH_INVARIANT={raw!r} is not supported: use 1 (default) or 0")
    return raw == "1"


def stream_interval() -> float:
    raw = os.environ.get(INTERVAL_ENV, "").strip() or "30"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10_000:
        raise RuntimeError(f"{INTERVAL_ENV}={raw!r} is not supported: use milliseconds from 0 to 10000")
    return value / 1000


def concurrency_summary(engine_slots: int) -> str:
    """What a client meets at capacity, for the setup log."""
    raw = os.environ.get("COG_MAX_CONCURRENCY", "").strip()
    slots = f"coglet accepts {raw} predictions at once (COG_MAX_CONCURRENCY)" if raw else \
        "coglet's prediction slots come from cog.yaml's concurrency.max (COG_MAX_CONCURRENCY overrides it)"
    return (f"setup: {engine_slots} predictions decode together ({BATCH_ENV}); {slots}; predictions beyond the "
            "engine's batch wait in its queue, those beyond coglet's slots get HTTP 409")


def local_files_allowed(served: bool) -> bool:
    """Whether a file input may be a path on this machine: always for Python callers, over HTTP only by opt-in."""
    raw = os.environ.get(LOCAL_FILES_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise RuntimeError(f"{LOCAL_FILES_ENV}={raw!r} is not supported: use 1 to allow local paths, or 0 / unset")
    if served and raw == "1":
        log(f"setup: {LOCAL_FILES_ENV}=1: HTTP clients may read any image file on this machine by its path")
    return not served or raw == "1"


def checked_inputs(method: Callable, values: dict, local_files: bool) -> dict:
    """Validate `values` against `method`'s annotations and Input() ranges; raise InputError.

    The HTTP server checks the same ranges against the OpenAPI schema, but a direct Python call
    checks nothing and gets the Input() objects themselves as defaults: those become their values.
    """
    checked = {}
    for name, param in inspect.signature(method).parameters.items():
        if name == "self":
            continue
        info = param.default if isinstance(param.default, FieldInfo) else FieldInfo()
        value = values[name]
        if isinstance(value, FieldInfo):
            value = value.default
        checked[name] = check_value(name, param.annotation, info, value, local_files)
    return checked


def check_value(name: str, annotation: object, info: FieldInfo, value: object, local_files: bool) -> object:
    """One input checked against its annotation (T or T | None) and its Input() range.

    File inputs: coglet hands run() a URL or data URI as a `cog.Path` to the file it downloaded, and any
    other string unchanged, as a `str` (tests/test_server.py checks both). A `str` is therefore a path on
    this machine, read only where `local_files` allows it; the refusal says nothing about what is there.
    """
    members = typing.get_args(annotation)
    optional = type(None) in members
    kind = next(m for m in members if m is not type(None)) if optional else annotation
    if value is None:
        if optional:
            return None
        raise InputError(f"{name} is required")
    if kind is Path:
        if isinstance(value, os.PathLike):
            return value
        if not isinstance(value, str):
            raise InputError(f"{name} must be a file path, got {type(value).__name__}")
        if not local_files:
            raise InputError(f"{name} must be an http://, https:// or data: URI; paths of files on the server are "
                             f"not accepted (a trusted local server allows them with {LOCAL_FILES_ENV}=1)")
        return Path(value)
    if kind is str:
        if not isinstance(value, str):
            raise InputError(f"{name} must be a string, got {type(value).__name__}")
        if info.max_length is not None and len(value) > info.max_length:
            raise InputError(f"{name} is {len(value)} characters, over the limit of {info.max_length}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON cannot carry these (coglet answers 400); a Python caller can
            raise InputError(f"{name} is not valid Unicode: a lone surrogate at character {e.start}") from None
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema's "integer" admits 16.0, and coglet passes it on as a float
    numeric = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise InputError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if info.le is None and info.ge is not None and value < info.ge:
        raise InputError(f"{name} must be at least {info.ge}, got {value!r}")
    if (info.ge is not None and value < info.ge) or (info.le is not None and value > info.le):
        raise InputError(f"{name} must be between {info.ge} and {info.le}, got {value!r}")
    return kind(value)
