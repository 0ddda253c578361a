"""Every shape the config accepts runs exactly; every shape the code cannot run is refused at load, by name.

A matrix of tiny checkpoints in the official layout (``tiny.build_random_checkpoint`` with overrides), each
loaded through the real loader, checked against itself (cached decode = full forward), against transformers'
DeepseekV2, and run whole with an image. The first case is the shape of issue 13: value heads wider than the
query/key heads (3 heads of v 40 against qk 32) failed in every prefill.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from _transformers_reference import deepseek_v2_reference
from PIL import Image
from safetensors.torch import load_file, save_file

from dsvl2.errors import CheckpointError
from dsvl2.inputs.processor import Processor
from dsvl2.model.deepseek_vl2 import DeepseekVL2
from dsvl2.model.loader import load_model
from dsvl2.model.tiny import build_random_checkpoint, write_processor_files


def _lang(**values) -> dict:
    if "num_attention_heads" in values:
        values["num_key_value_heads"] = values["num_attention_heads"]
    return {"language": values}


def _vision(width: int, heads: int, **language) -> dict:
    """A vision tower of another width; the projector follows it (and the language width, if given)."""
    projector = {"input_dim": width, **({"n_embed": language["hidden_size"]} if "hidden_size" in language else {})}
    return {"vision": {"width": width, "heads": heads, "layers": 1}, "projector": projector, **_lang(**language)}


# Overrides of the "demo" preset: hidden 64, 4 heads of qk 16 + 8 (rope) and v 16, rank 32, 3 layers (the first
# dense), 8 experts top-3 with 2 shared, vision width 64 with 4 heads.
CASES: dict[str, dict] = {
    "issue13_v_wider_3_heads": _lang(num_attention_heads=3, qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=40),
    "v_wider": _lang(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=24),
    "v_narrower": _lang(qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=8),
    "5_heads": _lang(num_attention_heads=5, v_head_dim=12),
    "rope_4": _lang(qk_rope_head_dim=4),
    "rope_64": _lang(qk_rope_head_dim=64, qk_nope_head_dim=8, v_head_dim=8),
    "no_nope": _lang(qk_nope_head_dim=0),
    "1_shared_expert": _lang(n_shared_experts=1),
    "0_shared_experts": _lang(n_shared_experts=0),
    "null_shared_experts": _lang(n_shared_experts=None),
    "top_k_all_experts": _lang(n_routed_experts=4, num_experts_per_tok=4),
    "1_layer_dense": _lang(num_hidden_layers=1, first_k_dense_replace=1),
    "1_layer_moe": _lang(num_hidden_layers=1, first_k_dense_replace=0),
    "2_layers_dense_first": _lang(num_hidden_layers=2),
    "4_layers_all_moe": _lang(num_hidden_layers=4, first_k_dense_replace=0, kv_lora_rank=12),
    "null_routed_experts_all_dense": _lang(num_hidden_layers=2, n_routed_experts=None, num_experts_per_tok=None),
    "moe_every_2nd_layer": _lang(num_hidden_layers=4, moe_layer_freq=2),  # not in transformers' DeepseekV2
    "vision_48x3": _vision(48, 3),
    "vision_32x1_hidden_96": _vision(32, 1, hidden_size=96, v_head_dim=32),
    "vision_72x6_v_wider": _vision(72, 6, num_attention_heads=2, v_head_dim=40),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """case -> (checkpoint directory, model loaded through the real loader in float32), built once."""
    done: dict[str, tuple[Path, DeepseekVL2]] = {}

    def get(case: str) -> tuple[Path, DeepseekVL2]:
        if case not in done:
            ckpt = build_random_checkpoint(tmp_path_factory.mktemp(case) / "ckpt", "demo", seed=7, std=0.2,
                                           n_shards=2, overrides=CASES[case])
            done[case] = ckpt, load_model(ckpt, "cpu", torch.float32)
        return done[case]

    return get


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _ids(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, 550, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_cached_decode_equals_full_forward(built, case: str) -> None:
    """Prefill, a chunked prefill continuing from the cache, then token by token: the logits of one full pass."""
    _, model = built(case)
    lm = model.language
    ids = _ids((2, 24), 1)
    with torch.inference_mode():
        full = lm.logits(lm.prefill(lm.model.embed_tokens(ids), lm.new_cache(2, 32)))  # [2, 24, V]
        cache = lm.new_cache(2, 32)
        lm.prefill(lm.model.embed_tokens(ids[:, :12]), cache)
        chunk = lm.logits(lm.prefill(lm.model.embed_tokens(ids[:, 12:18]), cache, start=12))
        steps = [lm.decode(ids[:, t], torch.full((2,), t), cache) for t in range(18, 24)]
    assert _diff(chunk, full[:, 12:18]) < 1e-5
    # Decode absorbs kv_b_proj into the query and output sides: the same sums in another order.
    assert _diff(torch.stack(steps, 1), full[:, 18:]) < 5e-5


@pytest.mark.parametrize("case", [c for c in CASES if c != "moe_every_2nd_layer"])
def test_language_model_matches_transformers(built, case: str) -> None:
    ckpt, model = built(case)
    hf = deepseek_v2_reference(ckpt)
    ids = _ids((1, 96), 2)
    with torch.inference_mode():
        ref = hf(ids).logits[0]
        lm = model.language
        ours = lm.logits(lm.prefill(lm.model.embed_tokens(ids), lm.new_cache(1, 96))[0])
    diff = _diff(ref, ours)
    assert diff < 2e-4, f"transformers' DeepseekV2 and ours differ by {diff} (logits up to {ref.abs().max():.1f})"


@pytest.fixture(scope="module")
def image_prompt(tmp_path_factory: pytest.TempPathFactory):
    """A 1x2-tiled image (three tiles) and a short question, encoded by the checkpoints' shared processor."""
    processor = Processor.from_pretrained(write_processor_files(tmp_path_factory.mktemp("processor"), "demo"))
    image = Image.linear_gradient("L").resize((300, 700)).convert("RGB")
    return processor.encode("What is in the picture?", [image])


