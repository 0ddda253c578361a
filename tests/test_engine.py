"""The generation engine's request rules on the CPU: context limits, seeds, streaming, stopping."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from dsvl2.errors import InputError, PromptTooLong
from dsvl2.inputs.processor import image_token_count
from dsvl2.serving.engine import Engine, EngineConfig
from dsvl2.serving.runner import sampler_mode
from dsvl2.serving.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=50, repetition_penalty=1.0, seed=0)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    logs: list[str] = []
    e = Engine.from_pretrained(tiny_checkpoint, EngineConfig(device="cpu"), log=logs.append)
    e.logs = logs
    return e


def _image(w: int = 640, h: int = 480) -> Image.Image:
    return Image.radial_gradient("L").resize((w, h)).convert("RGB")


def test_prompt_that_does_not_fit_is_refused_with_both_counts(engine: Engine) -> None:
    # Two 1:9 images tile 1x9: 2 * 2101 image tokens alone exceed the 4096-token context.
    images = [_image(400, 3600), _image(400, 3600)]
    enc = engine.processor.encode("Compare <image> and <image>.", images)
    assert enc.num_image_tokens == [image_token_count(1, 9)] * 2
    n = len(enc.input_ids)
    with pytest.raises(PromptTooLong) as err:
        engine.prepare("Compare <image> and <image>.", images, GREEDY, 10)
    message = str(err.value)
    assert f"the prompt is {n} tokens" in message and f"{2 * 2101} image tokens" in message and "4096" in message


def test_max_new_tokens_is_cut_to_what_is_left_and_logged(engine: Engine) -> None:
    req = engine.prepare("<image>\nDescribe.", [_image(1152, 1152)], GREEDY, 4096)
    left = 4096 - req.stats.prompt_tokens
    assert req.max_new_tokens == left
    assert any(f"cut to {left}" in line for line in engine.logs)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_nonsense_max_new_tokens_is_refused(engine: Engine, bad: object) -> None:
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.prepare("Hi", [_image()], GREEDY, bad)


def test_nonsense_sampling_parameters_are_refused_before_any_work(engine: Engine) -> None:
    with pytest.raises(InputError, match="repetition_penalty"):
        engine.prepare("Hi", [_image()], SamplingParams(repetition_penalty=0.0), 5)


def _generate(engine: Engine, params: SamplingParams, n: int = 24) -> tuple[list[int], str]:
    req = engine.prepare("<image>\nWhat is shown?", [_image()], params, n)
    text = "".join(engine.stream(req))
    return req.output_ids, text


def test_seed_reproduces_a_request_and_requests_without_seed_differ(engine: Engine) -> None:
    hot = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=1234)
    a, _ = _generate(engine, hot)
    b, _ = _generate(engine, hot)
    assert a == b
    c, _ = _generate(engine, SamplingParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=99))
    unseeded = [_generate(engine, SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=None))[0]
                for _ in range(2)]
    assert c != a and unseeded[0] != unseeded[1]


def test_top_p_near_zero_equals_greedy(engine: Engine) -> None:
    greedy, _ = _generate(engine, GREEDY)
    nucleus, _ = _generate(engine, SamplingParams(temperature=0.7, top_p=1e-6, top_k=50, repetition_penalty=1.0,
                                                  seed=5))
    assert nucleus == greedy


def test_stream_equals_decoding_all_ids_at_once(engine: Engine) -> None:
    ids, text = _generate(engine, SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=7), n=40)
    assert text == engine.processor.decode(ids)
    assert engine.eos_id not in ids and engine.processor.bos_id not in ids


def test_generation_stops_at_eos(engine: Engine) -> None:
    """Make eos the only choice after the first token: the answer ends there and eos is not output."""
    lm = engine.model.language
    saved = lm.lm_head.weight.clone()
    with torch.no_grad():
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[engine.eos_id] = 1.0
    try:
        req = engine.prepare("<image>\nHi", [_image()], GREEDY, 50)
        list(engine.stream(req))
    finally:
        with torch.no_grad():
            lm.lm_head.weight.copy_(saved)
    assert req.output_ids == [] and req.stats.finish_reason == "stop"


def test_cancel_stops_generation(engine: Engine) -> None:
    cancel = threading.Event()
    req = engine.prepare("<image>\nWhat is shown?", [_image()], GREEDY, 500)
    for _ in engine.stream(req, cancel):
        cancel.set()
    assert req.stats.finish_reason == "cancelled"
    assert req.stats.output_tokens < 5


def test_stats_are_filled(engine: Engine) -> None:
    req = engine.prepare("<image>\nWhat is shown?", [_image()], GREEDY, 16)
    list(engine.stream(req))
    s = req.stats
    assert s.prompt_tokens == len(req.encoded.input_ids) and s.output_tokens == len(req.output_ids)
    assert s.time_to_first_token_s > 0 and (s.tokens_per_second > 0 or s.output_tokens < 2)


def test_sampler_mode_choice() -> None:
    assert sampler_mode(SamplingParams(temperature=0.0)) == "greedy"
    assert sampler_mode(SamplingParams(temperature=0.5, top_k=50)) == "top"
    assert sampler_mode(SamplingParams(temperature=0.5, top_k=0)) == "full"
    assert sampler_mode(SamplingParams(temperature=0.5, top_k=100)) == "full"


def test_a_failing_compiled_prefill_falls_back_to_the_eager_one(engine: Engine) -> None:
    expected, _ = _generate(engine, GREEDY)
    layer = engine.model.language.model.layers[0]

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated recompilation failure")

    layer.forward = broken  # what Engine.compile installs, failing
    engine.logs.clear()
    got, _ = _generate(engine, GREEDY)
    assert got == expected
    assert "forward" not in layer.__dict__  # the compiled wrapper is gone for later requests
    assert any("compiled prefill failed (RuntimeError: simulated recompilation failure)" in line
               for line in engine.logs)


def test_a_plain_prefill_error_is_not_swallowed(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("real failure")

    monkeypatch.setattr(engine.model.language, "prefill", broken)
    with pytest.raises(RuntimeError, match="real failure"):
        _generate(engine, GREEDY)


def test_background_load_generates_what_the_plain_load_does(engine: Engine, tiny_checkpoint: Path) -> None:
    # The service's setup: weights stream into a zero-filled model while warm-up runs; afterwards the
    # engine answers exactly as one loaded synchronously.
    config = EngineConfig(device="cpu", background_load=True)
    bg = Engine.from_pretrained(tiny_checkpoint, config, log=lambda s: None)
    bg.warmup()
    for e in (engine, bg):
        e.req = e.prepare("<image>\nDescribe.", [_image()], GREEDY, 12)
        list(e.stream(e.req))
    assert bg.req.output_ids == engine.req.output_ids and len(bg.req.output_ids) > 0
    for name, p in engine.model.named_parameters():
        assert torch.equal(p, bg.model.get_parameter(name)), name


def test_background_load_error_surfaces_when_generation_waits(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    from dsvl2.errors import CheckpointError

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])  # truncated
    bg = Engine.from_pretrained(broken, EngineConfig(device="cpu", background_load=True), log=lambda s: None)
    with pytest.raises(CheckpointError, match=shard.name):
        bg.warmup()


def test_a_tokenizer_past_the_embedding_table_is_refused_at_load(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # Token ids at or past vocab_size have no embedding row: refused when loading, naming both numbers, before any
    # request could meet one (the tiny tokenizer's largest id is 566).
    import json
    import shutil

    from dsvl2.errors import CheckpointError

    small = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, small)
    raw = json.loads((small / "config.json").read_text())
    raw["language_config"]["vocab_size"] = 566
    (small / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="token ids up to 566.*vocab_size is 566"):
        Engine.from_pretrained(small, EngineConfig(device="cpu"), log=lambda s: None)


def test_padded_prefill_equals_the_prompt_alone(engine: Engine) -> None:
    # The captured prefill pads the prompt to a length bucket: the logits at the last real position are those
    # of the unpadded prompt.
    enc = engine.prepare("<image>\nDescribe.", [_image()], GREEDY, 4).encoded
    with torch.inference_mode():
        embeds = engine.model.embed(enc.input_ids, enc.image_mask, enc.pixel_values, enc.spatial_crops)
        lm = engine.model.language
        ref = lm.logits(lm.prefill(embeds[None], engine.runner.cache[:, :1])[:, -1])
        t = embeds.shape[0]
        x = torch.cat([embeds, torch.zeros(37, embeds.shape[1])])[None]
        got = engine.runner._padded_prefill(x, torch.tensor([t - 1]))
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_generation_through_the_bucketed_prefill_equals_the_plain_one(engine: Engine,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU path end to end on the CPU: a stand-in for the CUDA graph replays the padded prefill eagerly;
    # the padding's cache slots must be overwritten by decode before they are read.
    ref = engine.prepare("<image>\nDescribe.", [_image(500, 300)], GREEDY, 16)
    list(engine.stream(ref))

    runner = engine.runner
    monkeypatch.setattr("dsvl2.serving.runner.capture_graph", _fake_capture)
    monkeypatch.setattr(runner, "use_graphs", True)
    monkeypatch.setattr(runner, "prefill_graphs", {})
    monkeypatch.setattr(runner, "encode_tiles", runner.model.encode_tiles)  # vision eager
    got = engine.prepare("<image>\nDescribe.", [_image(500, 300)], GREEDY, 16)
    list(engine.stream(got))
    size, = runner.prefill_graphs
    assert size % 64 == 0 and size > ref.stats.prompt_tokens  # really padded
    assert got.output_ids == ref.output_ids and len(got.output_ids) == 16


def test_prefill_buckets_share_one_static_input(engine: Engine) -> None:
    # Each captured prefill's static input is a view of one context-long buffer, not an allocation per bucket.
    small, large = engine.runner._prefill_input(64), engine.runner._prefill_input(192)
    assert small.shape == (1, 64, engine.model.cfg.language.hidden_size) and large.shape[1] == 192
    assert small.data_ptr() == large.data_ptr() == engine.runner._prefill_buffer.data_ptr()
    assert engine.runner._prefill_buffer.numel() == engine.context * engine.model.cfg.language.hidden_size
    # Each view is laid out as a fresh [1, size, D] tensor (the compiled prefill guards on the batch stride: a
    # slice of a [1, context, D] buffer recompiled it at the first short prompt).
    assert small.is_contiguous() and large.is_contiguous() and small.stride(0) == small[0].numel()



class _FakeGraph:
    """A stand-in for a captured CUDA graph on the CPU: each replay re-runs the captured function into the
    output tensor of the capture, as a real replay refills it from the static input's current contents."""

    def __init__(self, fn, out: torch.Tensor) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())

    def pool(self) -> str:
        return "pool"


