"""Cog adapter: DeepSeek-VL2-small behind the Cog HTTP server (coglet), streaming text.

`setup()` finds (or downloads) the checkpoint and starts the engine, loaded and warmed up; `run()` streams the
answer to a prompt about one or more images. The inputs are declared once, in `run`'s signature: coglet checks
HTTP requests against the schema made from it (scripts/make_schema.py writes `.cog/openapi_schema.json`), and
dsvl2.serving.service checks a direct Python call against the same declarations. The environment variables
(DSVL2_WEIGHTS, DSVL2_DEVICE, DSVL2_MAX_BATCH, ...) are read and documented in dsvl2/settings.py.

Concurrency: `run` is async and returns a plain generator, which coglet streams from a thread of its own per
prediction; every prediction's generator reads its text from the engine's scheduler, which decodes all of them
together on the GPU (continuous batching, dsvl2.serving.scheduler).
"""

# ruff: noqa: E402 - the prefetch starts before anything heavy is imported
# First of all, before torch is imported: the software's own files read into the page cache in the background
# (on a fresh machine the start otherwise waits on thousands of small reads one after another; dsvl2.startup.prefetch).
from dsvl2 import settings
from dsvl2.startup import prefetch

if settings.device_name() == "cuda" and "prefetch" not in settings.startup_skipped():  # as setup() reads them
    prefetch.start()  # step 0 of dsvl2.startup.sequence

import asyncio
import time
from pathlib import Path as LocalPath

import coglet
from cog import BaseRunner, ConcatenateIterator, Input, Path, streaming

from dsvl2.errors import CheckpointError
from dsvl2.serving import service
from dsvl2.serving.engine import Engine
from dsvl2.serving.service import log
from dsvl2.startup.download import ensure_checkpoint
from dsvl2.startup.sequence import phase

MAX_PROMPT_CHARS = 100_000  # far beyond the 4096-token context; refused before it is tokenized
REPO_ID = "deepseek-ai/deepseek-vl2-small"


class Runner(BaseRunner):
    def setup(self) -> None:
        """Load DeepSeek-VL2-small (bfloat16 on the GPU) and warm it up (compiled, graphs captured)."""
        started = time.perf_counter()
        settings.use_compile_cache()
        config = settings.engine_config()
        log(f"setup: device {config.device}, dtype {str(config.dtype).removeprefix('torch.')}")
        self.served = coglet.server.active  # over HTTP, coglet checks the inputs against the schema
        self.local_files = settings.local_files_allowed(served=self.served, log=log)
        with phase(log, "checkpoint"):
            checkpoint = find_checkpoint()
        try:
            # On the GPU the weights stream in while warm-up compiles (the load is disk-bound, compilation
            # CPU-bound); the warm-up's final step waits for the load to finish.
            self.engine = Engine.from_pretrained(checkpoint, config, log=log)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}\nThe checkpoint in {checkpoint} cannot be loaded. Point {settings.WEIGHTS_ENV} at a "
                f"complete DeepSeek-VL2-small checkpoint, or empty that directory so that setup "
                f"downloads {REPO_ID} into it."
            ) from e
        log(f"setup: ready in {time.perf_counter() - started:.1f}s")
        log(settings.concurrency_summary(self.engine.slots))

    @streaming
    async def run(
        self,
        image: Path = Input(description="Input image", accept="image/*"),
        prompt: str = Input(
            description="Text prompt. Refer to the images with <image> tags, in order (image, image2, "
            "...); without tags, the images come before the text.",
            max_length=MAX_PROMPT_CHARS,
        ),
        top_p: float = Input(
            description="Nucleus sampling: sample from the most probable tokens whose probabilities "
            "add up to top_p",
            default=0.9,
            ge=0.0,
            le=1.0,
        ),
        temperature: float = Input(
            description="Sampling temperature; 0 means greedy decoding", default=0.1, ge=0.0, le=1.0
        ),
        max_length_tokens: int = Input(
            description="Maximum number of new tokens to generate (prompt and answer together fit "
            "in 4096 tokens)",
            default=2048,
            ge=1,
            le=4096,
        ),
        repetition_penalty: float = Input(
            description="Penalty for tokens already in the text (1 = none); not used when "
            "temperature is 0",
            default=1.1,
            ge=0.01,
            le=2.0,
        ),
        seed: int | None = Input(
            description="Random seed for reproducible sampling; leave empty for a random one",
            default=None,
            ge=0,
            le=2**32 - 1,
        ),
        top_k: int = Input(
            description="Sample from the top_k most probable tokens only; 0 means no limit",
            default=50,
            ge=0,
        ),
        image2: Path | None = Input(description="Optional second image", default=None, accept="image/*"),
        image3: Path | None = Input(description="Optional third image", default=None, accept="image/*"),
        image4: Path | None = Input(description="Optional fourth image", default=None, accept="image/*"),
    ) -> ConcatenateIterator[str]:
        """Answer a prompt about one or more images, streaming the text as it is generated."""
        # First: locals() holds just the inputs.
        args = service.check_inputs(Runner.run, locals(), self.local_files, schema_checked=self.served)
        scope = self.scope  # this prediction's: the generator runs on another thread, outside its context
        started = time.perf_counter()
        request = await asyncio.to_thread(service.build_request, self.engine, args)  # off the event loop
        scope.record_metric("input_token_count", request.stats.prompt_tokens)
        return service.stream(self.engine, request, scope, time.perf_counter() - started)


def find_checkpoint() -> LocalPath:
    """The checkpoint directory; the official checkpoint is downloaded there if it holds none."""
    directory, source = settings.checkpoint_dir()
    if (directory / "config.json").is_file():
        log(f"setup: checkpoint {directory} ({source})")
        return directory
    log(f"setup: no checkpoint in {directory} ({source}); downloading {REPO_ID}")
    return ensure_checkpoint(directory, repo_id=REPO_ID, log=log)
