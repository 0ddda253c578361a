"""DeepSeek-V2-Lite-shaped language model: multi-head latent attention (MLA) + mixture of experts.

Module names follow the checkpoint keys (``language.model.layers.{i}.self_attn.q_proj`` ...), except
the routed experts, which are stacked into two tensors per layer (see ``moe.EXPERT_KEYS``).

The KV cache holds 576 values per token per layer: the normalised compressed kv (512) and the
shared rotary key (64). Prefill expands it through ``kv_b_proj`` (plain attention over
192-dim keys); decode absorbs ``kv_b_proj`` into the query and output sides instead, so a step
reads only the compressed cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .config import LanguageConfig
from .moe import MLP, MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Variance in float32, then back to the input dtype before the weight, as upstream.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` of a decode step's rows: on CUDA one kernel program per row, whatever their number (batch
        invariant; a compiled reduction's layout may change with the number of rows)."""
        return kernels.norm.rms_norm(x, self.weight, self.eps) if kernels.norm.rms_norm_ok(x, self.weight) else self(x)


def rope_table(max_pos: int, dim: int, theta: float, device: torch.device | str) -> torch.Tensor:
    """[max_pos, 2, dim] float32 (cos, sin) in rotate-half layout: frequencies repeated twice."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    # Upstream keeps inv_freq in a buffer that is cast with the model to the checkpoint's bfloat16, so
    # the reference's frequencies are bf16-rounded even when it computes in float32. The error grows
    # with the position (radians by position ~1000), so long prompts need exactly this rounding.
    inv_freq = inv_freq.to(torch.bfloat16).float()
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()], dim=1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, (H,) d] stored as interleaved pairs; cos_sin [..., T, 2, d] broadcast over heads.

    The checkpoint's rope dims are interleaved (x0,x1),(x2,x3)...; upstream de-interleaves them and
    then applies a rotate-half rotation. q and k both go through this, so their dot products match.
    """
    d = x.shape[-1]
    x = x.unflatten(-1, (d // 2, 2)).transpose(-1, -2).flatten(-2)  # de-interleave
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos_sin.unbind(-2)
    if x.dim() == cos.dim() + 1:  # per-head tensor: broadcast over the head axis
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., d] -> [..., width], zeros appended (x itself when d == width)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


class Attention(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.h, self.nope, self.rope, self.vdim = (
            cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.rank = cfg.kv_lora_rank
        self.scale = cfg.qk_head_dim**-0.5
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, self.h * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(self.h * self.vdim, d, bias=False)
        # q_proj and kv_a_proj_with_mqa side by side, so both run as one matrix product (see fuse()).
        self.register_buffer("q_kv_a", torch.empty(0), persistent=False)

    def fuse(self) -> None:
        """Stack q_proj and kv_a_proj_with_mqa into one matrix; the parameters become views into it,
        so the names and values stay those of the checkpoint and no memory is added."""
        self.q_kv_a = torch.cat([self.q_proj.weight, self.kv_a_proj_with_mqa.weight])
        n = self.q_proj.weight.shape[0]
        self.q_proj.weight = nn.Parameter(self.q_kv_a[:n], requires_grad=False)
        self.kv_a_proj_with_mqa.weight = nn.Parameter(self.q_kv_a[n:], requires_grad=False)

    def _project(self, x: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q_nope [B, T, H, nope], q_rope [B, T, H, rope], latent [B, T, rank + rope]"""
        b, t, _ = x.shape
        if self.q_kv_a.numel():
            qkv = F.linear(x, self.q_kv_a)
            q, kv = qkv.split([self.q_proj.weight.shape[0], self.rank + self.rope], dim=-1)
        else:
            q, kv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        q_nope, q_rope = q.view(b, t, self.h, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        c, k_rope = kv.split([self.rank, self.rope], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c), apply_rope(k_rope, cos_sin)], dim=-1)
        return q_nope, apply_rope(q_rope, cos_sin), latent

    def prefill(self, x: torch.Tensor, cos_sin: torch.Tensor, cache: torch.Tensor, start: int) -> torch.Tensor:
        """x [B, T, D] at positions start..start+T-1; cache [B, S, rank + rope] is written in place."""
        b, t, _ = x.shape
        q_nope, q_rope, latent = self._project(x, cos_sin)
        cache[:, start:start + t] = latent
        past = cache[:, : start + t]  # [B, P, rank + rope]
        c, k_rope = past.split([self.rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c).view(b, start + t, self.h, self.nope + self.vdim)
        k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
        # One head width for q, k and v (flash attention wants it), whichever of qk and v is wider: zeros
        # appended to q and k add nothing to their dot products, zeros appended to v give output columns that
        # are dropped; the scale stays qk's.
        width = max(self.nope + self.rope, self.vdim)
        q = _widen(torch.cat([q_nope, q_rope], dim=-1), width).transpose(1, 2)  # [B, H, T, width]
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.h, -1)], dim=-1)
        k = _widen(k, width).transpose(1, 2)  # [B, H, P, width]
        v = _widen(v, width).transpose(1, 2)  # [B, H, P, width]
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out[..., : self.vdim].transpose(1, 2).reshape(b, t, self.h * self.vdim)
        return self.o_proj(out)

    def decode(self, x: torch.Tensor, cos_sin: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row. x [B, 1, D]; pos [B] (int64, on device); cache [B, S, rank + rope].

        Fixed shapes whatever the positions, so a step can be captured in a CUDA graph.
        """
        b = x.shape[0]
        if self._kernels_ok(x):
            # Five kernels: q‖kv_a; the query absorbed into the latent space (plus the rotary parts and this
            # token's cache row); attention over the cache up to pos only; the value rows of kv_b; o_proj.
            qkv = kernels.linear.gemv(x[:, 0], self.q_kv_a)
            norm = self.kv_a_layernorm
            q_lat, q_rope = kernels.attention.mla_prologue(qkv, cos_sin[:, 0], norm.weight, norm.eps,
                                                           self.kv_b_proj.weight, cache, pos, self.h, self.nope,
                                                           self.rope)
            o_lat = kernels.attention.latent_attention(q_lat, q_rope, cache, pos, self.scale)
            out = kernels.attention.value_out(o_lat, self.kv_b_proj.weight, self.nope)
            return kernels.linear.gemv(out, self.o_proj.weight)[:, None]
        q_nope, q_rope, latent = self._project(x, cos_sin)
        rows = torch.arange(b, device=x.device)
        cache[rows, pos] = latent[:, 0]
        w = self.kv_b_proj.weight.view(self.h, self.nope + self.vdim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # [H, nope, rank], [H, v, rank]
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope[:, 0], w_uk)  # [B, H, rank]
        q_full = torch.cat([q_lat, q_rope[:, 0]], dim=-1)  # [B, H, rank + rope]
        scores = torch.matmul(q_full, cache.transpose(1, 2)).float() * self.scale  # [B, H, S]
        visible = torch.arange(cache.shape[1], device=x.device)[None, :] <= pos[:, None]  # [B, S]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(x.dtype)
        o_lat = torch.matmul(probs, cache[..., : self.rank])  # [B, H, rank]
        out = torch.einsum("bhr,hvr->bhv", o_lat, w_uv).reshape(b, 1, self.h * self.vdim)
        return self.o_proj(out)

    def _kernels_ok(self, x: torch.Tensor) -> bool:
        return (kernels.launch.available(x) and self.q_kv_a.numel() > 0 and kernels.linear.gemv_ok(x, self.q_kv_a)
                and kernels.attention.latent_attention_ok(self.h, self.rank, self.rope, self.nope, self.vdim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, cache: torch.Tensor, start: int) -> torch.Tensor:
        """Prefill: x [B, T, D] at positions start..start+T-1."""
        x = x + self.self_attn.prefill(self.input_layernorm(x), cos_sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x: torch.Tensor, cos_sin: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row: x [B, 1, D], pos [B]. Kept separate so it can be compiled on its own."""
        a = self.self_attn.decode(self.input_layernorm.decode(x), cos_sin, cache, pos)
        if isinstance(self.mlp, MoE) and self.mlp.decode_kernels_ok(x):
            return self.mlp.decode_residual(x, a, self.post_attention_layernorm)  # the add and norm in a kernel
        x = x + a
        h = self.post_attention_layernorm.decode(x)
        return x + (self.mlp.decode(h) if isinstance(self.mlp, MLP) else self.mlp(h))


class DecoderStack(nn.Module):
    """``language.model``: embeddings, layers, final norm."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        # Given its (uninitialised) table: no random initialisation, which on the meta device would import
        # the compiler stack (a few seconds of a start, before the weights can begin to load).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """``language``: the decoder stack and the untied ``lm_head``."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope", torch.empty(0), persistent=False)

    def init_buffers(self) -> None:
        """Compute the rotary table on the weights' device (the model is built on the meta device)."""
        c = self.cfg
        device = self.lm_head.weight.device
        self.rope = rope_table(c.max_position_embeddings, c.qk_rope_head_dim, c.rope_theta, device)

    def new_cache(self, batch: int, length: int | None = None) -> torch.Tensor:
        """[layers, B, S, rank + rope] in the model dtype; S defaults to the full context."""
        c = self.cfg
        s = length or c.max_position_embeddings
        w = self.lm_head.weight
        return torch.zeros(c.num_hidden_layers, batch, s, c.kv_lora_rank + c.qk_rope_head_dim,
                           dtype=w.dtype, device=w.device)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] -> float32 logits [..., V]"""
        if kernels.linear.gemv_ok(h, self.lm_head.weight):  # a decode step's rows: batch-invariant kernels
            return kernels.linear.gemv(self.model.norm.decode(h), self.lm_head.weight, float_out=True)
        return self.lm_head(self.model.norm(h)).float()

    def prefill(self, embeds: torch.Tensor, cache: torch.Tensor, start: int = 0) -> torch.Tensor:
        """embeds [B, T, D] at positions start..start+T-1 -> hidden states [B, T, D]; fills the cache."""
        t = embeds.shape[1]
        if start + t > cache.shape[2]:
            raise ValueError(f"{start + t} positions do not fit in a cache of {cache.shape[2]}")
        cos_sin = self.rope[start:start + t][None]  # [1, T, 2, rope]
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos_sin, cache[i], start)
        return x

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """tokens [B], pos [B] (positions of these tokens) -> float32 logits [B, V]."""
        x = self.model.embed_tokens(tokens)[:, None]  # [B, 1, D]
        cos_sin = self.rope[pos][:, None]  # [B, 1, 2, rope]
        for i, layer in enumerate(self.model.layers):
            x = layer.decode(x, cos_sin, cache[i], pos)
        return self.logits(x[:, 0])
