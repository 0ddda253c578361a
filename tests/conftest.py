"""Fixtures shared by several test modules (keep this file small)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint in the official layout, built once per test session."""
    from dsvl2.model.tiny import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint", preset="demo", seed=0)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The real coglet server, started once for a test module (tests/coglet_server.py; a module may define its own)."""
    from coglet_server import running_server

    yield from running_server(tiny_checkpoint, tmp_path_factory)
