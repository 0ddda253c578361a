"""transformers' DeepseekV2 holding a checkpoint's language model: the second implementation tests compare to."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsvl2.model.loader import iter_tensors, shard_files


def deepseek_v2_reference(ckpt: Path):
    """``transformers.DeepseekV2ForCausalLM`` in float32 with the ``language.*`` weights of ``ckpt`` (eager
    attention, the reference's bf16-rounded rotary frequencies)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    lc = json.loads((ckpt / "config.json").read_text())["language_config"]
    lc = {k: v for k, v in lc.items() if k not in ("architectures", "model_type", "torch_dtype")}
    # Upstream's nulls, in the terms transformers has: no shared experts is a zero-width shared MLP, and no
    # routed experts makes every layer dense. transformers has no moe_layer_freq (every layer after the dense ones
    # is MoE), so only checkpoints with a frequency of 1 compare.
    assert lc.get("moe_layer_freq", 1) == 1, "transformers' DeepseekV2 has no moe_layer_freq"
    if lc.get("n_shared_experts", 0) is None:
        lc["n_shared_experts"] = 0
    if lc.get("n_routed_experts", 0) is None:
        lc.update(n_routed_experts=1, num_experts_per_tok=1, first_k_dense_replace=lc["num_hidden_layers"])
    # transformers' config checks hidden_size % heads == 0, which its MLA never needs (the heads' widths are the
    # qk and v dims, and its head_dim is the rope width): the heads are set after that check.
    cfg = DeepseekV2Config(**{**lc, "num_attention_heads": 1, "num_key_value_heads": 1})
    cfg.num_attention_heads = cfg.num_key_value_heads = lc["num_attention_heads"]
    cfg._attn_implementation = "eager"
    hf = DeepseekV2ForCausalLM(cfg).float().eval()
    sd = {n[len("language."):]: t.float() for n, _, t in iter_tensors(ckpt, shard_files(ckpt))
          if n.startswith("language.")}
    for i in range(max(cfg.first_k_dense_replace, 0), cfg.num_hidden_layers):  # transformers stacks the experts
        p = f"model.layers.{i}.mlp.experts"
        sd[f"{p}.gate_up_proj"] = torch.stack([
            torch.cat([sd.pop(f"{p}.{j}.gate_proj.weight"), sd.pop(f"{p}.{j}.up_proj.weight")])
            for j in range(cfg.n_routed_experts)])
        sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{j}.down_proj.weight") for j in range(cfg.n_routed_experts)])
    for name, p in hf.state_dict().items():  # empty tensors (no shared experts) need not be in the checkpoint
        if p.numel() == 0:
            sd.setdefault(name, p)
    hf.load_state_dict(sd, strict=True)
    # The reference rounds the rotary frequencies to bf16 (see language.rope_table); give transformers the same.
    for module in hf.modules():
        if hasattr(module, "inv_freq"):
            module.inv_freq.copy_(module.inv_freq.to(torch.bfloat16).float())
    return hf
