"""Time a service start in a fresh process as setup() does it: the weights load in a background thread while
warm-up compiles, then the decode graphs are captured on the loaded weights. Afterwards (not timed) every 25th
checkpoint tensor is compared with the model's parameter it was copied into.

    python benchmarks/setup_time.py CHECKPOINT_DIR [--sample-stacks] [--background load|none|disk|h2d]
                                   [--no-bundle] [--save-bundle DIR] [--early-read-ahead] [--load-workers N]
                                   [--skip MECHANISM,...]

``--sample-stacks`` also reports where each thread (the warm-up's compiler, the loader) spent the setup and how
much CPU it got (``stack_sampler.py``).

``--background`` replaces the weight load beside the warm-up, to find what in the load slows the compilation:
``none`` (the model stays zero-filled), ``disk`` (the shards are read from disk as the load reads them, nothing
goes to the GPU), ``h2d`` (host-to-GPU copies of the load's sizes from pageable memory, no disk) for as long as
the load takes. The weight check is skipped for these.

``--no-bundle`` ignores the shipped compile bundles (``dsvl2.startup.compile_bundle``): with an empty compile cache, the
first start of a GPU or software stack that has none. ``--save-bundle DIR`` writes this start's compiled code
into DIR as the bundle for this GPU and stack (after the timings; ``DIR=dsvl2/compiled`` to ship it).
``--early-read-ahead`` starts the shards' read-ahead before torch is imported rather than when the engine starts.
``--load-workers N`` copies N shards side by side, each with its own read-ahead (``EngineConfig.load_workers``);
``--skip`` leaves start-up mechanisms out (``EngineConfig.startup``). What a user waits for, through the real server,
is ``server_start.py``'s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

t_start = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsvl2.startup import prefetch  # noqa: E402 - as predict.py does: before torch is imported

prefetch.start()
if "--early-read-ahead" in sys.argv:  # the shards' read-ahead from the first moment, beside the imports
    prefetch.start_read_ahead(prefetch.checkpoint_files(sys.argv[1]))
import torch  # noqa: E402
from stack_sampler import StackSampler  # noqa: E402

import dsvl2.model.loader  # noqa: E402
from dsvl2.model.loader import DROPPED_PREFIXES, _expert_rows, _target, iter_tensors, shard_files  # noqa: E402
from dsvl2.serving.engine import Engine, EngineConfig  # noqa: E402
from dsvl2.serving.engine_config import STARTUP_MECHANISMS  # noqa: E402
from dsvl2.startup import sequence  # noqa: E402
from dsvl2.startup.prefetch import read_ahead  # noqa: E402

t_import = time.perf_counter() - t_start
phases: dict[str, float] = {}


def timed(name, fn):
    def run(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = round(time.perf_counter() - t, 2)
    return run


BACKGROUND = sys.argv[sys.argv.index("--background") + 1] if "--background" in sys.argv else "load"
LOAD_SECONDS = 35.0  # the load's duration on the lent H100s (BENCHMARKS.md)


def read_shards(model, ckpt, log):
    """The load's disk traffic alone: every shard read (with the load's read-ahead), nothing copied."""
    t0 = time.perf_counter()
    files = sorted(set(shard_files(Path(ckpt)).values()))
    read_ahead(files)
    buf, total = bytearray(64 << 20), 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    log(f"read {total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s (no copies)")


def copy_pageable(model, ckpt, log):
    """The load's host-to-GPU copies alone: pageable memory to the parameters in expert-matrix pieces."""
    t0 = time.perf_counter()
    src = torch.zeros(64 << 20, dtype=torch.bfloat16)  # 128 MB of pageable memory (zeros: the model stays finite)
    dst = [p.view(-1) for p in model.parameters() if p.numel() >= (1 << 20)]
    piece, total = 2048 * 1408, 0  # one expert matrix
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        while time.perf_counter() - t0 < LOAD_SECONDS:
            for d in dst:
                for start in range(0, d.numel() - piece + 1, piece):
                    d[start:start + piece].copy_(src[start % (src.numel() - piece):][:piece])
                    total += 2 * piece
                if time.perf_counter() - t0 >= LOAD_SECONDS:
                    break
    stream.synchronize()
    log(f"copied {total / 1e9:.2f} GB host to GPU in {time.perf_counter() - t0:.1f} s (no disk)")


loader = dsvl2.model.loader  # where the start-up (dsvl2.startup.sequence) looks these names up
if BACKGROUND != "load":
    loader.load_into = {"none": lambda model, ckpt, **kw: None, "disk": lambda model, ckpt, **kw: read_shards(
        model, ckpt, print), "h2d": lambda model, ckpt, **kw: copy_pageable(model, ckpt, print)}[BACKGROUND]
loader.allocate_model = timed("allocate_model_s", loader.allocate_model)
sequence.Processor.from_pretrained = timed("processor_s", sequence.Processor.from_pretrained)
Engine.load_compile_bundle = timed("bundle_s", Engine.load_compile_bundle)
sampler = StackSampler(interval=0.01, depth=6) if "--sample-stacks" in sys.argv else None
if sampler:
    sampler.start()
t0 = time.perf_counter()
torch.zeros(1, device="cuda")
t_cuda = time.perf_counter() - t0
workers = int(sys.argv[sys.argv.index("--load-workers") + 1]) if "--load-workers" in sys.argv else 1
skip = set(sys.argv[sys.argv.index("--skip") + 1].split(",")) if "--skip" in sys.argv else set()
config = EngineConfig(background_load=True, load_workers=workers, startup=frozenset(STARTUP_MECHANISMS) - skip)
engine = Engine.from_pretrained(sys.argv[1], config, log=lambda s: print(s, flush=True))
if "--no-bundle" in sys.argv:
    engine.bundle_dirs = []
torch.cuda.synchronize()
t_load = time.perf_counter() - t0
engine.warmup()
torch.cuda.synchronize()
if sampler:
    sampler.stop()
    print(json.dumps({"stacks": sampler.report(top=25)}))
print(json.dumps({"prefetch": prefetch.stats}))
timings = {"import_s": round(t_import, 1), "cuda_init_s": round(t_cuda, 1), "allocate_s": round(t_load - t_cuda, 1),
           "load_and_warmup_s": round(time.perf_counter() - t0 - t_load, 1),
           "setup_s": round(time.perf_counter() - t_start, 1), **phases}

if "--save-bundle" in sys.argv:
    from dsvl2.startup import compile_bundle  # noqa: E402

    compile_bundle.save(Path(sys.argv[sys.argv.index("--save-bundle") + 1]), "cuda", log=print)
    compile_bundle.save_triton(Path(sys.argv[sys.argv.index("--save-bundle") + 1]), "cuda", log=print)
if BACKGROUND != "load":
    print(json.dumps({**timings, "background": BACKGROUND}))
    sys.exit(0)
ckpt = Path(sys.argv[1])
params = dict(engine.model.named_parameters())
names = {n: p for n, p in shard_files(ckpt).items() if not n.startswith(DROPPED_PREFIXES)}
checked = mismatched = 0
for i, (name, path, src) in enumerate(iter_tensors(ckpt, names)):
    if i % 25:
        continue
    target, slot = _target(name, params, path)
    dst = params[target] if slot is None else _expert_rows(params[target], slot, src.shape[0])
    checked += 1
    mismatched += not torch.equal(dst.cpu(), src)
print(json.dumps({**timings, "tensors_checked": checked, "tensors_mismatched": mismatched}))
