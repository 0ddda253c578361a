"""The engine's start-up steps: compile the model (regional ``torch.compile``, a compile bundle loaded first), run
warm-up requests, capture the CUDA graphs, wait for a background load. Their order, the load and every thread are
``dsvl2.startup.sequence``'s. ``EngineStartup`` is the ``Engine``'s start-up half (a base class): its methods use
the engine's model, runner and config.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..inputs.processor import TILE
from ..startup import compile_bundle
from ..startup.sequence import StartUp, Task
from .engine_config import EngineConfig
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .engine import Engine


class EngineStartup:
    """The engine's start-up steps (see the module's docstring); ``Engine`` is one. Their order, and every thread
    and process-wide change of the start-up, are ``dsvl2.startup.sequence``'s."""

    pending_load: Task | None = None  # a background load still filling the weights

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, config: EngineConfig | None = None,
                        log: Callable[[str], None] = print) -> Engine:
        """Load a checkpoint (default config: on the GPU). With ``config.background_load`` the weights stream into
        a zero-filled model in a thread, so that ``warmup`` compiles while the disk is busy; generation waits for
        the load. With ``config.warmup`` the engine is warmed up before it is returned."""
        return StartUp(config or EngineConfig(), log).engine(checkpoint_dir, cls)

    def warmup(self) -> None:
        """Compile, run warm-up requests, capture the graphs, wait for the load (``StartUp.warm_up``)."""
        StartUp(self.config, self.log).warm_up(self)

    def wait_loaded(self) -> None:
        """Block until a background load has finished; raise its error if it failed."""
        if self.pending_load is not None:
            self.pending_load.join()
            self.pending_load = None

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

    def final_request(self, started: float) -> None:
        """The last step of a warm-up: one short request through the graphs, on the loaded weights."""
        req = self.prepare("Hello", [], SamplingParams(temperature=0.1, seed=0), 8)
        text = "".join(self.stream(req))
        self.log(f"warm-up: {req.stats.output_tokens} tokens ({text[:40]!r}; first after "
                 f"{req.stats.time_to_first_token_s:.2f} s) in {time.perf_counter() - started:.1f} s")

    def load_compile_bundle(self) -> None:
        """Before anything compiles: this GPU's and software's compile bundle, if one is in ``bundle_dirs``, into
        the compile caches, so that the warm-up compiles as fast as a restart; our Triton kernels' archive too."""
        key = compile_bundle.stack_key(self.device)
        kernels_archive = compile_bundle.find(key, self.bundle_dirs, compile_bundle.triton_name(key))
        if kernels_archive is not None:
            compile_bundle.load_triton(kernels_archive, self.log)
        path = compile_bundle.find(key, self.bundle_dirs)
        if path is None:
            where = ", ".join(map(str, self.bundle_dirs)) or "no directory"
            self.log(f"no compile bundle {compile_bundle.bundle_name(key)} in {where}: compiling from scratch "
                     "(the compile cache makes a restart faster)")
            return
        compile_bundle.load(path, self.log)

    def warm_requests(self) -> None:
        # Two requests of different shapes, so that the compiled prefill settles on shape-generic code here
        # rather than recompiling on the first real request. No graphs yet: the steps run the compiled layers.
        self.runner.replay_prefill = False  # the compiled code is built by plain calls, captured later
        try:
            for size in ((640, 480), (1000, 333)):
                t0 = time.perf_counter()
                image = Image.new("RGB", size, (200, 120, 40))
                req = self.prepare("<image>\nDescribe this image.", [image], SamplingParams(temperature=0.1, seed=0), 4)
                for _ in self.stream_loading(req):  # the weights may still be loading
                    pass
                self.log(f"warm-up request with a {size[0]}x{size[1]} image: {time.perf_counter() - t0:.1f} s")
        finally:
            self.runner.replay_prefill = True

    def or_eager(self, step: Callable[[], None]) -> None:
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