def _fake_capture(fn, pool, warmups):
    out = fn()
    return _FakeGraph(fn, out), out


def test_vision_graphs_replay_each_tile_count_with_the_new_pixels(engine: Engine,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Two images of one tile count share a captured vision graph; its static input must take each image's
    # pixels, so the answers equal the plain path's. A third image of another count gets its own graph.
    images = [_image(640, 480), Image.radial_gradient("L").rotate(90).resize((640, 480)).convert("RGB"),
              _image(300, 900)]
    expected = []
    for image in images:
        req = engine.prepare("<image>\nDescribe.", [image], GREEDY, 8)
        list(engine.stream(req))
        expected.append((req.output_ids, req.encoded.pixel_values.shape[0]))
    monkeypatch.setattr("dsvl2.serving.runner.capture_graph", _fake_capture)
    monkeypatch.setattr(engine.runner, "use_graphs", True)
    monkeypatch.setattr(engine.runner, "_graphed_prefill", lambda embeds: None)  # language model eager
    monkeypatch.setattr(engine.runner, "vision_graphs", {})
    for image, (ids, tiles) in zip(images, expected, strict=True):
        req = engine.prepare("<image>\nDescribe.", [image], GREEDY, 8)
        list(engine.stream(req))
        assert req.output_ids == ids and tiles in engine.runner.vision_graphs
    assert expected[0][1] == expected[1][1] != expected[2][1]  # the premise: two counts, one shared
    assert expected[0][0] != expected[1][0]  # the second image really changed the answer
    assert set(engine.runner.vision_graphs) == {expected[0][1], expected[2][1]}


def test_a_failed_vision_capture_falls_back_to_the_plain_tower(engine: Engine,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    req = engine.prepare("<image>\nDescribe.", [_image()], GREEDY, 8)
    list(engine.stream(req))

    def failing(fn, pool, warmups):
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr("dsvl2.serving.runner.capture_graph", failing)
    monkeypatch.setattr(engine.runner, "use_graphs", True)
    monkeypatch.setattr(engine.runner, "_graphed_prefill", lambda embeds: None)
    monkeypatch.setattr(engine.runner, "vision_graphs", {})
    monkeypatch.setattr(engine.runner, "fallbacks", type(engine.runner.fallbacks)())
    engine.logs.clear()
    got = engine.prepare("<image>\nDescribe.", [_image()], GREEDY, 8)
    list(engine.stream(got))
    assert got.output_ids == req.output_ids
    assert engine.runner.vision_graphs == {req.encoded.pixel_values.shape[0]: False}
    assert engine.runner.fallbacks.vision == 1
    assert any("capturing the vision tower for" in line and "simulated capture failure" in line
               for line in engine.logs)


def test_capture_prepares_the_vision_graph_of_every_single_image_tile_count(engine: Engine,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dsvl2.serving.runner.capture_graph", _fake_capture)
    monkeypatch.setattr(engine.runner, "use_graphs", True)
    monkeypatch.setattr(engine.runner, "decode_graphs", {})
    monkeypatch.setattr(engine.runner, "vision_graphs", {})
    engine.capture()
    # Closed form: a w x h candidate resolution gives the global view plus (w/384)*(h/384) local tiles.
    counts = {1 + (w // 384) * (h // 384) for w, h in engine.processor.config.candidate_resolutions}
    assert set(engine.runner.vision_graphs) == counts
    modes = ("greedy", "top", "full")
    assert set(engine.runner.decode_graphs) == {(m, b) for m in modes for b in engine.runner.buckets}


def test_the_config_sets_pdl_and_the_models_moe_implementation(engine: Engine) -> None:
    # EngineConfig.pdl is the kernels' launch mode (process-wide) and EngineConfig.moe_impl this engine's model's own.
    from dsvl2 import kernels
    from dsvl2.model.moe import MoE, set_impl

    def impls() -> set[str]:
        return {m.impl for m in engine.model.modules() if isinstance(m, MoE)}

    assert kernels.launch.PDL and impls() == {"grouped"}
    try:
        Engine(engine.model, engine.processor, EngineConfig(device="cpu", pdl=False, moe_impl="loop"))
        assert not kernels.launch.PDL and impls() == {"loop"}
    finally:
        kernels.launch.set_pdl(True)
        set_impl(engine.model, "grouped")
    with pytest.raises(ValueError, match="moe_impl must be 'grouped' or 'loop', got 'looped'"):
        EngineConfig(device="cpu", moe_impl="looped")
    with pytest.raises(ValueError, match="unknown MoE implementation 'fast'"):
        set_impl(engine.model, "fast")
