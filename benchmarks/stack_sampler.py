"""Where the threads of this process spend their time: a sampling profiler in pure Python (no installs needed on
the lent machines). Every ``interval`` seconds it records the innermost frames of each thread's stack; ``report``
gives, per thread, the most frequent (file:function) frames among the innermost ``depth`` and the most frequent
innermost frames alone (where the thread was, or waited), and (Linux) the CPU
time each thread used while sampled: a thread with little CPU for its wall time was waiting (on the interpreter
lock, the disk, a lock in a library or a child process), one with a full core was computing.

    sampler = StackSampler(interval=0.01); sampler.start(); ...; sampler.stop(); print(sampler.report())
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from pathlib import Path


class StackSampler:
    def __init__(self, interval: float = 0.01, depth: int = 4) -> None:
        self.interval = interval
        self.depth = depth
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.samples: collections.Counter = collections.Counter()
        self.leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._last_cpu: dict[str, float] = {}  # the latest CPU reading of every thread seen, ended ones too
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> None:
        self._t0, self._cpu0 = time.perf_counter(), thread_cpu_seconds()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self._t0
        self._last_cpu.update(thread_cpu_seconds())
        self.cpu = {name: round(t - self._cpu0.get(name, 0.0), 2) for name, t in self._last_cpu.items()}

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            self._last_cpu.update(thread_cpu_seconds())
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, str(ident))
                self.samples[name] += 1
                seen = set()
                self.leaves[name][f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1
                for _ in range(self.depth):
                    if frame is None:
                        break
                    key = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
                    if key not in seen:  # a frame counts once per sample, however deep it recurs
                        self.counts[name][key] += 1
                        seen.add(key)
                    frame = frame.f_back

    def report(self, top: int = 15) -> dict:
        """{"wall_s", "cpu_s": {thread: CPU seconds}, "frames": {thread: [(file:function, share of that thread's
        samples), ...]}} with the ``top`` frames of each thread."""
        frames = {name: [(key, round(n / self.samples[name], 3)) for key, n in counter.most_common(top)]
                  for name, counter in self.counts.items()}
        leaves = {name: [(key, round(n / self.samples[name], 3)) for key, n in counter.most_common(top)]
                  for name, counter in self.leaves.items()}
        return {"wall_s": round(self.wall, 2), "cpu_s": self.cpu, "frames": frames, "innermost": leaves}


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each live Python thread, from /proc (empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for t in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[t.name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime: fields 14 and 15 of stat
    return out


if __name__ == "__main__":  # a self-check: a busy thread and a sleeping one
    def busy() -> None:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            sum(range(1000))

    sampler = StackSampler(interval=0.005)
    sampler.start()
    worker = threading.Thread(target=busy, name="busy")
    worker.start()
    worker.join()
    sampler.stop()
    print(sampler.report())
