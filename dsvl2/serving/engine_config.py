"""How an engine runs: ``EngineConfig``, given to ``Engine`` when it is built and read from nowhere else.

The engine reads no environment variable: the service (predict.py) and the command line build their config with
``dsvl2.settings.engine_config``, tests and benchmarks build theirs directly. The model's own shapes are
``dsvl2.model.config.ModelConfig``'s, from the checkpoint.

Two of its fields set process-wide state when an engine is built: ``batch_invariant`` and ``pdl`` choose how the
decode kernels launch (``kernels.launch``: one choice per process, the last engine's). ``moe_impl`` is the engine's
model's own. A knob still outside this object: the GPU profile (``DSVL2_EMULATE_GPU``, read by dsvl2.gpus).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLOT_CEILING = 64  # the largest batch the decode graphs and kernels are built for
# The start-up's optional mechanisms (dsvl2.startup.sequence says what each does); all in use by default.
STARTUP_MECHANISMS = ("prefetch", "read_ahead", "switch_interval", "bundle", "quick_autotune")


@dataclass(frozen=True)
class EngineConfig:
    """Everything left as ``None`` follows the device: on a GPU bfloat16, CUDA graphs, compilation and the
    background load; on the CPU float32 and none of them. The fields are resolved when the config is made."""

    device: str = "cuda"
    dtype: torch.dtype | None = None
    cuda_graphs: bool | None = None  # decode, prefill and vision tower replayed from captured graphs
    compile: bool | None = None  # regional torch.compile of the decoder layers and vision blocks
    background_load: bool | None = None  # the weights stream in while the warm-up compiles; generation waits
    slots: int | None = None  # requests decoded together; None: as many full-context caches as fit (1 on the CPU)
    batch_invariant: bool = True  # a request's tokens do not depend on what else is in its batch (7 % slower alone)
    pdl: bool = True  # decode kernels launched with programmatic dependent launch where supported (sm90+)
    moe_impl: str = "grouped"  # routed experts: "grouped" (kernels, grouped products) or "loop" (plain, one by one)
    stream_interval: float = 0.03  # seconds between two text chunks of a stream, after its first
    warmup: bool = False  # ``Engine.from_pretrained`` compiles, captures and runs a request before it returns
    startup: frozenset[str] = frozenset(STARTUP_MECHANISMS)  # the start-up mechanisms in use
    load_workers: int = 1  # shards copied side by side by a background load

    def __post_init__(self) -> None:
        on_gpu = torch.device(self.device).type == "cuda"
        defaults = {"dtype": torch.bfloat16 if on_gpu else torch.float32, "cuda_graphs": on_gpu, "compile": on_gpu,
                    "background_load": on_gpu}
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        slots = self.slots
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int)
                                  or not 1 <= slots <= SLOT_CEILING):
            raise ValueError(f"slots must be an integer from 1 to {SLOT_CEILING}, got {slots!r}")
        if self.moe_impl not in ("grouped", "loop"):
            raise ValueError(f"moe_impl must be 'grouped' or 'loop', got {self.moe_impl!r}")
        unknown = set(self.startup) - set(STARTUP_MECHANISMS)
        if unknown:
            raise ValueError(f"unknown start-up mechanism(s) {sorted(unknown)}: use {', '.join(STARTUP_MECHANISMS)}")
        object.__setattr__(self, "startup", frozenset(self.startup))
        if isinstance(self.load_workers, bool) or not isinstance(self.load_workers, int) or self.load_workers < 1:
            raise ValueError(f"load_workers must be an integer >= 1, got {self.load_workers!r}")
        if not self.stream_interval >= 0:
            raise ValueError(f"stream_interval must be >= 0 seconds, got {self.stream_interval!r}")