@pytest.mark.parametrize("case", CASES)
def test_multimodal_forward_with_an_image(built, image_prompt, case: str) -> None:
    """Vision tower, projector and tile layout into the language model; the text after the image decodes from
    the cache to the full forward's logits."""
    _, model = built(case)
    enc, lm = image_prompt, model.language
    assert enc.spatial_crops == [(1, 2)]
    n = enc.input_ids.shape[0]
    with torch.inference_mode():
        embeds = model.embed(enc.input_ids, enc.image_mask, enc.pixel_values, enc.spatial_crops)[None]
        full = lm.logits(lm.prefill(embeds, lm.new_cache(1, n))[0])  # [L, V]
        cache = lm.new_cache(1, n)
        lm.prefill(embeds[:, : n - 3], cache)
        steps = [lm.decode(enc.input_ids[t:t + 1], torch.tensor([t]), cache)[0] for t in range(n - 3, n)]
    assert torch.isfinite(full).all()
    assert _diff(torch.stack(steps), full[n - 3:]) < 5e-5


@pytest.mark.parametrize("case", ["issue13_v_wider_3_heads", "v_narrower"])
def test_compiled_attention_prefill_equals_eager(built, case: str) -> None:
    """The attention's prefill compiled as the engine compiles the layers' (Inductor, a symbolic length; the engine
    prefills whole prompts from position 0) computes what the eager one does."""
    _, model = built(case)
    attn = model.language.model.layers[0].self_attn
    x = torch.randn(1, 20, model.cfg.language.hidden_size, generator=torch.Generator().manual_seed(3))
    cos_sin = model.language.rope[:20][None]
    with torch.inference_mode():
        eager = attn.prefill(x, cos_sin, model.language.new_cache(1, 32)[0], 0)
        compiled = torch.compile(attn.prefill, dynamic=True)(x, cos_sin, model.language.new_cache(1, 32)[0], 0)
    assert _diff(compiled, eager) < 1e-5


def test_no_shared_experts_loads_without_their_empty_tensors(built, tmp_path: Path) -> None:
    """Upstream writes no shared-expert tensors when n_shared_experts is null; the empty ones are not needed."""
    ckpt, model = built("null_shared_experts")
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    index = json.loads((bare / "model.safetensors.index.json").read_text())
    dropped = []
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(bare / shard)
        dropped += [k for k, t in tensors.items() if t.numel() == 0]
        save_file({k: t for k, t in tensors.items() if t.numel()}, bare / shard, metadata={"format": "pt"})
    assert dropped and all(".mlp.shared_experts." in k for k in dropped)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in dropped}
    (bare / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = dict(load_model(bare, "cpu", torch.float32).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(loaded[name], p), name


# (section, field, value): numbers the code cannot run, each refused by load_model before any tensor is read.
REFUSED = [
    ("language", "qk_rope_head_dim", 7),
    ("language", "qk_rope_head_dim", 0),
    ("language", "num_experts_per_tok", 9),
    ("language", "num_experts_per_tok", None),
    ("language", "n_routed_experts", 0),
    ("language", "moe_layer_freq", 0),
    ("language", "n_shared_experts", -1),
    ("language", "kv_lora_rank", 0),
    ("language", "v_head_dim", 0),
    ("language", "hidden_size", 64.0),
    ("language", "max_position_embeddings", 0),
    ("language", "hidden_act", "gelu"),
    ("vision", "width", 66),
    ("vision", "heads", 0),
    ("vision", "patch_size", 16),
    ("projector", "downsample_ratio", 3),
]


@pytest.mark.parametrize("section,field,value", REFUSED)
def test_unrunnable_shapes_are_refused_at_load(tmp_path: Path, section: str, field: str, value: object) -> None:
    ckpt = write_processor_files(tmp_path, "demo", {section: {field: value}})  # config.json, no weights
    with pytest.raises(CheckpointError, match=re.escape(f"unsupported {section}_config.{field}={value!r}")):
        load_model(ckpt)
