"""The generation engine: validate on the CPU, prefill, then a fixed-shape decode loop that streams text.

Design (after gpt-fast): a static KV cache with a batch dimension, positions held in a device
tensor, and one decode step of fixed shape (model step + sampling + bookkeeping) captured in a
CUDA graph on the GPU. The host never waits for the step it has just launched: it launches step
n+1 and only then reads token n (copied asynchronously to pinned memory), so the GPU always has
the next step queued. Batch 1 is what runs now; the cache, positions and sampler rows already
carry per-request state so several requests can share a step later.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import compile_bundle, kernels, loader, prefetch
from .compilation import import_compiler, quick_autotune, start_compile_workers
from .config import ModelConfig
from .detokenize import StreamDecoder
from .errors import InputError, PromptTooLong
from .loader import allocate_model, load_into, load_model, shard_files
from .model import DeepseekVL2
from .moe import MoE
from .processor import TILE, Encoded, Processor
from .sampling import (
    RequestRng,
    SamplingParams,
    argmax_rows,
    draw_noise,
    sample,
    sample_top_candidates,
    seen_from_prompt,
    update_seen,
    validate_params,
)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token_s: float = 0.0
    tokens_per_second: float = 0.0
    finish_reason: str = ""  # "stop" (eos), "length", "cancelled"


@dataclass
class Request:
    encoded: Encoded
    params: SamplingParams
    max_new_tokens: int
    seed: int = 0
    output_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


TOP_CANDIDATES = 64
PREFILL_BUCKET = 64  # prompts are padded to a multiple of this for the captured prefills
MAX_GRAPHED_TILES = 32  # more tiles than this (many images) run the vision tower without a graph
PRECOMPILE_TIMEOUT_S = 300  # the warm-up waits at most this long for the Triton kernels compiled ahead


def sampler_mode(params: SamplingParams) -> str:
    if params.temperature <= 0:
        return "greedy"
    return "top" if 0 < params.top_k <= TOP_CANDIDATES else "full"


class Engine:
    def __init__(self, model: DeepseekVL2, processor: Processor, log: Callable[[str], None] = print,
                 cuda_graphs: bool | None = None, compile: bool | None = None, max_batch: int = 1) -> None:
        self.model = model
        self.processor = processor
        self.log = log
        self.device = model.device
        self.context = model.cfg.language.max_position_embeddings
        self.vocab = model.cfg.language.vocab_size
        self.eos_id = processor.eos_id
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.use_compile = self.device.type == "cuda" if compile is None else compile
        self.cache = model.language.new_cache(max_batch)  # [layers, B, S, 576]
        b, dev = max_batch, self.device
        # The decode step's static inputs and per-row sampling state.
        self.tokens = torch.zeros(b, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(b, dtype=torch.int64, device=dev)
        self.seen = torch.zeros(b, self.vocab, dtype=torch.bool, device=dev)
        self.noise = torch.ones(b, self.vocab, dtype=torch.float32, device=dev)
        self.temperature = torch.zeros(b, device=dev)
        self.top_p = torch.ones(b, device=dev)
        self.top_k = torch.zeros(b, dtype=torch.int64, device=dev)
        self.penalty = torch.ones(b, device=dev)
        # One captured step per sampler mode: "greedy" (argmax only), "top" (top-k <= TOP_CANDIDATES:
        # sort that many candidates) and "full" (sort the whole vocabulary).
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._loader: threading.Thread | None = None  # a background load still filling the weights
        self._load_error: BaseException | None = None
        self._warming = False  # warm-up requests may run on weights still being loaded
        # Captured prefills by (padded length, row): (graph, static input, last position, logits), or False.
        self.prefill_graphs: dict[tuple[int, int], tuple | bool] = {}
        # Captured vision tower + projector by tile count: (graph, static pixels, projected tiles), or False.
        self.vision_graphs: dict[int, tuple | bool] = {}
        self.graph_prefill = True  # replay captured graphs for the prefill (vision and language model)
        self._prefill_pool = None
        self._vision_pool = None
        self._prefill_buffer: torch.Tensor | None = None  # see _prefill_input
        # Where warm-up looks for a compile bundle of this GPU and software (dsvl2.compile_bundle), in order.
        self.bundle_dirs: list[Path] = [compile_bundle.SHIPPED]

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                        log: Callable[[str], None] = print, background_load: bool = False, **kwargs) -> Engine:
        """Load a checkpoint. With ``background_load`` the weights stream into a zero-filled model in a
        thread, so that ``warmup`` compiles while the disk is busy; generation waits for the load."""
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda:
            prefetch.start()  # a no-op where the entry point started it before importing torch
        checkpoint_dir = Path(checkpoint_dir)
        if background_load:
            # The disk starts reading the shards now, while the model is allocated (the load then finds them
            # read or in flight, in the order it copies them).
            prefetch.start_read_ahead(shard_files(checkpoint_dir).values(), streams=loader.LOAD_WORKERS)
        processor = Processor.from_pretrained(checkpoint_dir)
        if background_load:
            cfg = ModelConfig.from_file(checkpoint_dir / "config.json")
            engine = cls(allocate_model(cfg, device, dtype), processor, log=log, **kwargs)
            engine._start_loading(checkpoint_dir)
            # The compiler stack imported here, beside the load and before any thread that uses it starts: its
            # modules import each other in cycles, and two threads importing them at once can fail ("partially
            # initialized module"), as seen on an H200 with the workers, the kernel precompile and the warm-up.
            import_compiler()
            if on_cuda:  # in the background: Inductor's compile worker processes started
                threading.Thread(target=start_compile_workers, name="dsvl2-compile-workers", daemon=True).start()
        else:
            engine = cls(load_model(checkpoint_dir, device, dtype, log=log), processor, log=log, **kwargs)
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

    # ---- request validation (CPU only, before any GPU work) ----
    def prepare(self, prompt: str, images: list[Image.Image], params: SamplingParams,
                max_new_tokens: int) -> Request:
        validate_params(params)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        encoded = self.processor.encode(prompt, images)
        n = len(encoded.input_ids)
        if n >= self.context:
            raise PromptTooLong(
                f"PromptTooLong: the prompt is {n} tokens (text plus {sum(encoded.num_image_tokens)} image tokens) "
                f"but the model's context is {self.context} tokens, and at least one must be left for the answer; "
                "use fewer or smaller images or a shorter prompt")
        if n + max_new_tokens > self.context:
            cut = self.context - n
            self.log(f"max_new_tokens {max_new_tokens} cut to {cut}: prompt {n} + answer must fit in {self.context}")
            max_new_tokens = cut
        rng_seed = RequestRng(params.seed, "cpu").seed  # draws a seed when none is given, so it can be logged
        return Request(encoded, params, max_new_tokens, seed=rng_seed,
                       stats=GenerationStats(prompt_tokens=n))

    # ---- generation ----
    @torch.inference_mode()
    def stream(self, req: Request, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield text chunks as tokens arrive; stops at eos, at max_new_tokens or when cancel is set."""
        if not self._warming:
            self.wait_loaded()
        t0 = time.perf_counter()
        enc, p, row = req.encoded, req.params, 0
        rng = RequestRng(req.seed, self.device)
        sampling = p.temperature > 0
        mode = sampler_mode(p)
        self.temperature[row], self.top_p[row], self.top_k[row], self.penalty[row] = (
            p.temperature, p.top_p, p.top_k, p.repetition_penalty)
        self.seen[row] = seen_from_prompt(enc.input_ids.to(self.device), self.vocab)

        try:
            logits = self._prefill(enc, row)
        except Exception as e:
            # A recompilation for a new shape that fails must cost one slow request, not the service.
            if not self._drop_compiled(("forward",)):
                raise
            self.log(f"compiled prefill failed ({type(e).__name__}: {e}); continuing with the eager prefill")
            logits = self._prefill(enc, row)
        if sampling:
            draw_noise([rng], self.vocab, self.device, out=self.noise[row:row + 1])
        first = sample(logits, self.seen[row:row + 1], self.temperature[row:row + 1], self.top_p[row:row + 1],
                       self.top_k[row:row + 1], self.penalty[row:row + 1], self.noise[row:row + 1])
        update_seen(self.seen[row:row + 1], first)
        self.tokens[row] = first[0]
        self.pos[row] = len(enc.input_ids)

        decoder = StreamDecoder(self.processor.tokenizer, {self.processor.bos_id, self.eos_id, self.processor.pad_id})
        host = torch.empty(2, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        events = [self._copy_token(host, 0, row)]
        t_first = t_last = None
        finish = "length"
        for i in range(req.max_new_tokens):
            # Queue the next step before reading this token, so the GPU never idles on the host.
            if i + 1 < req.max_new_tokens:
                if sampling:
                    rng.fill(self.noise[row])
                self._step(mode)
                events.append(self._copy_token(host, (i + 1) % 2, row))
            if events[i] is not None:
                events[i].synchronize()
            token = int(host[i % 2])
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
                req.stats.time_to_first_token_s = t_first - t0
            if token == self.eos_id:
                finish = "stop"
                break
            req.output_ids.append(token)
            n = req.stats.output_tokens = len(req.output_ids)
            if n > 1 and t_last > t_first:  # kept current, so a cancelled request has it too
                req.stats.tokens_per_second = (n - 1) / (t_last - t_first)
            text = decoder.push(token)
            if text:
                yield text
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
        tail = decoder.flush()
        if tail:
            yield tail
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # let a queued speculative step finish
        req.stats.finish_reason = finish

    def _replay_prefill(self) -> bool:
        """Whether the prefill replays captured graphs (not while warm-up builds the compiled code)."""
        return self.use_graphs and self.graph_prefill and not self._warming

    def _prefill(self, enc: Encoded, row: int) -> torch.Tensor:
        """Embed the prompt (images included) and fill the cache row; -> last-position logits [1, V]."""
        embeds = self.model.embed(enc.input_ids, enc.image_mask, enc.pixel_values, enc.spatial_crops,
                                  encode=self._encode_tiles)
        if self._replay_prefill():
            logits = self._graphed_prefill(embeds, row)
            if logits is not None:
                return logits
        hidden = self.model.language.prefill(embeds[None], self.cache[:, row:row + 1])
        return self.model.language.logits(hidden[:, -1])

    def _padded_prefill(self, x: torch.Tensor, last: torch.Tensor, row: int) -> torch.Tensor:
        """The language model's prefill of a prompt padded at the end: x [1, S, D] (prompt, then zeros), last [1]
        the prompt's last position -> logits there [1, V]. The padding cannot reach the prompt (causal attention,
        experts per token) and only fills cache slots that decode overwrites before it reads them."""
        hidden = self.model.language.prefill(x, self.cache[:, row:row + 1])
        return self.model.language.logits(hidden.index_select(1, last)[:, 0])

    def _graphed_prefill(self, embeds: torch.Tensor, row: int) -> torch.Tensor | None:
        """Replay the captured prefill for this prompt's length bucket (captured on first use); None if that
        bucket could not be captured. Launching the prefill's kernels from Python costs 5-50 ms depending on
        the host; a replay costs none of it."""
        t = embeds.shape[0]
        size = min(-(-t // PREFILL_BUCKET) * PREFILL_BUCKET, self.context)
        entry = self.prefill_graphs.get((size, row))
        if entry is None:
            entry = self.prefill_graphs[(size, row)] = self._capture_prefill(size, row)
        if not entry:
            return None
        graph, x, last, out = entry
        x[0, :t].copy_(embeds)
        x[0, t:].zero_()
        last.fill_(t - 1)
        graph.replay()
        return out

    def _prefill_input(self, size: int) -> torch.Tensor:
        """The static input of the captured prefill for ``size`` positions: [1, size, D], a view of one buffer
        of the whole context shared by every length bucket (one prefill runs at a time)."""
        d = self.model.cfg.language.hidden_size
        if self._prefill_buffer is None:
            self._prefill_buffer = torch.zeros(self.context * d, dtype=self.model.dtype, device=self.device)
        # Contiguous for every size (not a slice of [1, context, D], whose batch stride the compiled prefill
        # would see as a new layout and recompile for: 4-6 s at the first short prompt).
        return self._prefill_buffer[: size * d].view(1, size, d)

    def _capture_prefill(self, size: int, row: int) -> tuple | bool:
        x = self._prefill_input(size)
        last = torch.zeros(1, dtype=torch.int64, device=self.device)
        return self._try_capture(lambda: self._padded_prefill(x, last, row), (x, last), "_prefill_pool",
                                 f"the prefill for {size} positions", "prompts of that length")

    def _encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower and projector over pixels [n, 3, 384, 384] (on the device, model dtype), replayed
        from the graph captured for n tiles (on first use) -> projected tiles [n, s*s, D]. The output is the
        graph's static tensor: the caller lays it out into new tensors before the next replay. Launching the
        tower's 27 compiled blocks from Python costs more host time than their GPU work."""
        n = pixels.shape[0]
        if not self._replay_prefill() or n > MAX_GRAPHED_TILES:
            return self.model.encode_tiles(pixels)
        entry = self.vision_graphs.get(n)
        if entry is None:
            x = torch.zeros_like(pixels)
            entry = self.vision_graphs[n] = self._try_capture(lambda: self.model.encode_tiles(x), (x,), "_vision_pool",
                                                              f"the vision tower for {n} tiles",
                                                              "images of that many tiles")
        if not entry:
            return self.model.encode_tiles(pixels)
        graph, x, out = entry
        x.copy_(pixels)
        graph.replay()
        return out

    def _try_capture(self, fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], pool: str, what: str,
                     fallback: str) -> tuple | bool:
        """Capture ``fn`` (which reads the static ``inputs``) into the memory pool named by the attribute ``pool``
        (one pool per kind of graph: one graph of a kind runs at a time) -> (graph, *inputs, its output), or
        False (logged) if the capture fails."""
        try:
            # The warm-up run builds the compiled code for these shapes before the capture.
            graph, out = capture_graph(fn, getattr(self, pool), warmups=1)
        except Exception as e:  # noqa: BLE001 - those shapes then run without a graph
            self.log(f"capturing {what} failed ({type(e).__name__}: {e}); {fallback} run without a graph")
            return False
        setattr(self, pool, graph.pool())
        return graph, *inputs, out

    def _drop_compiled(self, names: tuple[str, ...]) -> bool:
        """Remove the compiled wrappers of these methods (back to the plain ones); True if any existed.
        Graphs already captured stay valid: they replay kernels, not Python."""
        dropped = False
        for module in [*self.model.language.model.layers, *self.model.vision.blocks]:
            for name in names:
                dropped |= module.__dict__.pop(name, None) is not None
        return dropped

    def _copy_token(self, host: torch.Tensor, slot: int, row: int) -> torch.cuda.Event | None:
        host[slot].copy_(self.tokens[row], non_blocking=True)
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _step_eager(self, mode: str = "full") -> None:
        """One decode step for every row: model, sampler, bookkeeping; no host synchronisation."""
        logits = self.model.language.decode(self.tokens, self.pos, self.cache)
        if mode == "greedy":
            nxt = argmax_rows(logits)
        elif mode == "top":
            nxt = sample_top_candidates(logits, self.seen, self.temperature, self.top_p, self.top_k, self.penalty,
                                        self.noise, TOP_CANDIDATES)
        else:
            nxt = sample(logits, self.seen, self.temperature, self.top_p, self.top_k, self.penalty, self.noise)
        update_seen(self.seen, nxt)
        self.tokens.copy_(nxt)
        self.pos.add_(1)

    def _step(self, mode: str) -> None:
        graph = self.graphs.get(mode)
        if graph is not None:
            graph.replay()
        else:
            self._step_eager(mode)

    def compile(self) -> None:
        """Compile each decoder layer's decode step (regional compilation: one layer's code serves all
        layers, and Inductor's on-disk cache makes a restart reuse it). Fuses the many small
        element-wise kernels of norms, rotary embedding and attention; the graph is captured after."""
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for layer in self.model.language.model.layers:
            layer.decode = torch.compile(layer.decode, dynamic=False)
            # The prefill too, for any prompt length: one graph with a symbolic length.
            layer.forward = torch.compile(layer.forward, dynamic=True)
        for block in self.model.vision.blocks:
            block.forward = torch.compile(block.forward, dynamic=True)

    def capture(self) -> None:
        """Capture the decode step of each sampler mode in a CUDA graph (after warm-up runs on a side
        stream; the three share one memory pool: only one of them runs at a time), then the vision tower's graph
        for each single-image tile count."""
        if not self.use_graphs:
            return
        t0 = time.perf_counter()
        saved = [t.clone() for t in (self.tokens, self.pos, self.seen)]
        pool = None
        for mode in ("greedy", "top", "full"):
            self.graphs[mode], _ = capture_graph(lambda m=mode: self._step_eager(m), pool, warmups=2)
            pool = self.graphs[mode].pool()
        for t, s in zip((self.tokens, self.pos, self.seen), saved, strict=True):
            t.copy_(s)
        # The vision tower for every tile count one image can have (global view + its grid); other counts
        # (several images) are captured on first use.
        t1 = time.perf_counter()
        counts = sorted({1 + (w // TILE) * (h // TILE) for w, h in self.processor.config.candidate_resolutions})
        for n in counts:
            self._encode_tiles(torch.zeros(n, 3, TILE, TILE, dtype=self.model.dtype, device=self.device))
        self.log(f"captured the decode step in {t1 - t0:.1f} s, the vision tower for {len(counts)} tile counts in "
                 f"{time.perf_counter() - t1:.1f} s")

    def warmup(self) -> None:
        """Compile (regional), run two warm-up requests (they build the compiled code) and capture the decode
        and vision graphs; during a background load all of this runs on the weights as they stream in (a
        graph records the weights' addresses, not their values). Then wait for the load and run one short
        request through the graphs."""
        t0 = time.perf_counter()
        kernels_thread = None
        if self.use_compile:
            import_compiler()  # before the precompile thread starts (a no-op where from_pretrained did it)
        if self.use_compile and self.device.type == "cuda" and kernels.triton is not None:
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
        thread traces and compiles the model (``kernels.precompile``). Runs one MoE decoder layer's plain
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
                x = torch.zeros(self.pos.shape[0], 1, d, dtype=self.model.dtype, device=self.device)
                cache = torch.zeros_like(self.cache[i])  # the real one's layout; the engine's state stays untouched
                type(layer).decode(layer, x, lm.rope[self.pos][:, None], cache, self.pos)  # the class's: not compiled
                layer.mlp(torch.zeros(1, PREFILL_BUCKET, d, dtype=self.model.dtype, device=self.device))

        try:
            with contextlib.ExitStack() as on_device:
                if self.device.type == "cuda":  # Triton compiles for the current device; a stream of its own
                    on_device.enter_context(torch.cuda.device(self.device))
                    on_device.enter_context(torch.cuda.stream(torch.cuda.Stream(self.device)))
                n = kernels.precompile(run, self.device)
        except Exception as e:  # noqa: BLE001
            self.log(f"compiling the Triton kernels ahead failed ({type(e).__name__}: {e}); they compile at first use")
            return
        self.log(f"compiled {n} Triton kernels in {time.perf_counter() - t0:.1f} s (beside the model's compilation)")

    def _warm_requests(self) -> None:
        # Two requests of different shapes, so that the compiled prefill settles on shape-generic code here
        # rather than recompiling on the first real request. No graphs yet: the steps run the compiled layers.
        self._warming = True
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
            self.graphs = {}
            step()


def capture_graph(fn: Callable[[], torch.Tensor | None], pool: tuple | None,
                  warmups: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
    """Run ``fn`` ``warmups`` times on a side stream, then capture it into a CUDA graph (in ``pool`` if
    given); -> (graph, what the captured call returned, which each replay refills)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # "thread_local": the background loader's copies on another thread may run during the capture.
    with torch.inference_mode(), torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def set_moe_impl(impl: str) -> None:
    """Choose the routed-expert implementation for every MoE layer: "grouped" (fast) or "loop" (plain)."""
    if impl not in ("grouped", "loop"):
        raise ValueError(f"unknown MoE implementation {impl!r}")
    MoE.impl = impl
