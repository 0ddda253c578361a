"""Shared by the interpreted kernel scripts: the kernels as launched with programmatic dependent launch or not, and a
random tiny language model."""

from __future__ import annotations

import contextlib
from unittest import mock

import triton
import triton.language as tl  # noqa: F401 - must be visible to the jit function below

from dsvl2 import kernels
from dsvl2.model.config import LanguageConfig
from dsvl2.model.language import LanguageModel


@triton.jit
def _no_op():
    pass


@contextlib.contextmanager
def launch_mode(pdl: bool):
    """The kernels as launched with programmatic dependent launch (their whole-row prefetch variants; the
    grid-dependency instructions themselves are no-ops here) or the ordinary way."""
    if not pdl:
        yield
        return
    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(kernels.launch, "pdl_args", lambda t: {"USE_PDL": True}))
        for module in (kernels.attention, kernels.linear, kernels.norm, kernels.moe, kernels.moe_experts):
            patches.enter_context(mock.patch.object(module, "gdc_wait", _no_op))
            patches.enter_context(mock.patch.object(module, "gdc_launch_dependents", _no_op))
        yield


def random_language_model(cfg: LanguageConfig) -> LanguageModel:
    """A float32 language model of ``cfg`` with random weights (norm weights near 1), fused, its rotary table built."""
    lm = LanguageModel(cfg)
    for name, p in lm.named_parameters():
        p.data.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.08)
    for module in lm.modules():
        if hasattr(module, "fuse"):
            module.fuse()
    lm.init_buffers()
    return lm
