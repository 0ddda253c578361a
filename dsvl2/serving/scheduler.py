"""Continuous batching: one thread owns the GPU; requests come in through a queue and leave through their own.

The loop, on the scheduler thread:

1. admit: a waiting request takes the next free row and is prefilled there (into the runner's scratch row, then
   copied), and its first token is sampled. While other requests are decoding, at most one prefill runs between
   two decode steps, so a running stream waits at most one prefill per token;
2. launch the decode step for every running row (the graph of the smallest batch bucket that holds them; rows
   beyond them are padding), with each sampling row's noise drawn from that request's own generator;
3. only then read the previous step's tokens (the GPU always has a step queued) and hand each to its request:
   its text goes to the request's queue; eos, the token limit or a cancel ends it;
4. a finished request's row is refilled at once by the last running row (the rows stay packed, so the next step
   runs the smallest bucket).

A request that fails (its prefill runs out of memory, say) fails alone; the loop goes on. The text a request
yields is coalesced by its reader (``stream.Stream``): the first text at once, then at most one chunk per interval.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .detokenize import StreamDecoder
from .runner import MODES, Runner, sampler_mode
from .sampling import RequestRng
from .stream import END

IDLE_EXIT_S = 10.0  # the scheduler thread ends after this long with nothing to do
_WAKE = object()  # put in the queue by ``Scheduler.close`` to wake an idle loop


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token_s: float = 0.0  # from the hand-over to the scheduler: waiting for a row, prefill
    tokens_per_second: float = 0.0
    finish_reason: str = ""  # "stop" (eos), "length", "cancelled", "error"
    queued_s: float = 0.0  # from the hand-over to the start of its prefill (other prefills, a free row)
    prefill_s: float = 0.0
    max_gap_s: float = 0.0  # the longest wait between two of its tokens (other requests' prefills included)
    first_text_tokens: int = 0  # tokens until the first text (a character split over tokens waits for the rest)


@dataclass
class Active:
    """A request while the scheduler holds it."""

    req: object  # engine.Request
    cancel: threading.Event
    out: queue.SimpleQueue
    decoder: StreamDecoder
    mode: str
    rng: RequestRng | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_at: float = 0.0
    last_at: float = 0.0
    done: bool = False

    def length(self, context: int) -> int:
        """Cache positions this request may have written so far (a speculative step included)."""
        return min(len(self.req.encoded.input_ids) + len(self.req.output_ids) + 2, context)


class Scheduler:
    def __init__(self, runner: Runner, make_decoder: Callable[[], StreamDecoder], eos_id: int,
                 log: Callable[[str], None] = print, max_waiting: int = 256,
                 recover: Callable[[], bool] = lambda: False) -> None:
        self.runner, self.make_decoder, self.eos_id, self.log = runner, make_decoder, eos_id, log
        self.recover = recover  # after a failed prefill: True if it dropped compiled code, so that a retry may pass
        self.max_waiting = max_waiting
        self.incoming: queue.Queue[Active] = queue.Queue()
        self.waiting: list[Active] = []
        self.rows: list[Active] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.steps = 0

    def close(self, timeout: float = 60.0) -> None:
        """End the loop once it has finished what it runs, now rather than after IDLE_EXIT_S, and wait for it: so
        that a process (the command line) does not exit while the thread is inside torch. A later ``submit``
        starts the loop again."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._closing.set()
            self.incoming.put(_WAKE)
        thread.join(timeout)

    def submit(self, req, cancel: threading.Event) -> Active:
        if self.incoming.qsize() + len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{self.max_waiting} requests are already waiting; try again later")
        mode = sampler_mode(req.params)
        item = Active(req, cancel, queue.SimpleQueue(), self.make_decoder(), mode)
        with self._lock:  # the loop leaves only under this lock, with nothing queued (see _take_incoming)
            self._closing.clear()
            self.incoming.put(item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="dsvl2-scheduler", daemon=True)
                self._thread.start()
        return item

    # ---- the loop ----
    @torch.inference_mode()
    def _loop(self) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.set_device(self.runner.device)
        host = torch.empty(2, self.runner.slots, dtype=torch.int64, pin_memory=self.runner.device.type == "cuda")
        inflight = None  # (rows of the launched step, host slot, event)
        k = 0
        while True:
            try:
                if not self._take_incoming(block=not self.rows and not self.waiting and inflight is None):
                    return  # idle: the thread ends (the next submit starts another)
                self._admit(inflight is not None or bool(self.rows))
                launched = None
                if self.rows:
                    launched = self._launch(host, k % 2)
                    k += 1
                if inflight is not None:
                    self._collect(host, *inflight)
                inflight = launched
                self._release()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the loop
                inflight = None
                for a in self.rows:
                    if not a.done:
                        self._fail(a, e)
                for i in range(len(self.rows)):
                    self.runner.clear_row(i)
                self.rows.clear()

    def _take_incoming(self, block: bool) -> bool:
        """Move new requests to the waiting list; False when the loop has been idle for IDLE_EXIT_S and ends."""
        got = False
        try:
            item = self.incoming.get(block=block, timeout=(0.0 if self._closing.is_set() else IDLE_EXIT_S)
                                     if block else None)
            while True:
                if item is not _WAKE:
                    self.waiting.append(item)
                    got = True
                item = self.incoming.get_nowait()
        except queue.Empty:
            if block and not got:
                with self._lock:
                    if self.incoming.empty():
                        self._thread = None
                        return False
        for a in [a for a in self.waiting if a.cancel.is_set()]:
            self.waiting.remove(a)
            self._finish(a, "cancelled")
        return True

    def _admit(self, busy: bool) -> None:
        """Prefill waiting requests into free rows: one when others are decoding, else all that fit."""
        while self.waiting and len(self.rows) < self.runner.slots:
            a = self.waiting.pop(0)
            row = len(self.rows)
            try:
                try:
                    self._prefill(a, row)
                except Exception as e:
                    # A recompilation for a new shape that fails must cost one slow request, not the service.
                    if not self.recover():
                        raise
                    self.log(f"compiled prefill failed ({type(e).__name__}: {e}); continuing with the eager prefill")
                    self._prefill(a, row)
            except Exception as e:  # noqa: BLE001 - this request fails, the service goes on
                self._fail(a, e)
                self.runner.clear_row(row)
                continue
            if a.done:  # one token was all it asked for, or its first was eos
                self.runner.clear_row(row)
            else:
                self.rows.append(a)
            if busy:
                return

    def _prefill(self, a: Active, row: int) -> None:
        req, runner = a.req, self.runner
        start = time.perf_counter()
        req.stats.queued_s = start - a.submitted
        enc = req.encoded
        runner.set_row(row, enc, req.params)
        if req.params.temperature > 0:
            a.rng = RequestRng(req.seed, runner.device)
            a.rng.fill(runner.noise[row])
        logits = runner.prefill(enc, row)
        runner.first_token(logits, row, len(enc.input_ids))
        token = int(runner.tokens[row])
        req.stats.prefill_s = time.perf_counter() - start
        self._deliver(a, token)

    def _launch(self, host: torch.Tensor, slot: int) -> tuple:
        rows = list(self.rows)
        for i, a in enumerate(rows):
            if a.rng is not None:
                a.rng.fill(self.runner.noise[i])
        mode = max((a.mode for a in rows), key=MODES.index)
        self.runner.step(mode, len(rows))
        self.steps += 1
        host[slot, :len(rows)].copy_(self.runner.tokens[:len(rows)], non_blocking=True)
        event = None
        if self.runner.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return rows, slot, event

    def _collect(self, host: torch.Tensor, rows: list[Active], slot: int, event) -> None:
        if event is not None:
            event.synchronize()
        tokens = host[slot, :len(rows)].tolist()
        for a, token in zip(rows, tokens, strict=True):
            if not a.done:
                self._deliver(a, token)

    def _deliver(self, a: Active, token: int) -> None:
        """One new token of ``a``: its text to its queue; eos, the limit or a cancel ends it."""
        now = time.perf_counter()
        stats = a.req.stats
        if not a.first_at:
            a.first_at = now
            stats.time_to_first_token_s = now - a.submitted
        else:
            stats.max_gap_s = max(stats.max_gap_s, now - a.last_at)
        a.last_at = now
        if token == self.eos_id:
            self._finish(a, "stop")
            return
        a.req.output_ids.append(token)
        n = stats.output_tokens = len(a.req.output_ids)
        if n > 1 and now > a.first_at:
            stats.tokens_per_second = (n - 1) / (now - a.first_at)
        text = a.decoder.push(token)
        if text:
            stats.first_text_tokens = stats.first_text_tokens or n
            a.out.put(text)
        if n >= a.req.max_new_tokens:
            self._finish(a, "length")
        elif a.cancel.is_set():
            self._finish(a, "cancelled")

    def _finish(self, a: Active, reason: str) -> None:
        a.done = True
        a.req.stats.finish_reason = reason
        tail = a.decoder.flush()
        if tail:
            a.out.put(tail)
        a.out.put(END)

    def _fail(self, a: Active, error: BaseException) -> None:
        a.done = True
        a.req.stats.finish_reason = "error"
        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            error = MemoryError(f"the GPU ran out of memory for this request ({len(a.req.encoded.input_ids)} "
                                f"prompt tokens); try a shorter prompt, fewer or smaller images")
        self.log(f"request failed: {type(error).__name__}: {error}")
        a.out.put(error)

    def _release(self) -> None:
        """Cancelled requests end; finished rows are refilled by the last running row."""
        for a in self.rows:
            if not a.done and a.cancel.is_set():
                self._finish(a, "cancelled")
        i = 0
        while i < len(self.rows):
            if self.rows[i].done:
                last = len(self.rows) - 1
                if i != last:
                    self.runner.move_row(last, i, self.rows[last].length(self.runner.context))
                    self.rows[i] = self.rows[last]
                self.rows.pop()
                self.runner.clear_row(last)
            else:
                i += 1
