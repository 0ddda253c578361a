"""Typed configuration read from a checkpoint's ``config.json``.

Only the DeepSeek-VL2 variant this code implements is accepted: anything else is refused at load
time with the field and value named, rather than silently computing something different.
Defaults are DeepSeek-VL2-small's values (not the reference configuration classes' own), for fields the file
may omit. Sizes the code cannot run are refused here too (``_check_sizes``), never left to fail in a request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        """Patches per side: a 384 tile at stride 14 gives 27 (the last 6 pixels are dropped)."""
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class ProjectorConfig:
    input_dim: int = 1152
    n_embed: int = 2048
    downsample_ratio: int = 2


@dataclass(frozen=True)
class LanguageConfig:
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    n_shared_experts: int = 2  # null in a file (upstream: no shared experts) is read as 0, which computes the same
    n_routed_experts: int | None = 64  # null: every layer dense, as upstream
    num_experts_per_tok: int = 6
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 100000
    eos_token_id: int = 100001

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig
    projector: ProjectorConfig
    language: LanguageConfig
    candidate_resolutions: tuple[tuple[int, int], ...]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        _require(raw, "model_type", "deepseek_vl_v2", source)
        _require(raw, "tile_tag", "2D", source)
        _require(raw, "global_view_pos", "head", source)
        vision_raw = raw.get("vision_config", {})
        proj_raw = raw.get("projector_config", {})
        lang_raw = raw.get("language_config", {})
        _require(proj_raw, "projector_type", "downsample_mlp_gelu", source, "projector_config.")
        _require(proj_raw, "depth", 2, source, "projector_config.")
        _require(proj_raw, "mlp_ratio", 1, source, "projector_config.")
        _require(proj_raw, "token_pooling", False, source, "projector_config.")
        _require(vision_raw, "image_size", 384, source, "vision_config.")
        _require(vision_raw, "patch_size", 14, source, "vision_config.")  # the processor's token counts assume both
        _require(proj_raw, "downsample_ratio", 2, source, "projector_config.")
        _require(vision_raw, "class_token", False, source, "vision_config.")
        _require(vision_raw, "ignore_head", True, source, "vision_config.")
        _require(lang_raw, "q_lora_rank", None, source, "language_config.")
        _require(lang_raw, "use_mla", True, source, "language_config.")
        _require(lang_raw, "topk_method", "greedy", source, "language_config.")
        _require(lang_raw, "scoring_func", "softmax", source, "language_config.")
        _require(lang_raw, "norm_topk_prob", False, source, "language_config.")
        _require(lang_raw, "n_group", 1, source, "language_config.")
        _require(lang_raw, "rope_scaling", None, source, "language_config.")
        _require(lang_raw, "tie_word_embeddings", False, source, "language_config.")
        _require(lang_raw, "hidden_act", "silu", source, "language_config.")
        n_heads = lang_raw.get("num_attention_heads", LanguageConfig.num_attention_heads)
        if lang_raw.get("num_key_value_heads", n_heads) != n_heads:
            raise CheckpointError(
                f"{source}: language_config.num_key_value_heads must equal num_attention_heads")
        vision = VisionConfig(**_pick(vision_raw, VisionConfig, skip={"eps"}))
        projector = ProjectorConfig(**_pick(proj_raw, ProjectorConfig))
        language = LanguageConfig(**_pick(lang_raw, LanguageConfig))
        if language.n_shared_experts is None:
            language = replace(language, n_shared_experts=0)
        _check_sizes(vision, language, source)
        if projector.input_dim != vision.width or projector.n_embed != language.hidden_size:
            raise CheckpointError(
                f"{source}: projector_config input_dim/n_embed ({projector.input_dim}/{projector.n_embed}) "
                f"must match vision width {vision.width} and language hidden_size {language.hidden_size}"
            )
        if language.routed_scaling_factor != 1.0:
            raise CheckpointError(
                f"{source}: language_config.routed_scaling_factor={language.routed_scaling_factor} "
                "is not supported (only 1.0)"
            )
        resolutions = tuple(tuple(r) for r in raw.get("candidate_resolutions", ()))
        if not resolutions:
            raise CheckpointError(f"{source}: candidate_resolutions is missing or empty")
        return cls(vision, projector, language, resolutions)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: is this a DeepSeek-VL2 checkpoint directory?") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(raw, str(path))


_MISSING = object()


def _require(raw: dict, key: str, expected: Any, source: str, prefix: str = "") -> None:
    """Refuse a variant this implementation does not compute (an absent key takes the default)."""
    value = raw.get(key, _MISSING)
    if value is not _MISSING and value != expected:
        raise CheckpointError(
            f"{source}: unsupported {prefix}{key}={value!r}; this implementation supports only {expected!r}"
        )


def _check_sizes(vision: VisionConfig, language: LanguageConfig, source: str) -> None:
    """Refuse, by field and value, the numbers this code cannot run (rather than fail in every request's prefill).
    Every other size runs on each path: the eager and compiled prefill and the plain decode (the Triton kernels
    check their own shape rules and leave the rest to the plain code)."""

    def refuse(field: str, value: Any, why: str) -> None:
        raise CheckpointError(f"{source}: unsupported {field}={value!r}: {why}")

    def count(section: str, cfg: Any, field: str, least: int | None = 1) -> int:
        value = getattr(cfg, field)
        if not isinstance(value, int) or isinstance(value, bool):
            refuse(f"{section}.{field}", value, "must be an integer")
        if least is not None and value < least:
            refuse(f"{section}.{field}", value, f"must be at least {least}")
        return value

    def positive(section: str, cfg: Any, field: str) -> None:
        value = getattr(cfg, field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            refuse(f"{section}.{field}", value, "must be a positive number")

    heads = count("vision_config", vision, "heads")
    if count("vision_config", vision, "width") % heads:
        refuse("vision_config.width", vision.width, f"must be a multiple of the {heads} heads")
    count("vision_config", vision, "layers", 0)
    positive("vision_config", vision, "mlp_ratio")
    lang = "language_config"
    for field in ("vocab_size", "hidden_size", "num_attention_heads", "kv_lora_rank", "v_head_dim",
                  "max_position_embeddings", "moe_layer_freq"):
        count(lang, language, field)
    for field in ("num_hidden_layers", "qk_nope_head_dim"):
        count(lang, language, field, 0)
    count(lang, language, "first_k_dense_replace", None)
    if count(lang, language, "qk_rope_head_dim") % 2:
        refuse(f"{lang}.qk_rope_head_dim", language.qk_rope_head_dim, "must be even (rotary pairs)")
    positive(lang, language, "rope_theta")
    layers = range(language.num_hidden_layers)
    if any(not language.is_moe_layer(i) for i in layers):
        count(lang, language, "intermediate_size")
    if any(language.is_moe_layer(i) for i in layers):
        count(lang, language, "moe_intermediate_size")
        count(lang, language, "n_shared_experts", 0)
        experts = count(lang, language, "n_routed_experts")
        if count(lang, language, "num_experts_per_tok") > experts:
            refuse(f"{lang}.num_experts_per_tok", language.num_experts_per_tok,
                   f"top-k cannot exceed the {experts} routed experts")


def _pick(raw: dict, cls: type, skip: frozenset | set = frozenset()) -> dict:
    names = {f for f in cls.__dataclass_fields__ if f not in skip}
    return {k: v for k, v in raw.items() if k in names}
