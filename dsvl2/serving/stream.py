"""A request's text as its reader gets it from the scheduler (``scheduler``): the request's queue holds text
chunks, then ``END`` (or the error that ended it); ``Stream`` coalesces the chunks into events.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

END = object()  # the last item of a request's queue when it ends without an error


class Stream:
    """The text of one request as its reader gets it: the first text at once, then whatever came meanwhile, at
    most once per ``interval`` seconds (so that 64 streams at hundreds of tokens/s each do not flood the server
    with one event per token)."""

    def __init__(self, out: queue.SimpleQueue, interval: float) -> None:
        self.out, self.interval = out, interval

    def __iter__(self) -> Iterator[str]:
        out = self.out
        last = 0.0
        while True:
            item = out.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            parts, ended = [item], False
            deadline = last + self.interval
            while not ended:
                wait = deadline - time.perf_counter()
                try:
                    nxt = out.get(timeout=wait) if wait > 0 else out.get_nowait()
                except queue.Empty:
                    break
                if nxt is END or isinstance(nxt, BaseException):
                    out.put(nxt)  # seen again by the outer loop, after this text
                    ended = True
                else:
                    parts.append(nxt)
            last = time.perf_counter()
            yield "".join(parts)
