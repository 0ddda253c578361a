"""Command line: ``python -m dsvl2 --weights DIR --image FILE --prompt TEXT [--json]`` (greedy by default).

It runs the service's engine, configured as predict.py configures it (``settings.engine_config``: warmed up, and on
the GPU compiled and captured with the weights streaming in meanwhile), from the same environment variables
(dsvl2/settings.py documents them: DSVL2_MAX_BATCH, DSVL2_BATCH_INVARIANT, DSVL2_PDL, DSVL2_STREAM_INTERVAL_MS,
DSVL2_COMPILE_CACHE), but ``--device`` and ``--dtype`` instead of DSVL2_DEVICE.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import settings
from .errors import CheckpointError, InputError
from .inputs.images import load_image
from .serving.engine import Engine
from .serving.sampling import SamplingParams


def log(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsvl2", description="Run DeepSeek-VL2 on images and a prompt.")
    ap.add_argument("--weights", required=True, help="checkpoint directory in the official layout")
    ap.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default here)")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    args = ap.parse_args(argv)
    engine = None
    try:
        settings.use_compile_cache()
        config = settings.engine_config(args.device, getattr(torch, args.dtype) if args.dtype else None)
        engine = Engine.from_pretrained(args.weights, config, log=log)
        images = [load_image(path) for path in args.image]
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
        req = engine.prepare(args.prompt, images, params, args.max_new_tokens)
        chunks = []
        for text in engine.stream(req):
            chunks.append(text)
            if not args.json:
                print(text, end="", flush=True)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if engine is not None:
            engine.close()  # the scheduler's thread ends before the interpreter does
    if args.json:
        print(json.dumps({"text": "".join(chunks), "prompt_token_ids": req.encoded.input_ids.tolist(),
                          "output_token_ids": req.output_ids, "finish_reason": req.stats.finish_reason,
                          "seed": req.seed}, ensure_ascii=False))
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
