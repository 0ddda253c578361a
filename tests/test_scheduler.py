"""Continuous batching in-process, on the CPU: many requests through one scheduler give each exactly what it gets
alone (greedy and seeded sampling, every sampler mode side by side), rows are reused as requests leave, a cancel
or a failure ends one request only, and requests beyond the slots wait."""

import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dsvl2.serving.engine import Engine, EngineConfig
from dsvl2.serving.runner import batch_buckets
from dsvl2.serving.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "<image>\nWhat is shown?"


def _image(w: int = 96, h: int = 64, colour=(200, 120, 40)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    logs: list[str] = []
    config = EngineConfig(device="cpu", slots=4, stream_interval=0)
    e = Engine.from_pretrained(tiny_checkpoint, config, log=logs.append)
    e.logs = logs
    return e


# A mix: greedy, seeded samples in each sampler mode ("top": top_k <= 64, "full": top_k 0 or > 64), different
# images, prompts and lengths.
CASES = [
    (GREEDY, (96, 64), "What is shown?", 20),
    (SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=11), (300, 200), "Describe it.", 17),
    (SamplingParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.3, seed=5), (64, 64), "Colours?", 23),
    (GREEDY, (500, 120), "Count.", 9),
    (SamplingParams(temperature=0.7, top_p=0.8, top_k=100, seed=3), (120, 500), "Tell a story.", 26),
    (SamplingParams(temperature=0.5, top_k=10, seed=99), (96, 64), "Shapes?", 14),
]


def _request(engine: Engine, case):
    params, size, text, n = case
    return engine.prepare(f"<image>\n{text}", [_image(*size)], params, n)


def _alone(engine: Engine, case) -> list[int]:
    req = _request(engine, case)
    engine.generate(req)
    return req.output_ids


def _together(engine: Engine, cases) -> list:
    reqs = [_request(engine, c) for c in cases]
    texts = [None] * len(reqs)

    def run(i: int) -> None:
        texts[i] = engine.generate(reqs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return reqs, texts


def test_each_request_gets_alone_what_it_gets_beside_others(engine: Engine) -> None:
    alone = [_alone(engine, c) for c in CASES]
    steps = engine.scheduler.steps
    reqs, texts = _together(engine, CASES)  # 6 requests on 4 slots: two wait, rows are reused
    assert [r.output_ids for r in reqs] == alone
    for r, text in zip(reqs, texts, strict=True):
        assert text == engine.processor.decode(r.output_ids)
        assert r.stats.output_tokens == len(r.output_ids) and r.stats.finish_reason in ("stop", "length")
    # Batched for real: fewer steps than the requests' tokens one at a time.
    assert engine.scheduler.steps - steps < sum(len(ids) for ids in alone)


def test_rows_are_packed_and_buckets_are_powers_of_two() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]


def test_cancelling_one_request_stops_it_and_leaves_the_others(engine: Engine) -> None:
    long = (GREEDY, (96, 64), "Tell a long story.", 400)
    others = [CASES[1], CASES[3]]
    expected = [_alone(engine, c) for c in others]
    victim = _request(engine, long)
    cancel = threading.Event()
    got = []

    def run_victim() -> None:
        for _ in engine.stream(victim, cancel):
            got.append(len(victim.output_ids))
            if len(victim.output_ids) >= 5:
                cancel.set()
                at = len(victim.output_ids)
                got.append(at)

    t = threading.Thread(target=run_victim)
    t.start()
    reqs, _ = _together(engine, others)
    t.join(60)
    assert [r.output_ids for r in reqs] == expected
    assert victim.stats.finish_reason == "cancelled" or len(victim.output_ids) < 400
    # Stopped within a step or two of the cancel (the reader may be a chunk behind the scheduler).
    assert len(victim.output_ids) <= got[-1] + 3


def test_a_reader_that_stops_reading_frees_its_row(engine: Engine) -> None:
    req = _request(engine, (GREEDY, (96, 64), "Tell a long story.", 400))
    stream = engine.stream(req)
    next(stream)
    stream.close()  # what a generator's close does when coglet or a client lets go of it
    for _ in range(200):
        if req.stats.finish_reason:
            break
        threading.Event().wait(0.01)
    assert req.stats.finish_reason == "cancelled"
    assert _alone(engine, CASES[0]) == _alone(engine, CASES[0])  # and the engine serves on


def test_a_failing_prefill_fails_that_request_only(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _alone(engine, CASES[0])
    real = engine.runner.prefill

    def prefill(enc, row):
        if len(enc.input_ids) == bad_len:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(enc, row)

    bad = _request(engine, (GREEDY, (1000, 1000), "Big.", 5))
    bad_len = len(bad.encoded.input_ids)
    monkeypatch.setattr(engine.runner, "prefill", prefill)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(MemoryError, match="ran out of memory for this request"):
        engine.generate(bad)
    assert bad.stats.finish_reason == "error"
    assert _alone(engine, CASES[0]) == expected


def test_one_token_and_immediate_eos(engine: Engine) -> None:
    req = _request(engine, (GREEDY, (96, 64), "Hi", 1))
    engine.generate(req)
    assert len(req.output_ids) == 1 and req.stats.finish_reason == "length"


def test_metrics_are_each_requests_own(engine: Engine) -> None:
    reqs, _ = _together(engine, CASES[:4])
    for r, case in zip(reqs, CASES[:4], strict=True):
        assert r.stats.prompt_tokens == len(r.encoded.input_ids)
        assert r.stats.output_tokens == len(r.output_ids) <= case[3]
        assert r.stats.time_to_first_token_s > 0
    assert len({r.stats.prompt_tokens for r in reqs}) > 1  # the premise: different prompts


def test_slots_must_be_sane(tiny_checkpoint: Path) -> None:
    for bad in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match="slots must be an integer from 1 to 64"):
            EngineConfig(device="cpu", slots=bad)


def test_a_failing_step_fails_its_requests_and_the_loop_serves_on(engine: Engine,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _alone(engine, CASES[0])
    real = engine.runner.step

    def broken(mode, rows):
        raise RuntimeError("simulated step failure")

    monkeypatch.setattr(engine.runner, "step", broken)
    req = _request(engine, (GREEDY, (96, 64), "Tell a long story.", 50))
    with pytest.raises(RuntimeError, match="simulated step failure"):
        engine.generate(req)
    assert req.stats.finish_reason == "error"
    monkeypatch.setattr(engine.runner, "step", real)
    assert _alone(engine, CASES[0]) == expected


def test_an_idle_scheduler_thread_ends_and_the_next_request_starts_another(engine: Engine,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import dsvl2.serving.scheduler

    expected = _alone(engine, CASES[0])
    monkeypatch.setattr(dsvl2.serving.scheduler, "IDLE_EXIT_S", 0.05)
    _alone(engine, CASES[3])  # the loop now waits 0.05 s for more work, then ends
    for _ in range(200):
        if engine.scheduler._thread is None:
            break
        threading.Event().wait(0.01)
    assert engine.scheduler._thread is None
    assert _alone(engine, CASES[0]) == expected


def test_close_ends_the_scheduler_thread_at_once_and_a_later_request_runs(engine: Engine) -> None:
    # The command line closes the engine before it exits: the thread must be gone then, not IDLE_EXIT_S later.
    expected = _alone(engine, CASES[0])
    thread = engine.scheduler._thread
    assert thread is not None and thread.is_alive()
    t0 = time.monotonic()
    engine.close()
    assert not thread.is_alive() and time.monotonic() - t0 < 5
    engine.close()  # nothing running: a no-op
    assert _alone(engine, CASES[0]) == expected
