"""The engine's start-up, as one sequence of steps; the only place that starts start-up threads or changes
process-wide state for the start-up.

``StartUp(config, log).engine(checkpoint_dir)`` runs, in this order, each step logged with its time:

0. (the entry point, before torch is imported: ``prefetch.start()``, mechanism ``prefetch``)
1. the shards' read-ahead started in a thread (``read_ahead``);
2. the processor and config read, the tokenizer checked against the vocabulary (before any weight is read);
3. the model allocated on its device (zero-filled), the engine built around it;
4. the weights copied in a background thread (``EngineConfig.background_load``; with ``switch_interval`` the
   interpreter switches threads every 0.5 ms meanwhile, put back when the load ends), or loaded here;
5. the compiler stack imported on this thread, beside the load (its modules import each other in cycles: it must
   be imported before any other thread could import it);
6. with ``config.warmup``: the compile bundle and our Triton kernels' archive unpacked into the compile caches
   (``bundle``), the decoder layers and vision blocks compiled, two warm-up requests run (Inductor's autotuning
   kept short: ``quick_autotune``), the CUDA graphs captured, the load waited for, one request run.

Every step after 3 that the engine does itself is one of its ``EngineStartup`` methods; the order is here.
``EngineConfig.startup`` names the optional mechanisms in use (all by default; DSVL2_STARTUP_SKIP leaves some out,
for the A/B measurements in BENCHMARKS.md). Its threads: the software prefetch (it reads files; nothing waits for it),
the shards' read-ahead (advice to the kernel; nothing waits for it) and the background load, which generation waits
for (``Engine.wait_loaded``). Removed after an A/B of first starts on the H200 (BENCHMARKS.md, session 9): our
Triton kernels compiled ahead by a thread pool beside the warm-up (3-6 s faster, but Triton's compiler is not safe
to run from several threads: one start of the seven with it failed with a launcher of the wrong signature), and
Inductor's compile workers started early (no gain measured together with it; with the bundle nothing compiles).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..inputs.processor import Processor
from ..model import loader
from ..model.config import ModelConfig
from . import compile_bundle, prefetch
from .compilation import cache_report, import_compiler, quick_autotune

if TYPE_CHECKING:
    from ..serving.engine import Engine
    from ..serving.engine_config import EngineConfig

LOAD_SWITCH_INTERVAL = 5e-4  # seconds; see ``StartUp._load_in_background``


@contextmanager
def phase(log: Callable[[str], None], name: str) -> Iterator[None]:
    """One phase of setup, logged as it starts and with its time when it is done."""
    start = time.perf_counter()
    log(f"setup: {name} ...")
    yield
    log(f"setup: {name} done in {time.perf_counter() - start:.1f}s")


class Task:
    """A start-up thread; ``join`` raises what it raised."""

    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self.error: BaseException | None = None

        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - raised in the thread that joins
                self.error = e

        self.thread = threading.Thread(target=run, name=f"dsvl2-{name}", daemon=True)
        self.thread.start()

    def join(self) -> None:
        """Wait for the thread to end; its error raised if it failed."""
        self.thread.join()
        if self.error is not None:
            raise self.error


class StartUp:
    def __init__(self, config: EngineConfig, log: Callable[[str], None] = print) -> None:
        self.config, self.log = config, log
        self.on_cuda = torch.device(config.device).type == "cuda"

    def uses(self, mechanism: str) -> bool:
        return mechanism in self.config.startup

    def engine(self, checkpoint_dir: str | Path, engine_class: type[Engine]) -> Engine:
        """Steps 1-6 (see the module's docstring) -> the engine, loaded (or loading) and, with
        ``config.warmup``, warmed up."""
        with phase(self.log, "load"):
            engine = self.load(Path(checkpoint_dir), engine_class)
        if self.config.warmup:
            with phase(self.log, "warm-up"):
                self.warm_up(engine)
        return engine

    def load(self, checkpoint_dir: Path, engine_class: type[Engine]) -> Engine:
        config = self.config
        if self.on_cuda and self.uses("prefetch"):
            prefetch.start()  # a no-op where the entry point started it before importing torch
        background = config.background_load
        read_ahead = background and self.uses("read_ahead")
        if read_ahead:  # the disk busy from now on, while the model is allocated
            prefetch.start_read_ahead(loader.shard_files(checkpoint_dir).values(), streams=config.load_workers)
        processor = Processor.from_pretrained(checkpoint_dir)
        cfg = ModelConfig.from_file(checkpoint_dir / "config.json")
        processor.check_vocabulary(cfg.language.vocab_size)
        if not background:
            model = loader.load_model(checkpoint_dir, config.device, config.dtype, log=self.log)
            engine = engine_class(model, processor, config, self.log)
        else:
            engine = engine_class(loader.allocate_model(cfg, config.device, config.dtype), processor, config, self.log)
            engine.pending_load = self._load_in_background(engine, checkpoint_dir, read_ahead)
            import_compiler()  # step 5, beside the load
        engine.bundle_dirs.insert(0, checkpoint_dir)  # a compile bundle beside the weights comes first
        return engine

    def _load_in_background(self, engine: Engine, checkpoint_dir: Path, read_ahead: bool) -> Task:
        # The loader needs the interpreter lock briefly between copies, while compilation holds it for long
        # stretches: a shorter switch interval keeps the load disk-bound (5 ms waits, thousands of times).
        interval = sys.getswitchinterval()
        if self.uses("switch_interval"):
            sys.setswitchinterval(min(interval, LOAD_SWITCH_INTERVAL))

        def load() -> None:
            try:
                loader.load_into(engine.model, checkpoint_dir, log=self.log, workers=self.config.load_workers,
                                 read_ahead=read_ahead)
            finally:
                sys.setswitchinterval(interval)

        return Task("load", load)  # waited for by the engine (``Engine.wait_loaded``)

    def warm_up(self, engine: Engine) -> None:
        """Step 6: compile, warm up, capture, wait for the load, run one request through the graphs (a graph
        records the weights' addresses, not their values, so all but the last run on weights still loading)."""
        t0 = time.perf_counter()
        triton_before = compile_bundle.triton_entries() if self.on_cuda else set()
        if engine.use_compile:
            import_compiler()  # a no-op where the load did it
            import torch._dynamo
            if self.uses("bundle"):
                engine.load_compile_bundle()
            # Process-wide, and kept: the compiled decode, prefill and vision regions recompile for a few shapes each
            # (the batch buckets); Dynamo's default of 8 recompilations per function must not turn them eager.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            engine.compile()
        with quick_autotune() if self.uses("quick_autotune") else contextlib.nullcontext():
            engine.or_eager(engine.warm_requests)
            self.log(f"compiled and warmed up in {time.perf_counter() - t0:.1f} s")
            engine.or_eager(engine.capture)
        t1 = time.perf_counter()
        engine.wait_loaded()
        self.log(f"waited {time.perf_counter() - t1:.1f} s for the weights")
        engine.final_request(t0)
        if engine.use_compile:  # what a first start with the bundle still compiles (against a restart)
            self.log(f"compile caches during the warm-up: {cache_report()}")
        if self.on_cuda:  # what the shipped archive should have held: a first start compiles each of these
            compiled = compile_bundle.compiled_since(triton_before)
            self.log(f"Triton compiled {len(compiled)} kernels during the warm-up: {', '.join(compiled[:40])}")
