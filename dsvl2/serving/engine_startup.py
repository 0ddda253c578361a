"""How an ``Engine`` comes up: the checkpoint loaded (with ``EngineConfig.background_load``, streamed into the GPU in a
thread while the warm-up runs), the model compiled (regional ``torch.compile``, a compile bundle loaded first, the
Triton kernels compiled ahead side by side), warm-up requests run and the CUDA graphs captured. ``EngineStartup`` is
the ``Engine``'s start-up half (a base class): its methods use the engine's model, runner and config.
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
from PIL import Image

from .. import kernels
from ..inputs.processor import TILE, Processor
from ..model import loader
from ..model.config import ModelConfig
from ..model.loader import allocate_model, load_into, load_model, shard_files
from ..model.moe import MoE
from ..startup import compile_bundle, prefetch
from ..startup.compilation import import_compiler, quick_autotune, start_compile_workers
from .engine_config import EngineConfig
from .runner import PREFILL_BUCKET
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .engine import Engine

PRECOMPILE_TIMEOUT_S = 300  # the warm-up waits at most this long for the Triton kernels compiled ahead


@contextmanager
def phase(log: Callable[[str], None], name: str) -> Iterator[None]:
    """One phase of setup, logged as it starts and with its time when it is done."""
    start = time.perf_counter()
    log(f"setup: {name} ...")
    yield
    log(f"setup: {name} done in {time.perf_counter() - start:.1f}s")


class EngineStartup:
    """Load, compile and warm up (see the module's docstring); ``Engine`` is one."""

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, config: EngineConfig | None = None,
                        log: Callable[[str], None] = print) -> Engine:
        """Load a checkpoint (default config: on the GPU). With ``config.background_load`` the weights stream into
        a zero-filled model in a thread, so that ``warmup`` compiles while the disk is busy; generation waits for
        the load. With ``config.warmup`` the engine is warmed up before it is returned."""
        config = config or EngineConfig()
        with phase(log, "load"):
            engine = cls._load(Path(checkpoint_dir), config, log)
        if config.warmup:
            with phase(log, "warm-up"):
                engine.warmup()
        return engine

    @classmethod
    def _load(cls, checkpoint_dir: Path, config: EngineConfig, log: Callable[[str], None]) -> Engine:
        device, dtype, background_load = config.device, config.dtype, config.background_load
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda:
            prefetch.start()  # a no-op where the entry point started it before importing torch
        if background_load:
            # The disk starts reading the shards now, while the model is allocated (the load then finds them
            # read or in flight, in the order it copies them).
            prefetch.start_read_ahead(shard_files(checkpoint_dir).values(), streams=loader.LOAD_WORKERS)
        processor = Processor.from_pretrained(checkpoint_dir)
        cfg = ModelConfig.from_file(checkpoint_dir / "config.json")
        processor.check_vocabulary(cfg.language.vocab_size)  # before any weight is read
        if background_load:
            engine = cls(allocate_model(cfg, device, dtype), processor, config, log)
            engine._start_loading(checkpoint_dir)
            # The compiler stack imported here, beside the load and before any thread that uses it starts: its
            # modules import each other in cycles, and two threads importing them at once can fail ("partially
            # initialized module"), as seen on an H200 with the workers, the kernel precompile and the warm-up.
            import_compiler()
            if on_cuda:  # in the background: Inductor's compile worker processes started
                threading.Thread(target=start_compile_workers, name="dsvl2-compile-workers", daemon=True).start()
        else:
            engine = cls(load_model(checkpoint_dir, device, dtype, log=log), processor, config, log)
        engine.bundle_dirs.insert(0, checkpoint_dir)  # a compile bundle beside the weights comes first
        return engine

    def _start_loading(self, checkpoint_dir: str | Path) -> None:
        # The loader needs the interpreter lock briefly between copies, while compilation holds it for long
        # stretches: a shorter switch interval keeps the load disk-bound (5 ms waits, thousands of times, add
        # up to seconds).
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 5e-4))

        def load() -> None:
            try:
                load_into(self.model, checkpoint_dir, log=self.log)
            except BaseException as e:  # noqa: BLE001 - handed to the thread that waits
                self._load_error = e
            finally:
                sys.setswitchinterval(interval)

        self._loader = threading.Thread(target=load, name="dsvl2-load", daemon=True)
        self._loader.start()

    def wait_loaded(self) -> None:
        """Block until a background load has finished; raise its error if it failed."""
        if self._loader is not None:
            self._loader.join()
            self._loader = None
        if self._load_error is not None:
            raise self._load_error

    def _drop_compiled(self, names: tuple[str, ...]) -> bool:
        """Remove the compiled wrappers of these methods (back to the plain ones); True if any existed.
        Graphs already captured stay valid: they replay kernels, not Python."""
        dropped = False
        for module in [*self.model.language.model.layers, *self.model.vision.blocks]:
            for name in names:
                dropped |= module.__dict__.pop(name, None) is not None
        return dropped

    def compile(self) -> None:
        """Compile each decoder layer's decode step (regional compilation: one layer's code serves all
        layers, and Inductor's on-disk cache makes a restart reuse it). Fuses the many small
        element-wise kernels of norms, rotary embedding and attention; the graph is captured after."""
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for layer in self.model.language.model.layers:
            # Static shapes for one row; the second batch size seen (warm-up captures them all) compiles one graph
            # with a symbolic batch that serves every larger bucket.
            layer.decode = torch.compile(layer.decode, dynamic=None)
            # The prefill too, for any prompt length: one graph with a symbolic length.
            layer.forward = torch.compile(layer.forward, dynamic=True)
        for block in self.model.vision.blocks:
            block.forward = torch.compile(block.forward, dynamic=True)

    def capture(self) -> None:
        """Capture the decode step of every sampler mode and batch bucket, then the vision tower for each
        single-image tile count (other counts, several images, are captured on first use)."""
        if not self.runner.use_graphs:
            return
        t0 = time.perf_counter()
        self.runner.capture_decode()
        t1 = time.perf_counter()
        counts = sorted({1 + (w // TILE) * (h // TILE) for w, h in self.processor.config.candidate_resolutions})
        with torch.inference_mode():
            for n in counts:
                self.runner.encode_tiles(torch.zeros(n, 3, TILE, TILE, dtype=self.model.dtype, device=self.device))
        self.log(f"captured the decode step for batches of {self.runner.buckets} in {t1 - t0:.1f} s, the vision "
                 f"tower for {len(counts)} tile counts in {time.perf_counter() - t1:.1f} s")

    def warmup(self) -> None:
        """Compile (regional), run two warm-up requests (they build the compiled code) and capture the decode
        and vision graphs; during a background load all of this runs on the weights as they stream in (a
        graph records the weights' addresses, not their values). Then wait for the load and run one short
        request through the graphs."""
        t0 = time.perf_counter()
        kernels_thread = None
        if self.use_compile:
            import_compiler()  # before the precompile thread starts (a no-op where from_pretrained did it)
        if self.use_compile and self.device.type == "cuda" and kernels.launch.triton is not None:
            kernels_thread = threading.Thread(target=self._precompile_kernels, name="dsvl2-precompile", daemon=True)
            kernels_thread.start()
        if self.use_compile:
            self._load_compile_bundle()
            self.compile()
        with quick_autotune():
            self._or_eager(self._warm_requests)
            self.log(f"compiled and warmed up in {time.perf_counter() - t0:.1f} s")
            if kernels_thread is not None:  # done long before (seconds); its work must not overlap a graph capture
                kernels_thread.join(PRECOMPILE_TIMEOUT_S)
                if kernels_thread.is_alive():
                    self.log(f"the Triton kernels were still compiling after {PRECOMPILE_TIMEOUT_S} s; going on")
            self._or_eager(self.capture)
        t1 = time.perf_counter()
        self.wait_loaded()
        self.log(f"waited {time.perf_counter() - t1:.1f} s for the weights")
        req = self.prepare("Hello", [], SamplingParams(temperature=0.1, seed=0), 8)
        text = "".join(self.stream(req))
        self.log(f"warm-up: {req.stats.output_tokens} tokens ({text[:40]!r}; first after "
                 f"{req.stats.time_to_first_token_s:.2f} s) in {time.perf_counter() - t0:.1f} s")

    def _load_compile_bundle(self) -> None:
        """Before anything compiles: this GPU's and software's compile bundle, if one is in ``bundle_dirs``, into
        the compile caches, so that the warm-up compiles as fast as a restart."""
        key = compile_bundle.stack_key(self.device)
        path = compile_bundle.find(key, self.bundle_dirs)
        if path is None:
            where = ", ".join(map(str, self.bundle_dirs)) or "no directory"
            self.log(f"no compile bundle {compile_bundle.bundle_name(key)} in {where}: compiling from scratch "
                     "(the compile cache makes a restart faster)")
            return
        compile_bundle.load(path, self.log)

    def _precompile_kernels(self) -> None:
        """Compile the Triton kernels of a decode step and of the prefill's experts side by side, while the main
        thread traces and compiles the model (``kernels.launch.precompile``). Runs one MoE decoder layer's plain
        (uncompiled) code on dummy inputs with the launches collected, not run. An optimisation only: whatever
        fails here compiles at its first launch instead."""
        t0 = time.perf_counter()
        lm = self.model.language
        layers = lm.model.layers
        i = next((i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoE)), 0)
        layer = layers[i]
        d = lm.cfg.hidden_size

        def run() -> None:
            with torch.inference_mode():
                pos = self.runner.pos[:1]
                x = torch.zeros(1, 1, d, dtype=self.model.dtype, device=self.device)
                cache = torch.zeros_like(self.runner.cache[i, :1])  # the real layout; the runner's state untouched
                type(layer).decode(layer, x, lm.rope[pos][:, None], cache, pos)  # the class's: not compiled
                layer.mlp(torch.zeros(1, PREFILL_BUCKET, d, dtype=self.model.dtype, device=self.device))

        try:
            with contextlib.ExitStack() as on_device:
                if self.device.type == "cuda":  # Triton compiles for the current device; a stream of its own
                    on_device.enter_context(torch.cuda.device(self.device))
                    on_device.enter_context(torch.cuda.stream(torch.cuda.Stream(self.device)))
                n = kernels.launch.precompile(run, self.device)
        except Exception as e:  # noqa: BLE001
            self.log(f"compiling the Triton kernels ahead failed ({type(e).__name__}: {e}); they compile at first use")
            return
        self.log(f"compiled {n} Triton kernels in {time.perf_counter() - t0:.1f} s (beside the model's compilation)")

    def _warm_requests(self) -> None:
        # Two requests of different shapes, so that the compiled prefill settles on shape-generic code here
        # rather than recompiling on the first real request. No graphs yet: the steps run the compiled layers.
        self._warming = True
        self.runner.replay_prefill = False  # the compiled code is built by plain calls, captured later
        try:
            for size in ((640, 480), (1000, 333)):
                t0 = time.perf_counter()
                image = Image.new("RGB", size, (200, 120, 40))
                req = self.prepare("<image>\nDescribe this image.", [image], SamplingParams(temperature=0.1, seed=0), 4)
                for _ in self.stream(req):
                    pass
                self.log(f"warm-up request with a {size[0]}x{size[1]} image: {time.perf_counter() - t0:.1f} s")
        finally:
            self._warming = False
            self.runner.replay_prefill = True

    def _or_eager(self, step: Callable[[], None]) -> None:
        """Run a warm-up step; if it fails with compiled code, drop the compiled code (and any graphs captured
        from it) and run the step again eagerly: a compiler failure must not take the service down."""
        try:
            step()
        except Exception as e:  # noqa: BLE001
            if not self.use_compile:
                raise
            self.log(f"compiling the model failed ({type(e).__name__}: {e}); using the eager step and prefill "
                     "(correct, slower)")
            self._drop_compiled(("decode", "forward"))
            self.runner.drop_graphs()
            step()
