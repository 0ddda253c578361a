"""The start-up sequence (dsvl2.startup.sequence): its order, its optional mechanisms, its threads and what it changes
for the whole process; and how the service's settings choose the mechanisms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dsvl2 import settings
from dsvl2.model import loader
from dsvl2.serving.engine import Engine, EngineConfig
from dsvl2.serving.engine_config import STARTUP_MECHANISMS
from dsvl2.startup import prefetch, sequence


def _config(**kw) -> EngineConfig:
    return EngineConfig(device="cpu", background_load=True, **kw)


def test_background_load_with_a_short_switch_interval_put_back_after(tiny_checkpoint: Path, monkeypatch) -> None:
    seen: dict[str, object] = {}
    real = loader.load_into

    def load_into(model, ckpt, log, workers, read_ahead):
        seen.update(interval=sys.getswitchinterval(), workers=workers, read_ahead=read_ahead)
        real(model, ckpt, log=log, workers=workers, read_ahead=read_ahead)

    monkeypatch.setattr(loader, "load_into", load_into)
    before = sys.getswitchinterval()
    engine = Engine.from_pretrained(tiny_checkpoint, _config(load_workers=2), log=lambda s: None)
    engine.wait_loaded()
    assert seen == {"interval": sequence.LOAD_SWITCH_INTERVAL, "workers": 2, "read_ahead": True}
    assert sys.getswitchinterval() == before and engine.pending_load is None

    seen.clear()
    engine = Engine.from_pretrained(tiny_checkpoint, _config(startup=set(STARTUP_MECHANISMS) - {"switch_interval"}),
                                    log=lambda s: None)
    engine.wait_loaded()
    assert seen["interval"] == before


def test_a_mechanism_left_out_does_not_run(tiny_checkpoint: Path, monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(prefetch, "start_read_ahead", lambda paths, streams=1: calls.append("read_ahead") or [])
    monkeypatch.setattr(Engine, "load_compile_bundle", lambda self: calls.append("bundle"))
    monkeypatch.setattr(Engine, "compile", lambda self: calls.append("compile"))
    monkeypatch.setattr(Engine, "or_eager", lambda self, step: calls.append(step.__name__))
    monkeypatch.setattr(Engine, "final_request", lambda self, started: calls.append("final_request"))
    monkeypatch.setattr(loader, "load_into", lambda model, ckpt, log, workers, read_ahead: calls.append(
        f"load read_ahead={read_ahead}"))

    config = _config(compile=True, warmup=True)
    logs: list[str] = []
    Engine.from_pretrained(tiny_checkpoint, config, log=logs.append)
    assert any(line.startswith("compile caches during the warm-up: graphs ") for line in logs), logs
    assert calls == ["read_ahead", "load read_ahead=True", "bundle", "compile", "warm_requests", "capture",
                     "final_request"]
    calls.clear()
    config = _config(compile=True, warmup=True, startup=set(STARTUP_MECHANISMS) - {"read_ahead", "bundle"})
    Engine.from_pretrained(tiny_checkpoint, config, log=lambda s: None)
    assert calls == ["load read_ahead=False", "compile", "warm_requests", "capture", "final_request"]


def test_a_failed_background_load_is_raised_where_it_is_waited_for() -> None:
    def fail() -> None:
        raise OSError("disk gone")

    task = sequence.Task("test", fail)
    with pytest.raises(OSError, match="disk gone"):
        task.join()
    done = sequence.Task("test", lambda: None)
    done.join()
    assert not done.thread.is_alive() and done.error is None


def test_the_config_names_only_known_mechanisms() -> None:
    assert EngineConfig(device="cpu").startup == frozenset(STARTUP_MECHANISMS)
    with pytest.raises(ValueError, match="unknown start-up mechanism.*precompile"):
        EngineConfig(device="cpu", startup={"prefetch", "precompile"})
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="load_workers"):
            EngineConfig(device="cpu", load_workers=bad)


def test_settings_leave_out_mechanisms_and_check_the_names(monkeypatch) -> None:
    monkeypatch.delenv(settings.SKIP_ENV, raising=False)
    monkeypatch.delenv(settings.LOAD_WORKERS_ENV, raising=False)
    assert settings.startup_mechanisms() == frozenset(STARTUP_MECHANISMS) and settings.load_workers() == 1
    monkeypatch.setenv(settings.SKIP_ENV, " prefetch, bundle ")
    assert settings.startup_mechanisms() == frozenset(STARTUP_MECHANISMS) - {"prefetch", "bundle"}
    monkeypatch.setenv(settings.SKIP_ENV, "prefetch,compile_workers")
    with pytest.raises(RuntimeError, match="unknown compile_workers; the start-up mechanisms are prefetch"):
        settings.startup_mechanisms()
    for raw, ok in (("4", True), ("0", False), ("17", False), ("two", False)):
        monkeypatch.setenv(settings.LOAD_WORKERS_ENV, raw)
        if ok:
            assert settings.load_workers() == 4
        else:
            with pytest.raises(RuntimeError, match=f"{settings.LOAD_WORKERS_ENV}='{raw}'.*1 to 16"):
                settings.load_workers()
