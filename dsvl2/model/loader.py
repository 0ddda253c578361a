"""Strict checkpoint loader for the official DeepSeek-VL2 layout.

The model is built on the meta device (no random initialisation). Each shard is opened with safetensors' own
reader, which checks the header against the file (offsets contiguous, sizes matching shapes and dtypes, the data
ending exactly at the end of the file) and memory-maps it; every tensor is a view of the mapping, assigned in place
or copied into an allocated model one tensor at a time (no second full copy in host memory). Every parameter must
be filled and every checkpoint key used, except ``vision.attn_pool.*`` (the SigLIP pooling head that upstream
never runs). Any missing shard, truncated or corrupt file, unknown key, wrong shape or dtype is an error naming the
file and the key.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CheckpointError
from ..startup.prefetch import start_read_ahead
from .config import ModelConfig
from .deepseek_vl2 import DeepseekVL2
from .moe import EXPERT_KEYS, STACKS, expert_blocks, expert_matrix_shape

DROPPED_PREFIXES = ("vision.attn_pool.",)
_EXPERT_RE = re.compile(r"^(language\.model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")
_DTYPES = ("BF16", "F16", "F32")  # as safetensors names them; anything else in a shard is refused


def shard_files(ckpt: Path) -> dict[str, Path]:
    """Map each tensor name to the shard that holds it, from the index (or a single-file checkpoint)."""
    index = ckpt / "model.safetensors.index.json"
    if not index.exists():
        single = ckpt / "model.safetensors"
        if single.exists():
            with open_shard(single) as f:
                return dict.fromkeys(f.keys(), single)
        raise CheckpointError(f"{ckpt}: no model.safetensors.index.json and no model.safetensors")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
    missing = sorted({f for f in weight_map.values() if not (ckpt / f).exists()})
    if missing:
        raise CheckpointError(f"{ckpt}: shard file(s) missing: {', '.join(missing)} (the download is incomplete)")
    return {name: ckpt / f for name, f in weight_map.items()}


def open_shard(path: Path) -> safe_open:
    """safetensors' reader of one shard (tensors come as views of its memory map). The library checks the header
    against the file when it opens it; a file that fails is refused here with its name (the library's own message
    names neither the file nor, for a truncated one, the tensor)."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or corrupt ({path.stat().st_size} bytes): {e}; download it "
                              "again") from None


