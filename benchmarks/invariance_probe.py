# ruff: noqa: B023 - every lambda here is called at once, inside its loop iteration
"""Where a decode step stops being batch invariant: each piece of the step on 64 rows against each row alone.

    python benchmarks/invariance_probe.py

On random weights of the real shapes (built in GPU memory), for the dense layer 0 and the MoE layer 1: every
decode-time op (norm, q‖kv_a, MLA prologue, attention, value rows, o_proj, the MoE block, the dense MLP, the
logits), eagerly, then the compiled layer as the engine compiles it, then the whole model step, then the sampler.
Prints, per piece, the largest absolute difference between the 64-row result and the rows computed alone (0.0 is
invariant). JSON lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsvl2 import kernels  # noqa: E402
from dsvl2.model.tiny import random_model  # noqa: E402
from dsvl2.serving.runner import TOP_CANDIDATES  # noqa: E402
from dsvl2.serving.sampling import sample, sample_top_candidates  # noqa: E402

ROWS, CONTEXT = 64, 2048
CACHE: list[torch.Tensor] = []  # the latent cache: batched along dim 1


def diff(fn, *batched: torch.Tensor, rows: int = ROWS, probe: tuple[int, ...] = (0, 5, 31, 63)) -> float:
    """max |fn(batch)[r] - fn(batch[r:r+1])[0]| over the probed rows; args batched along dim 0 (cache: dim 1)."""
    full = fn(*batched)
    full = full[0] if isinstance(full, tuple) else full
    worst = 0.0
    for r in probe:
        one = fn(*[t[:, r:r + 1].clone() if t is CACHE[0] else t[r:r + 1].clone() for t in batched])
        one = one[0] if isinstance(one, tuple) else one
        worst = max(worst, float((full[r:r + 1].float() - one.float()).abs().max()))
    return worst


@torch.inference_mode()
def main() -> None:
    lm = random_model("small", "cuda").language
    d, dt = lm.cfg.hidden_size, lm.lm_head.weight.dtype
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, 1, d, device="cuda", dtype=dt, generator=g)
    a = torch.randn(ROWS, 1, d, device="cuda", dtype=dt, generator=g)
    pos = torch.randint(16, CONTEXT - 1, (ROWS,), generator=g, device="cuda")
    cache = lm.new_cache(ROWS, CONTEXT).normal_(generator=g)
    CACHE.append(cache)
    cs = lm.rope[pos][:, None]
    out: dict[str, float] = {}
    for i in (0, 1):
        layer = lm.model.layers[i]
        att = layer.self_attn
        out[f"L{i}_input_norm"] = diff(lambda x: layer.input_layernorm.decode(x), x)
        out[f"L{i}_q_kv_a"] = diff(lambda x: kernels.linear.gemv(x[:, 0], att.q_kv_a), x)
        qkv = kernels.linear.gemv(x[:, 0], att.q_kv_a)
        nw = att.kv_a_layernorm

        def prologue(qkv, cs, c, p):
            return kernels.attention.mla_prologue(qkv, cs[:, 0], nw.weight, nw.eps, att.kv_b_proj.weight, c[i].clone(),
                                                  p, att.h, att.nope, att.rope)

        out[f"L{i}_mla_prologue"] = diff(lambda q, c_, cc, p: prologue(q, c_, cc, p), qkv, cs, cache, pos)
        q_lat, q_rope = prologue(qkv, cs, cache, pos)
        attention = kernels.attention.latent_attention
        out[f"L{i}_attention"] = diff(lambda ql, qr, c, p: attention(ql, qr, c[i], p, att.scale), q_lat, q_rope, cache,
                                      pos)
        o = kernels.attention.latent_attention(q_lat, q_rope, cache[i], pos, att.scale)
        out[f"L{i}_value_out"] = diff(lambda o: kernels.attention.value_out(o, att.kv_b_proj.weight, att.nope), o)
        v = kernels.attention.value_out(o, att.kv_b_proj.weight, att.nope)
        out[f"L{i}_o_proj"] = diff(lambda v: kernels.linear.gemv(v, att.o_proj.weight), v)
        if i == 0:
            out["L0_dense_mlp"] = diff(lambda x: layer.mlp.decode(x), x)
        else:
            out["L1_moe_residual"] = diff(lambda x, a: layer.mlp.decode_residual(x, a, layer.post_attention_layernorm),
                                          x, a)
        out[f"L{i}_layer_eager"] = diff(lambda x, c_, c, p: layer.decode(x, c_, c[i].clone(), p), x, cs, cache, pos)
        compiled = torch.compile(layer.decode, dynamic=None)
        compiled(x[:1], cs[:1], cache[i, :1].clone(), pos[:1])
        compiled(x[:2], cs[:2], cache[i, :2].clone(), pos[:2])
        out[f"L{i}_layer_compiled"] = diff(lambda x, c_, c, p: compiled(x, c_, c[i].clone(), p), x, cs, cache, pos)
    h = torch.randn(ROWS, d, device="cuda", dtype=dt, generator=g)
    out["logits"] = diff(lambda h: lm.logits(h), h)
    tokens = torch.randint(0, lm.cfg.vocab_size, (ROWS,), generator=g, device="cuda")
    out["model_step_eager"] = diff(lambda t, p, c: lm.decode(t, p, c.clone()), tokens, pos, cache)
    logits = torch.randn(ROWS, lm.cfg.vocab_size, device="cuda", generator=g) * 3
    seen = torch.rand(ROWS, lm.cfg.vocab_size, device="cuda", generator=g) < 0.01
    temp = torch.full((ROWS,), 0.8, device="cuda")
    top_p = torch.full((ROWS,), 0.9, device="cuda")
    top_k = torch.full((ROWS,), 50, device="cuda", dtype=torch.int64)
    pen = torch.full((ROWS,), 1.1, device="cuda")
    noise = torch.empty(ROWS, lm.cfg.vocab_size, device="cuda").exponential_(generator=g)
    out["sample_full"] = diff(lambda *t: sample(*t).float(), logits, seen, temp, top_p, torch.zeros_like(top_k), pen,
                              noise)
    out["sample_top"] = diff(lambda *t: sample_top_candidates(*t, TOP_CANDIDATES).float(), logits, seen, temp, top_p,
                             top_k, pen, noise)
    print(json.dumps({"device": torch.cuda.get_device_name(), "pdl": kernels.launch.use_pdl(x), "max_abs_diff": out}),
          flush=True)


if __name__ == "__main__":
    main()
