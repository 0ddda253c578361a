"""Time the host-side preprocessing of one request (tokenising, resizing, tiling and normalising the image):
``Processor.encode`` for one 800x600 image (3x2 tiles + global view) and the benchmark prompt. Runs on the CPU.

    python benchmarks/preprocess_time.py [--reps 15]

Prints one JSON line: the median and minimum in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from PIL import Image  # noqa: E402

from dsvl2.inputs.processor import Processor  # noqa: E402
from dsvl2.model.tiny import write_processor_files  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    folder = tempfile.mkdtemp()
    write_processor_files(folder)
    processor = Processor.from_pretrained(folder)
    image = Image.radial_gradient("L").resize((800, 600)).convert("RGB")  # the image bench.py uses
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        enc = processor.encode("<image>\nDescribe this image.", [image])
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"tiles": enc.pixel_values.shape[0], "median_ms": round(statistics.median(times), 1),
                      "min_ms": round(min(times), 1)}))


if __name__ == "__main__":
    main()
