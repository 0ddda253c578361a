"""The generation engine's request API: ``prepare`` checks a request on the CPU, before any GPU work; ``stream``
hands it to the scheduler (``scheduler``: continuous batching on one thread that owns the GPU) and yields its text.
The model's computations and static buffers are the runner's (``runner``). How an engine comes up (load, compile,
warm-up) is ``engine_startup``'s; its settings are an ``EngineConfig`` (``engine_config``).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .. import gpus, kernels
from ..errors import InputError, PromptTooLong
from ..inputs.processor import Encoded, Processor
from ..model import moe
from ..model.config import ModelConfig
from ..model.deepseek_vl2 import DeepseekVL2
from ..startup import compile_bundle
from .detokenize import StreamDecoder
from .engine_config import SLOT_CEILING, EngineConfig
from .engine_startup import EngineStartup
from .runner import Runner
from .sampling import SamplingParams, validate_params
from .scheduler import GenerationStats, Scheduler
from .stream import Stream

__all__ = ["Engine", "EngineConfig", "GenerationStats", "Request"]


@dataclass
class Request:
    encoded: Encoded
    params: SamplingParams
    max_new_tokens: int
    seed: int = 0
    output_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


ACTIVATION_RESERVE = 4 << 30  # GPU memory kept free beside the caches: prefill activations, graphs, the allocator's


def fitting_slots(cfg: ModelConfig, dtype: torch.dtype, free_bytes: int) -> int:
    """How many requests' full-context latent caches fit in ``free_bytes`` beside the activation reserve (plus the
    prefill's scratch row)."""
    c = cfg.language
    per_slot = c.num_hidden_layers * c.max_position_embeddings * (c.kv_lora_rank + c.qk_rope_head_dim)
    per_slot *= torch.empty(0, dtype=dtype).element_size()
    return max(0, (free_bytes - ACTIVATION_RESERVE) // per_slot - 1)


class Engine(EngineStartup):
    """The request API: ``prepare`` checks a request on the CPU, ``stream`` hands it to the scheduler and yields its
    text; start-up (``from_pretrained``, ``warmup``) is ``EngineStartup``'s. How it runs is ``config``'s
    (``EngineConfig``; by default the model's device and dtype, the rest following the device)."""

    def __init__(self, model: DeepseekVL2, processor: Processor, config: EngineConfig | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.config = config = config or EngineConfig(device=str(model.device), dtype=model.dtype)
        self.model = model
        self.processor = processor
        self.log = log
        self.device = model.device
        self.context = model.cfg.language.max_position_embeddings
        self.eos_id = processor.eos_id
        self.use_compile = config.compile
        self.stream_interval = config.stream_interval
        kernels.launch.set_batch_invariant(config.batch_invariant)  # process-wide: which decode kernels (see there)
        kernels.launch.set_pdl(config.pdl)  # process-wide too
        moe.set_impl(model, config.moe_impl)
        self.slots = self._choose_slots(config.slots)
        self.runner = Runner(model, self.slots, log, config.cuda_graphs)
        drop = {processor.bos_id, self.eos_id, processor.pad_id}
        self.scheduler = Scheduler(self.runner, lambda: StreamDecoder(processor.tokenizer, drop), self.eos_id, log,
                                   recover=lambda: self._drop_compiled(("forward",)))
        # Where warm-up looks for a compile bundle of this GPU and software (dsvl2.startup.compile_bundle), in order.
        self.bundle_dirs: list[Path] = [compile_bundle.SHIPPED]

    def _choose_slots(self, slots: int | None) -> int:
        if slots is not None:  # checked by EngineConfig
            return slots
        if self.device.type != "cuda":
            return 1
        # The free memory, or an emulated GPU's (DSVL2_EMULATE_GPU: the service sized as on an L40S or an A100).
        free, total = gpus.usable_memory(self.device), gpus.profile(self.device).total_memory
        fit = fitting_slots(self.model.cfg, self.model.dtype, free)
        if fit < 1:
            raise RuntimeError(
                f"the GPU has {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after the weights: not enough "
                f"for one request's {self.context}-token cache beside the {ACTIVATION_RESERVE / 2**30:.0f} GiB "
                "kept for activations; use a GPU with more memory")
        chosen = min(fit, SLOT_CEILING)
        self.log(f"{chosen} batch slots: {free / 2**30:.1f} GiB free after the weights holds {fit} full-context "
                 f"caches (at most {SLOT_CEILING})")
        return chosen

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
                f"the prompt is {n} tokens (text plus {sum(encoded.num_image_tokens)} image tokens) "
                f"but the model's context is {self.context} tokens, and at least one must be left for the answer; "
                "use fewer or smaller images or a shorter prompt")
        if n + max_new_tokens > self.context:
            cut = self.context - n
            self.log(f"max_new_tokens {max_new_tokens} cut to {cut}: prompt {n} + answer must fit in {self.context}")
            max_new_tokens = cut
        seed = secrets.randbits(63) if params.seed is None else params.seed  # drawn here so that it can be logged
        return Request(encoded, params, max_new_tokens, seed=seed,
                       stats=GenerationStats(prompt_tokens=n))

    # ---- generation ----
    def stream(self, req: Request, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield text chunks as tokens arrive (the first at once, then at most one per ``stream_interval``); stops
        at eos, at max_new_tokens, when ``cancel`` is set or when the caller stops reading. The request runs in
        the scheduler's batch beside any others; its ``stats`` are its own."""
        self.wait_loaded()
        yield from self.stream_loading(req, cancel)

    def stream_loading(self, req: Request, cancel: threading.Event | None = None) -> Iterator[str]:
        """``stream`` without waiting for a background load: the warm-up's requests, on weights still loading."""
        cancel = cancel or threading.Event()
        active = self.scheduler.submit(req, cancel)
        try:
            yield from Stream(active.out, self.stream_interval)
        finally:
            cancel.set()  # the reader is gone: the scheduler drops the request within a step

    def close(self) -> None:
        """Wait for the scheduler's thread to end (after what it runs): before the process exits."""
        self.scheduler.close()

    def generate(self, req: Request, cancel: threading.Event | None = None) -> str:
        """The whole answer of ``req`` at once."""
        return "".join(self.stream(req, cancel))
