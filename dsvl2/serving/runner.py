"""The model runner: the GPU's static buffers and every computation on them, one caller at a time.

It owns the latent KV cache ([layers, slots + 1, S, rank + rope]: one row per batch slot, plus a scratch row that
every prefill writes), the decode step's per-row inputs and sampling state, and the captured CUDA graphs:

- the decode step (model, sampler, bookkeeping) per sampler mode and batch bucket (1, 2, 4, ... up to the slots):
  rows beyond the running requests are padding, computed and ignored;
- the language model's prefill per 64-token length bucket, into the scratch row (then copied to the request's row);
- the vision tower and projector per tile count.

A graph that cannot be captured is logged, counted in ``eager_fallbacks`` and its shapes run eagerly. Which rows
hold which request is the scheduler's business (``dsvl2.serving.scheduler``); the runner only reads and writes rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..inputs.processor import Encoded
from ..model.deepseek_vl2 import DeepseekVL2
from .sampling import SamplingParams, argmax_rows, sample, sample_top_candidates, seen_from_prompt, update_seen

TOP_CANDIDATES = 64  # "top" rows sort only this many candidates (exact for 0 < top_k <= it)
PREFILL_BUCKET = 64  # prompts are padded to a multiple of this for the captured prefills
MAX_GRAPHED_TILES = 32  # more tiles than this (many images) run the vision tower without a graph
MODES = ("greedy", "top", "full")  # a batch's sampler mode is the widest of its rows' modes


def sampler_mode(params: SamplingParams) -> str:
    """greedy: argmax; top: 0 < top_k <= TOP_CANDIDATES (sorts that many candidates); full: the whole vocabulary."""
    if params.temperature <= 0:
        return "greedy"
    return "top" if 0 < params.top_k <= TOP_CANDIDATES else "full"


def batch_buckets(slots: int) -> list[int]:
    """The batch sizes decode graphs are captured for: powers of two below ``slots``, then ``slots``."""
    sizes, b = [], 1
    while b < slots:
        sizes.append(b)
        b *= 2
    return [*sizes, slots]


@dataclass
class Fallbacks:
    """Graphs that could not be captured (their shapes run eagerly), by kind: exposed for logs and tests."""

    decode: int = 0
    prefill: int = 0
    vision: int = 0


class Runner:
    def __init__(self, model: DeepseekVL2, slots: int, log: Callable[[str], None] = print,
                 cuda_graphs: bool | None = None) -> None:
        self.model, self.log, self.slots = model, log, slots
        self.device = dev = model.device
        self.context = model.cfg.language.max_position_embeddings
        self.vocab = v = model.cfg.language.vocab_size
        self.use_graphs = dev.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.buckets = batch_buckets(slots)
        self.scratch = slots  # the cache row every prefill writes
        self.cache = model.language.new_cache(slots + 1)  # [layers, slots + 1, S, rank + rope]
        b = slots
        self.tokens = torch.zeros(b, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(b, dtype=torch.int64, device=dev)
        self.seen = torch.zeros(b, v, dtype=torch.bool, device=dev)
        self.noise = torch.ones(b, v, dtype=torch.float32, device=dev)
        self.temperature = torch.zeros(b, device=dev)
        self.top_p = torch.ones(b, device=dev)
        self.top_k = torch.zeros(b, dtype=torch.int64, device=dev)
        self.penalty = torch.ones(b, device=dev)
        self.top_rows = torch.zeros(b, dtype=torch.bool, device=dev)  # rows whose own mode is "top"
        self._rows = (self.tokens, self.pos, self.seen, self.temperature, self.top_p, self.top_k, self.penalty,
                      self.top_rows)
        self.decode_graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[int, tuple | bool] = {}  # padded length -> (graph, x, last, logits) or False
        self.vision_graphs: dict[int, tuple | bool] = {}  # tile count -> (graph, pixels, tiles) or False
        self.replay_prefill = True  # off while warm-up builds the compiled code, and for the plain path
        self.fallbacks = Fallbacks()
        self._pools: dict[str, tuple | None] = {"decode": None, "prefill": None, "vision": None}
        self._prefill_buffer: torch.Tensor | None = None

    # ---- rows ----
    def set_row(self, row: int, enc: Encoded, params: SamplingParams) -> None:
        """A new request's sampling state in ``row`` (its tokens and positions come with its prefill)."""
        # A top_k past the vocabulary keeps every token, as 0 does (and would not fit the int64 row).
        self.temperature[row], self.top_p[row], self.top_k[row], self.penalty[row] = (
            params.temperature, params.top_p, min(params.top_k, self.vocab), params.repetition_penalty)
        self.top_rows[row] = sampler_mode(params) == "top"
        self.seen[row] = seen_from_prompt(enc.input_ids.to(self.device), self.vocab)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Row ``src`` (its first ``length`` cache positions and its state) into row ``dst``, queued on the stream
        after whatever step is in flight."""
        self.cache[:, dst, :length] = self.cache[:, src, :length]
        for t in self._rows:
            t[dst] = t[src]

    def clear_row(self, row: int) -> None:
        """A vacated row: padding from now on, at position 0 (its writes stay inside its own unused cache row)."""
        self.pos[row] = 0
        self.tokens[row] = 0

    # ---- prefill ----
    def prefill(self, enc: Encoded, row: int) -> torch.Tensor:
        """Embed the prompt (images included), fill the cache row ``row`` -> last-position logits [1, V]."""
        embeds = self.model.embed(enc.input_ids, enc.image_mask, enc.pixel_values, enc.spatial_crops,
                                  encode=self.encode_tiles)
        t = embeds.shape[0]
        logits = self._graphed_prefill(embeds) if self.use_graphs and self.replay_prefill else None
        if logits is None:
            hidden = self.model.language.prefill(embeds[None], self.cache[:, self.scratch:self.scratch + 1])
            logits = self.model.language.logits(hidden[:, -1])
        self.cache[:, row, :t] = self.cache[:, self.scratch, :t]
        return logits

    def first_token(self, logits: torch.Tensor, row: int, prompt_len: int) -> None:
        """Sample the first answer token of ``row`` from its prefill logits into the row's step input."""
        r = slice(row, row + 1)
        first = sample(logits, self.seen[r], self.temperature[r], self.top_p[r], self.top_k[r], self.penalty[r],
                       self.noise[r])
        update_seen(self.seen[r], first)
        self.tokens[row] = first[0]
        self.pos[row] = prompt_len

    def _padded_prefill(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The prefill of a prompt padded at the end: x [1, S, D], last [1] the prompt's last position -> logits
        there [1, V]. The padding cannot reach the prompt (causal attention, experts per token)."""
        hidden = self.model.language.prefill(x, self.cache[:, self.scratch:self.scratch + 1])
        return self.model.language.logits(hidden.index_select(1, last)[:, 0])

    def _graphed_prefill(self, embeds: torch.Tensor) -> torch.Tensor | None:
        """Replay the captured prefill of this prompt's length bucket (captured on first use); None if that bucket
        could not be captured. Launching the prefill's kernels from Python costs 5-50 ms; a replay none of it."""
        t = embeds.shape[0]
        size = min(-(-t // PREFILL_BUCKET) * PREFILL_BUCKET, self.context)
        entry = self.prefill_graphs.get(size)
        if entry is None:
            x = self._prefill_input(size)
            last = torch.zeros(1, dtype=torch.int64, device=self.device)
            entry = self.prefill_graphs[size] = self._try_capture(
                lambda: self._padded_prefill(x, last), (x, last), "prefill", f"the prefill for {size} positions")
        if not entry:
            return None
        graph, x, last, out = entry
        x[0, :t].copy_(embeds)
        x[0, t:].zero_()
        last.fill_(t - 1)
        graph.replay()
        return out

    def _prefill_input(self, size: int) -> torch.Tensor:
        """The static input of the captured prefill for ``size`` positions: [1, size, D], a view of one buffer of
        the whole context shared by every length bucket (one prefill runs at a time). Contiguous for every size
        (a slice of [1, context, D] would be a new layout to the compiled prefill: a recompilation)."""
        d = self.model.cfg.language.hidden_size
        if self._prefill_buffer is None:
            self._prefill_buffer = torch.zeros(self.context * d, dtype=self.model.dtype, device=self.device)
        return self._prefill_buffer[: size * d].view(1, size, d)

    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower and projector over pixels [n, 3, 384, 384], replayed from the graph for n tiles
        (captured on first use) -> projected tiles [n, s*s, D], the graph's static output."""
        n = pixels.shape[0]
        if not (self.use_graphs and self.replay_prefill) or n > MAX_GRAPHED_TILES:
            return self.model.encode_tiles(pixels)
        entry = self.vision_graphs.get(n)
        if entry is None:
            x = torch.zeros_like(pixels)
            entry = self.vision_graphs[n] = self._try_capture(lambda: self.model.encode_tiles(x), (x,), "vision",
                                                              f"the vision tower for {n} tiles")
        if not entry:
            return self.model.encode_tiles(pixels)
        graph, x, out = entry
        x.copy_(pixels)
        graph.replay()
        return out

    # ---- decode ----
    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def step_eager(self, mode: str, b: int) -> None:
        """One decode step of rows [0, b): model, sampler, bookkeeping; no host synchronisation. Each row's result
        is the one its own mode gives, whatever the batch's mode (a "top" row in a "full" batch samples as "top")."""
        logits = self.model.language.decode(self.tokens[:b], self.pos[:b], self.cache[:, :b])
        state = (self.seen[:b], self.temperature[:b], self.top_p[:b], self.top_k[:b], self.penalty[:b],
                 self.noise[:b])
        if mode == "greedy":
            nxt = argmax_rows(logits)
        elif mode == "top":
            nxt = sample_top_candidates(logits, *state, TOP_CANDIDATES)
        else:
            nxt = torch.where(self.top_rows[:b], sample_top_candidates(logits, *state, TOP_CANDIDATES),
                              sample(logits, *state))
        update_seen(self.seen[:b], nxt)
        self.tokens[:b].copy_(nxt)
        # A request never passes the last position; padding rows are held there rather than run past the cache.
        self.pos[:b].add_(1).clamp_(max=self.context - 1)

    def step(self, mode: str, rows: int) -> None:
        b = self.bucket(rows)
        graph = self.decode_graphs.get((mode, b))
        if graph is not None:
            graph.replay()
        else:
            self.step_eager(mode, b)

    def capture_decode(self) -> None:
        """Capture the decode step for every sampler mode and batch bucket (one memory pool: one runs at a time)."""
        saved = [t.clone() for t in self._rows]
        for b in self.buckets:
            for mode in MODES:
                entry = self._try_capture(lambda m=mode, n=b: self.step_eager(m, n), (), "decode",
                                          f"the decode step ({mode}, {b} rows)", warmups=2)
                if entry:
                    self.decode_graphs[(mode, b)] = entry[0]
        for t, s in zip(self._rows, saved, strict=True):
            t.copy_(s)

    def _try_capture(self, fn: Callable[[], torch.Tensor | None], inputs: tuple[torch.Tensor, ...], kind: str,
                     what: str, warmups: int = 1) -> tuple | bool:
        """Capture ``fn`` (which reads the static ``inputs``) into the pool of its kind -> (graph, *inputs,
        output), or False, logged and counted, if the capture fails (those shapes then run eagerly)."""
        try:
            graph, out = capture_graph(fn, self._pools[kind], warmups)
        except Exception as e:  # noqa: BLE001 - those shapes run without a graph
            setattr(self.fallbacks, kind, getattr(self.fallbacks, kind) + 1)
            self.log(f"capturing {what} failed ({type(e).__name__}: {e}); it runs without a graph (slower)")
            return False
        self._pools[kind] = graph.pool()
        return graph, *inputs, out

    def drop_graphs(self) -> None:
        self.decode_graphs.clear()
        self.prefill_graphs.clear()
        self.vision_graphs.clear()


def capture_graph(fn: Callable[[], torch.Tensor | None], pool: tuple | None,
                  warmups: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
    """Run ``fn`` ``warmups`` times on a side stream, then capture it into a CUDA graph (in ``pool`` if given)
    -> (graph, what the captured call returned, which each replay refills)."""
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
