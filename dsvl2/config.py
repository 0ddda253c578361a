"""Typed configuration read from a checkpoint's ``config.json``.

Only the DeepSeek-VL2 variant this code implements is accepted: anything else is refused at load
time with the field and value named, rather than silently computing something different.
Defaults are those of the reference configuration classes, for fields the file may omit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError


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
    n_shared_experts: int = 2
    n_routed_experts: int = 64
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
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0


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
        n_heads = lang_raw.get("num_attention_heads", LanguageConfig.num_attention_heads)
        if lang_raw.get("num_key_value_heads", n_heads) != n_heads:
            raise CheckpointError(
                f"{source}: language_config.num_key_value_heads must equal num_attention_heads")
        vision = VisionConfig(**_pick(vision_raw, VisionConfig, skip={"eps"}))
        projector = ProjectorConfig(**_pick(proj_raw, ProjectorConfig))
        language = LanguageConfig(**_pick(lang_raw, LanguageConfig))
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


def _pick(raw: dict, cls: type, skip: frozenset | set = frozenset()) -> dict:
    names = {f for f in cls.__dataclass_fields__ if f not in skip}
    return {k: v for k, v in raw.items() if k in names}