def iter_tensors(ckpt: Path, names: dict[str, Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Yield (name, shard, tensor) with each tensor a zero-copy view of its memory-mapped shard (safetensors maps
    the file as one torch storage; ``get_tensor`` copies nothing), in file order (shards by name, tensors by offset;
    a name missing from its shard is reported before any is read): the order in which ``read_ahead`` brings the
    bytes in, so each copy finds its bytes read or next in line."""
    by_file: dict[Path, set[str]] = {}
    for name, path in names.items():
        by_file.setdefault(path, set()).add(name)
    for path in sorted(by_file):
        with open_shard(path) as f:
            absent = sorted(by_file[path] - set(f.keys()))
            if absent:
                raise CheckpointError(f"{path}: the index lists tensor {absent[0]} but the shard does not contain it")
            for name in f.offset_keys():
                if name not in by_file[path]:
                    continue
                dtype = f.get_slice(name).get_dtype()
                if dtype not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype} (not one of "
                                          f"{', '.join(_DTYPES)})")
                yield name, path, f.get_tensor(name)


def load_model(ckpt: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
               log: Callable[[str], None] = lambda s: None) -> DeepseekVL2:
    """Build DeepSeek-VL2 from an official checkpoint directory, strictly."""
    ckpt = Path(ckpt)
    t0 = time.perf_counter()
    cfg = ModelConfig.from_file(ckpt / "config.json")
    with torch.device("meta"):
        model = DeepseekVL2(cfg)
    model.eval().requires_grad_(False)
    params = dict(model.named_parameters())
    stacked: dict[str, torch.Tensor] = {}

    def put(target: str, slot: tuple[int, int] | None, src: torch.Tensor) -> None:
        if slot is None:
            _assign(model, target, src.to(device=device, dtype=dtype))
            return
        if target not in stacked:
            stacked[target] = torch.empty(params[target].shape, device=device, dtype=dtype)
        _expert_rows(stacked[target], slot, src.shape[0]).copy_(src)

    n_bytes = _fill(params, ckpt, put)
    for target, tensor in stacked.items():
        _assign(model, target, tensor)
    for name, p in params.items():  # empty parameters (no shared experts) need not be in the file
        if p.numel() == 0:
            _assign(model, name, torch.empty(p.shape, device=device, dtype=dtype))
    model.finish_loading()
    log(f"loaded {n_bytes / 1e9:.2f} GB from {ckpt} to {device} as {dtype} in {time.perf_counter() - t0:.1f} s")
    return model


def allocate_model(cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> DeepseekVL2:
    """The model of ``cfg`` on ``device``, zero-filled and ready to run (every value finite), for ``load_into``:
    the service compiles and warms up on it while the weights stream in."""
    with torch.device("meta"):
        model = DeepseekVL2(cfg)
    model = model.to(dtype).to_empty(device=device).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.finish_loading()
    return model


def load_into(model: DeepseekVL2, ckpt: str | Path, log: Callable[[str], None] = lambda s: None,
              workers: int = 1, read_ahead: bool = True) -> None:
    """Copy a checkpoint into an allocated model's parameters in place, with ``load_model``'s checks. Safe
    to run in a thread while the model runs: the copies go through streams of their own (one per worker thread,
    ``workers`` shards at a time), synchronised at the end. With ``read_ahead`` the kernel is asked to read the
    shards ahead of the copies, one stream per worker."""
    ckpt = Path(ckpt)
    t0 = time.perf_counter()
    params = dict(model.named_parameters())  # after finish_loading: views into the side-by-side stacks too
    device = model.device

    def put(target: str, slot: tuple[int, int] | None, src: torch.Tensor) -> None:
        dst = params[target] if slot is None else _expert_rows(params[target], slot, src.shape[0])
        dst.copy_(src)

    @contextlib.contextmanager
    def own_stream() -> Iterator[None]:
        if device.type != "cuda":
            yield
            return
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()

    n_bytes = _fill(params, ckpt, put, workers, own_stream, read_ahead)
    log(f"loaded {n_bytes / 1e9:.2f} GB from {ckpt} into the model on {device} in {time.perf_counter() - t0:.1f} s")


def _fill(params: dict[str, nn.Parameter], ckpt: Path,
          put: Callable[[str, tuple[int, int] | None, torch.Tensor], None], workers: int = 1,
          context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
          read_ahead: bool = True) -> int:
    """Check every checkpoint tensor against the model and hand it to ``put(parameter name, (expert, row
    block) or None, tensor)``; every parameter must be filled. With ``workers`` > 1 that many threads each take
    a shard at a time (``put`` must then be safe to call from several threads), each inside ``context()``, with
    as many read-ahead streams. Returns the bytes read."""
    # What must be filled: every plain parameter, and every (expert, row block) of a stacked one.
    unfilled: set = set()
    for n, p in params.items():
        stack = n.rpartition(".")[2]
        if p.numel() == 0:  # nothing to read (a file may still hold the empty tensor)
            continue
        if stack in STACKS:
            unfilled |= {(n, e, o) for e in range(p.shape[0]) for o in range(expert_blocks(stack))}
        else:
            unfilled.add(n)
    files = shard_files(ckpt)
    if read_ahead:  # the same files as the start-up's early start: found started
        start_read_ahead(files.values(), streams=workers)
    names = {n: p for n, p in files.items() if not n.startswith(DROPPED_PREFIXES)}
    shards: dict[Path, dict[str, Path]] = {}
    for name, path in names.items():
        shards.setdefault(path, {})[name] = path
    lock = threading.Lock()

    def fill(shard: dict[str, Path], shard_context: Callable[[], contextlib.AbstractContextManager]) -> int:
        n_bytes = 0
        with shard_context():
            for name, path, src in iter_tensors(ckpt, shard):
                target, slot = _target(name, params, path)
                param = params[target]
                expected = param.shape if slot is None else expert_matrix_shape(target.rpartition(".")[2], param.shape)
                if src.shape != expected:
                    raise CheckpointError(
                        f"{path}: tensor {name} has shape {list(src.shape)}, the config expects {list(expected)}")
                n_bytes += src.numel() * src.element_size()
                put(target, slot, src)
                with lock:
                    unfilled.discard(target if slot is None else (target, *slot))
        return n_bytes

    ordered = [shards[path] for path in sorted(shards)]
    if workers <= 1:
        with context():  # one for the whole load
            n_bytes = sum(fill(shard, contextlib.nullcontext) for shard in ordered)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="dsvl2-load") as pool:
            n_bytes = sum(f.result() for f in [pool.submit(fill, shard, context) for shard in ordered])
    if unfilled:
        missing = sorted(_describe(u) for u in unfilled)
        raise CheckpointError(f"{ckpt}: {len(missing)} parameter(s) not in the checkpoint, e.g. {missing[:5]}")
    return n_bytes


def _expert_rows(stack: torch.Tensor, slot: tuple[int, int], rows: int) -> torch.Tensor:
    """The rows of one expert's checkpoint matrix inside a stacked parameter [E, blocks * rows, cols]."""
    expert, block = slot
    return stack[expert, block * rows:(block + 1) * rows]


def _describe(item: str | tuple[str, int, int]) -> str:
    """Name an unfilled parameter by its checkpoint key."""
    if isinstance(item, str):
        return item
    target, expert, block = item
    proj = next(k for k, (stack, off) in EXPERT_KEYS.items() if target.endswith(stack) and off == block)
    return f"{target.rpartition('.')[0]}.{expert}.{proj}.weight"


def _target(name: str, params: dict[str, nn.Parameter], path: Path) -> tuple[str, tuple[int, int] | None]:
    """Checkpoint key -> (parameter name, (expert, row block) for a stacked expert, else None)."""
    m = _EXPERT_RE.match(name)
    if m and m.group(3) in EXPERT_KEYS:
        stack, block = EXPERT_KEYS[m.group(3)]
        target, expert = f"{m.group(1)}.{stack}", int(m.group(2))
        if target in params and expert < params[target].shape[0]:
            return target, (expert, block)
    if name not in params:
        raise CheckpointError(f"{path}: unknown tensor {name}: not part of the model this config describes")
    return name, None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
