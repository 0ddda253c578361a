"""Random-weight checkpoints in the official layout: tiny ones for tests and the demo, full-size for benchmarks.

The structure is always that of the real ``config.json`` (``assets/small_config.json``); presets only
shrink its numbers. Shards are written like the official release: six-digit ``-of-00000N`` names,
an index file, every expert as its own three matrices, and the unused ``vision.attn_pool.*`` head.
The tokenizer is a small byte-level BPE carrying the real special tokens (``assets/tiny_tokenizer.json``).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .deepseek_vl2 import DeepseekVL2
from .loader import allocate_model
from .moe import EXPERT_KEYS, STACKS, expert_matrix_shape

ASSETS = Path(__file__).parent / "assets"

PRESETS: dict[str, dict] = {
    # The shape of the golden tiny checkpoint.
    "demo": {
        "vision": {"width": 64, "layers": 2, "heads": 4},
        "projector": {"input_dim": 64, "n_embed": 64},
        "language": {"vocab_size": 576, "hidden_size": 64, "intermediate_size": 160, "moe_intermediate_size": 32,
                     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "n_routed_experts": 8, "num_experts_per_tok": 3, "kv_lora_rank": 32,
                     "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16},
    },
    # Another shape: other widths, head dimensions, expert counts, top-k and depth.
    "alt": {
        "vision": {"width": 48, "layers": 1, "heads": 3},
        "projector": {"input_dim": 48, "n_embed": 96},
        "language": {"vocab_size": 600, "hidden_size": 96, "intermediate_size": 200, "moe_intermediate_size": 40,
                     "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 6,
                     "n_shared_experts": 1, "n_routed_experts": 12, "num_experts_per_tok": 4, "kv_lora_rank": 24,
                     "qk_rope_head_dim": 16, "qk_nope_head_dim": 8, "v_head_dim": 12},
    },
    # The real DeepSeek-VL2-small shapes (16.1 B parameters).
    "small": {"vision": {}, "projector": {}, "language": {}},
}


def preset_config(preset: str, overrides: dict[str, dict] | None = None) -> dict:
    """The real config.json with one preset's numbers applied, then ``overrides`` (the same form as a preset:
    {"language": {"v_head_dim": 40}, ...}), for tests of other shapes."""
    raw = json.loads((ASSETS / "small_config.json").read_text())
    cfg = copy.deepcopy(raw)
    for section, values in PRESETS[preset].items():
        cfg[f"{section}_config"].update(values)
    if preset != "small":  # ids of the tiny tokenizer's special tokens
        cfg["language_config"].update(bos_token_id=556, eos_token_id=557)
    for section, values in (overrides or {}).items():
        cfg[f"{section}_config"].update(values)
    return cfg


def official_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(checkpoint key, shape) of every tensor of the official layout, in model order."""
    with torch.device("meta"):
        model = DeepseekVL2(cfg)
    for name, p in model.named_parameters():
        prefix, _, stack = name.rpartition(".")
        if stack in STACKS:
            for e in range(p.shape[0]):
                for proj, (target, _) in EXPERT_KEYS.items():
                    if target == stack:
                        yield f"{prefix}.{e}.{proj}.weight", tuple(expert_matrix_shape(stack, p.shape))
        else:
            yield name, tuple(p.shape)
    w, mlp = cfg.vision.width, cfg.vision.mlp_dim
    pool = {"latent": (1, 1, w), "q.weight": (w, w), "q.bias": (w,), "kv.weight": (2 * w, w), "kv.bias": (2 * w,),
            "proj.weight": (w, w), "proj.bias": (w,), "norm.weight": (w,), "norm.bias": (w,),
            "mlp.fc1.weight": (mlp, w), "mlp.fc1.bias": (mlp,), "mlp.fc2.weight": (w, mlp), "mlp.fc2.bias": (w,)}
    for key, shape in pool.items():
        yield f"vision.attn_pool.{key}", shape


def build_random_checkpoint(out_dir: str | Path, preset: str = "demo", seed: int = 0, std: float = 0.25,
                            n_shards: int = 3, device: str = "cpu", overrides: dict[str, dict] | None = None) -> Path:
    """Write a random-weight checkpoint (bfloat16) in the official layout and return its directory;
    ``overrides`` changes the preset's numbers (see ``preset_config``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = preset_config(preset, overrides)
    cfg = ModelConfig.from_dict(raw)
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = list(official_shapes(cfg))
    total = sum(_numel(s) for _, s in shapes)
    per_shard, shard, filled, weight_map = total / n_shards, {}, 0, {}
    index = 1
    for key, shape in shapes:
        shard[key] = _random(key, shape, std, gen, device).cpu()
        filled += _numel(shape)
        if filled >= per_shard * index or key == shapes[-1][0]:
            name = f"model-{index:05d}-of-{n_shards:06d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, index = {}, index + 1
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))
    return write_processor_files(out, preset, overrides)


def random_model(preset: str = "small", device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 std: float = 0.02) -> DeepseekVL2:
    """The model of a preset with random weights, built directly on ``device`` (no checkpoint on disk), with
    the same value rules as ``build_random_checkpoint``; for kernel work and profiling."""
    model = allocate_model(ModelConfig.from_dict(preset_config(preset)), device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # side-by-side stacks: the parameters are views into them
            p.copy_(_random(name, tuple(p.shape), std, gen, device))
    return model


def write_processor_files(out_dir: str | Path, preset: str = "small", overrides: dict[str, dict] | None = None) -> Path:
    """config.json, tokenizer and processor files of a preset (what ``Processor.from_pretrained`` reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = preset_config(preset, overrides)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    _write_processor_files(out, raw)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _random(key: str, shape: tuple[int, ...], std: float, gen: torch.Generator, device: str) -> torch.Tensor:
    if key.endswith("norm.weight") or key.endswith(("norm1.weight", "norm2.weight")) or "layernorm" in key:
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)  # norm gains near one
    elif key.endswith("bias"):
        t = 0.02 * torch.randn(shape, generator=gen, device=device)
    else:
        t = std * torch.randn(shape, generator=gen, device=device)
    return t.to(torch.bfloat16)


def _write_processor_files(out: Path, raw: dict) -> None:
    shutil.copyfile(ASSETS / "tiny_tokenizer.json", out / "tokenizer.json")
    special = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "pad_token": "<｜▁pad▁｜>"}
    (out / "special_tokens_map.json").write_text(json.dumps(
        {**special, "additional_special_tokens": ["<|User|>", "<|Assistant|>"]}, indent=1, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizerFast", **special, "add_bos_token": False, "add_eos_token": False,
         "model_max_length": 4096, "clean_up_tokenization_spaces": False, "legacy": True},
        indent=1, ensure_ascii=False))
    (out / "processor_config.json").write_text(json.dumps(
        {"candidate_resolutions": raw["candidate_resolutions"], "patch_size": 14, "downsample_ratio": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "normalize": True, "image_token": "<image>",
         "pad_token": "<｜▁pad▁｜>", "add_special_token": False, "mask_prompt": False, "ignore_id": -100,
         "sft_format": "deepseek", "processor_class": "DeepseekVLV2Processor"}, indent=2, ensure_ascii=False))
