"""One prediction of the Cog service around the engine, for predict.py's ``Runner``: its inputs checked and made
into an engine request, then its text streamed, its metrics recorded and its log line written.

The inputs are declared once, as ``Input()`` defaults on ``Runner.run``; the schema the server validates against is
generated from those declarations (scripts/make_schema.py). Over HTTP, coglet has checked every value against
that schema before ``run`` is called; a direct Python call of ``run`` is checked here, against the same
declarations (``check_inputs``). The engine then checks what it is given for itself (``Engine.prepare``).
"""

from __future__ import annotations

import inspect
import math
import os
import secrets
import threading
import typing
from collections.abc import Callable, Iterator

from cog import Path
from cog.input import FieldInfo

from dsvl2.errors import InputError
from dsvl2.inputs.images import load_image
from dsvl2.serving.engine import Engine, GenerationStats, Request
from dsvl2.serving.sampling import SamplingParams
from dsvl2.settings import LOCAL_FILES_ENV

IMAGE_FIELDS = ("image", "image2", "image3", "image4")  # in the order their <image> tags refer to them


def log(message: str) -> None:
    """Setup and prediction logs go to stdout, which coglet captures into the response's logs."""
    print(message, flush=True)


def check_inputs(method: Callable, values: dict, local_files: bool, schema_checked: bool) -> dict:
    """``values`` checked against ``method``'s annotations and Input() declarations; raises InputError.

    A direct Python call gets the Input() objects themselves as defaults: those become their values. With
    ``schema_checked`` (over HTTP) the ranges and types are the schema's business and only what it cannot say is
    done here: a whole-number float made an integer, a path on this machine refused unless ``local_files``.
    """
    checked = {}
    for name, param in inspect.signature(method).parameters.items():
        if name == "self":
            continue
        info = param.default if isinstance(param.default, FieldInfo) else FieldInfo()
        value = values[name]
        if isinstance(value, FieldInfo):
            value = value.default
        checked[name] = check_value(name, param.annotation, info, value, local_files, schema_checked)
    return checked


def check_value(name: str, annotation: object, info: FieldInfo, value: object, local_files: bool,
                schema_checked: bool = False) -> object:
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
    if schema_checked:  # JSON Schema's "integer" admits 16.0, and coglet passes it on as a float
        return kind(value)
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
        value = int(value)  # as coglet's whole-number floats, above
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


def build_request(engine: Engine, args: dict, log: Callable[[str], None] = log) -> Request:
    """The engine's request for checked inputs: images decoded, a seed drawn (and logged) for a sampled answer
    without one, the prompt tokenized (``Engine.prepare``)."""
    # Named by field in errors: a downloaded file's path is the server's business.
    images = [load_image(args[name], name) for name in IMAGE_FIELDS if args[name] is not None]
    seed = args["seed"]
    if seed is None and args["temperature"] > 0:
        seed = secrets.randbelow(2**32)
        log(f"seed: {seed}")
    params = SamplingParams(
        temperature=args["temperature"],
        top_p=args["top_p"],
        top_k=min(args["top_k"], 2**63 - 1),  # any top_k past the vocabulary keeps every token; int64 fits
        repetition_penalty=args["repetition_penalty"],
        seed=seed,
    )
    return engine.prepare(args["prompt"], images, params, args["max_length_tokens"])


def stream(engine: Engine, request: Request, scope, prepare_s: float,
           log: Callable[[str], None] = log) -> Iterator[str]:
    """The request's text as the engine streams it; however this ends (done, cancelled, client gone, error), the
    engine stops, the prediction's metrics are recorded in ``scope`` and its log line is written."""
    cancel = threading.Event()
    try:
        yield from engine.stream(request, cancel=cancel)
    finally:
        cancel.set()
        record_metrics(scope, request.stats)
        log(summary(request.stats, prepare_s))


def record_metrics(scope, stats: GenerationStats) -> None:
    """Output size and speed as prediction metrics (names as Replicate's language models use)."""
    scope.record_metric("output_token_count", stats.output_tokens)
    if stats.time_to_first_token_s > 0:
        scope.record_metric("time_to_first_token", stats.time_to_first_token_s)
    if stats.tokens_per_second > 0:  # needs two tokens
        scope.record_metric("tokens_per_second", stats.tokens_per_second)


def summary(s: GenerationStats, prepare_s: float) -> str:
    """A prediction's log line: where its time went."""
    return (f"prediction: {s.prompt_tokens} prompt tokens (inputs {1e3 * prepare_s:.0f} ms, waited "
            f"{1e3 * s.queued_s:.0f} ms to start, prefill {1e3 * s.prefill_s:.0f} ms), {s.output_tokens} tokens "
            f"at {s.tokens_per_second:.1f}/s (first text with token {s.first_text_tokens}, longest pause "
            f"{1e3 * s.max_gap_s:.0f} ms), {s.finish_reason or 'stopped'}")
