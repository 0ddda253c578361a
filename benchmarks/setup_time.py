"""Time a service start in a fresh process: load the checkpoint, capture, warm up (what setup() does).

    python benchmarks/setup_time.py CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

t_start = time.perf_counter()
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsvl2.engine import Engine  # noqa: E402

t_import = time.perf_counter() - t_start
t0 = time.perf_counter()
engine = Engine.from_pretrained(sys.argv[1], "cuda", torch.bfloat16, log=lambda s: print(s, flush=True))
torch.cuda.synchronize()
t_load = time.perf_counter() - t0
engine.warmup()
torch.cuda.synchronize()
print(json.dumps({"import_s": round(t_import, 1), "load_s": round(t_load, 1),
                  "warmup_s": round(time.perf_counter() - t0 - t_load, 1),
                  "setup_s": round(time.perf_counter() - t_start, 1)}))
