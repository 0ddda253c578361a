"""The model against independent truth: the reference's golden outputs, transformers' DeepseekV2,
closed-form token counts, and invariants (cached decode = full forward, fast path = plain path)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _transformers_reference import deepseek_v2_reference

from dsvl2.inputs.images import load_image
from dsvl2.inputs.processor import image_token_count
from dsvl2.model.loader import load_model
from dsvl2.model.moe import MoE, set_impl
from dsvl2.model.tiny import build_random_checkpoint
from dsvl2.serving.engine import Engine, EngineConfig
from dsvl2.serving.sampling import SamplingParams

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
CASES = json.loads((GOLDEN / "golden.json").read_text())["cases"]
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=50, repetition_penalty=1.0, seed=0)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def golden_engine() -> Engine:
    return Engine.from_pretrained(GOLDEN / "checkpoint", EngineConfig(device="cpu"), log=lambda s: None)


def _images(case: dict) -> list:
    return [load_image(GOLDEN / "images" / name) for name in case["images"]]


@pytest.mark.parametrize("case", CASES, ids=[c["prompt"][:30] for c in CASES])
def test_golden_case_python_api(golden_engine: Engine, case: dict) -> None:
    req = golden_engine.prepare(case["prompt"], _images(case), GREEDY, len(case["greedy_token_ids"]))
    enc = req.encoded
    assert enc.input_ids.tolist() == case["prompt_token_ids"]
    assert [list(c) for c in enc.spatial_crops] == case["images_spatial_crop"]
    assert enc.pixel_values.shape[0] == case["n_tiles"]
    if int(__import__("PIL").__version__.split(".")[0]) >= 13:  # the golden's resampling (see test_processor)
        assert hashlib.sha256(enc.pixel_values.numpy().astype("<f4").tobytes()).hexdigest() == case["pixels_sha256"]
    with torch.inference_mode():
        model = golden_engine.model
        emb = model.embed(enc.input_ids, enc.image_mask, enc.pixel_values, enc.spatial_crops)
        hidden = model.language.prefill(emb[None], model.language.new_cache(1))
        logits = model.language.logits(hidden[0, -1])
    diff = (logits - torch.tensor(case["last_logits"])).abs().max().item()
    assert diff < 2e-4, f"last-position logits differ from the reference by {diff}"
    text = "".join(golden_engine.stream(req))
    assert req.output_ids == case["greedy_token_ids"]
    assert text == golden_engine.processor.decode(case["greedy_token_ids"])


def test_golden_cli_json() -> None:
    case = CASES[4]  # the 3x2-tiled grounding prompt, the longest
    cmd = [sys.executable, "-m", "dsvl2", "--weights", str(GOLDEN / "checkpoint"), "--prompt", case["prompt"],
           "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32", "--json"]
    for name in case["images"]:
        cmd += ["--image", str(GOLDEN / "images" / name)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, timeout=300)
    result = json.loads(out.stdout)
    assert result["prompt_token_ids"] == case["prompt_token_ids"]
    assert result["output_token_ids"] == case["greedy_token_ids"]
    assert result["text"] == case["greedy_text"]


def test_image_token_counts_closed_form() -> None:
    # N = 211 + 14*th*(14*tw + 1): 1x1 -> 421, 3x2 -> 1415, 3x3 -> 2017, 1x9 -> 2101 (the largest).
    assert image_token_count(1, 1) == 421
    assert image_token_count(3, 2) == 1415
    assert image_token_count(3, 3) == 2017
    assert max(image_token_count(w, h) for w in range(1, 10) for h in range(1, 10) if w * h <= 9) == 2101


@pytest.fixture(scope="module")
def alt_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("alt") / "ckpt", preset="alt", seed=3, std=0.2)


def test_alt_shape_matches_transformers_deepseek_v2(alt_checkpoint: Path) -> None:
    """An independent implementation of the language model agrees on a checkpoint of another shape."""
    model = load_model(alt_checkpoint, "cpu", torch.float32)
    hf = deepseek_v2_reference(alt_checkpoint)
    ids = torch.randint(0, hf.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = hf(ids).logits[0]
        cache = model.language.new_cache(1, 512)
        ours = model.language.logits(model.language.prefill(model.language.model.embed_tokens(ids), cache)[0])
    diff = (ref - ours).abs().max().item()
    assert diff < 2e-4, f"transformers' DeepseekV2 and ours differ by {diff} (logits up to {ref.abs().max():.1f})"


@pytest.mark.parametrize("preset_fixture", ["alt_checkpoint"])
def test_cached_decode_equals_full_forward(preset_fixture: str, request: pytest.FixtureRequest) -> None:
    model = load_model(request.getfixturevalue(preset_fixture), "cpu", torch.float32)
    lm = model.language
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = lm.logits(lm.prefill(lm.model.embed_tokens(ids), lm.new_cache(2, 64)))  # [2, 40, V]
        cache = lm.new_cache(2, 64)
        lm.prefill(lm.model.embed_tokens(ids[:, :30]), cache)
        for t in range(30, 40):
            step = lm.decode(ids[:, t], torch.full((2,), t), cache)
            assert (step - full[:, t]).abs().max().item() < 1e-4, f"position {t}"
        # A chunked prefill continuing from a filled cache gives the same as one pass.
        cache = lm.new_cache(2, 64)
        lm.prefill(lm.model.embed_tokens(ids[:, :25]), cache)
        rest = lm.logits(lm.prefill(lm.model.embed_tokens(ids[:, 25:]), cache, start=25))
        assert (rest - full[:, 25:]).abs().max().item() < 1e-4


def test_fast_moe_path_equals_plain_loop(alt_checkpoint: Path) -> None:
    model = load_model(alt_checkpoint, "cpu", torch.float32)
    lm = model.language
    ids = torch.randint(0, 500, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        fast = lm.logits(lm.prefill(lm.model.embed_tokens(ids), lm.new_cache(1, 64)))
        set_impl(lm, "loop")
        plain = lm.logits(lm.prefill(lm.model.embed_tokens(ids), lm.new_cache(1, 64)))
    assert (fast - plain).abs().max().item() < 1e-5


def test_engine_fast_and_plain_paths_generate_the_same(alt_checkpoint: Path) -> None:
    img = load_image(GOLDEN / "images" / "gradient_1000x333.png")
    outs = []
    for impl in ("grouped", "loop"):
        engine = Engine.from_pretrained(alt_checkpoint, EngineConfig(device="cpu", moe_impl=impl), log=lambda s: None)
        assert {m.impl for m in engine.model.modules() if isinstance(m, MoE)} == {impl}
        req = engine.prepare("Describe the image.", [img], GREEDY, 24)
        list(engine.stream(req))
        outs.append(req.output_ids)
    assert outs[0] == outs[1] and len(outs[0]) > 0
