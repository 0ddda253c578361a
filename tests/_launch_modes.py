"""Shared by the interpreted kernel scripts: the kernels as launched with programmatic dependent launch or not."""

from __future__ import annotations

import contextlib
from unittest import mock

import triton
import triton.language as tl  # noqa: F401 - must be visible to the jit function below

from dsvl2 import kernels, moe_kernels


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
        patches.enter_context(mock.patch.object(kernels, "_pdl_args", lambda t: {"USE_PDL": True}))
        for module in (kernels, moe_kernels):
            patches.enter_context(mock.patch.object(module, "gdc_wait", _no_op))
            patches.enter_context(mock.patch.object(module, "gdc_launch_dependents", _no_op))
        yield
