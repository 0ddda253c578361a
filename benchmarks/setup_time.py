"""Time a service start in a fresh process as setup() does it: the weights load in a background thread while
warm-up compiles, then the decode graphs are captured on the loaded weights.

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
engine = Engine.from_pretrained(sys.argv[1], "cuda", torch.bfloat16, log=lambda s: print(s, flush=True),
                                background_load=True)
torch.cuda.synchronize()
t_load = time.perf_counter() - t0
engine.warmup()
torch.cuda.synchronize()
print(json.dumps({"import_s": round(t_import, 1), "allocate_s": round(t_load, 1),
                  "load_and_warmup_s": round(time.perf_counter() - t0 - t_load, 1),
                  "setup_s": round(time.perf_counter() - t_start, 1)}))
