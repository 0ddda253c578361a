"""Batched next-token sampling, one set of parameters per row, free of host synchronisation.

The rule is the one the reference got from HuggingFace ``generate``: temperature 0 is greedy on
the raw logits (no repetition penalty); otherwise repetition penalty over every id already in
the sequence (prompt included), temperature, top-k (50 unless set), nucleus (top-p), then a
categorical draw. Every step is a fixed-shape tensor op with no ``.item()``, no data-dependent
shapes and no Python branch on tensor values, so the engine can capture ``sample`` in a CUDA
graph. Randomness comes in as a tensor of exponential variates drawn per request from that
request's own generator, so a seed reproduces a request whatever else shares its batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dsvl2.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding parameters (defaults: those of the published Replicate model)."""

    temperature: float = 0.1
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None


def validate_params(p: SamplingParams) -> None:
    """Raise ``InputError`` naming the field and its allowed range for any unusable value."""

    def real(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise InputError(f"{name} must be a number, got {value!r}")
        return float(value)

    t = real("temperature", p.temperature)
    if not (0.0 <= t < math.inf):
        raise InputError(f"temperature must be finite and >= 0 (0 means greedy), got {t}")
    top_p = real("top_p", p.top_p)
    if not 0.0 <= top_p <= 1.0:
        raise InputError(f"top_p must be in [0, 1] (0 keeps only the most probable token), got {top_p}")
    penalty = real("repetition_penalty", p.repetition_penalty)
    if not 0.0 < penalty < math.inf:
        raise InputError(f"repetition_penalty must be finite and > 0 (1 means none), got {penalty}")
    if isinstance(p.top_k, bool) or not isinstance(p.top_k, int) or p.top_k < 0:
        raise InputError(f"top_k must be an integer >= 0 (0 means no top-k), got {p.top_k!r}")
    if p.seed is not None and (
        isinstance(p.seed, bool) or not isinstance(p.seed, int) or not 0 <= p.seed < 2**64
    ):
        raise InputError(f"seed must be an integer in [0, 2**64) or absent, got {p.seed!r}")


def params_to_tensors(
    params: Sequence[SamplingParams], device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (temperature f32 [B], top_p f32 [B], top_k int64 [B], penalty f32 [B]) for ``sample``."""
    f32 = {"dtype": torch.float32, "device": device}
    return (
        torch.tensor([p.temperature for p in params], **f32),
        torch.tensor([p.top_p for p in params], **f32),
        torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
        torch.tensor([p.repetition_penalty for p in params], **f32),
    )


class RequestRng:
    """The random stream of one request: a ``torch.Generator`` on the decoding device."""

    def __init__(self, seed: int | None, device: torch.device | str) -> None:
        # No seed: draw one, and keep it so a logged seed can replay the request.
        self.seed = secrets.randbits(63) if seed is None else seed
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)

    def fill(self, out: Tensor) -> Tensor:
        """Fill ``out`` (f32 [V] on this device) with exponential(1) variates, in place."""
        return out.exponential_(generator=self.generator)


def draw_noise(
    rngs: Sequence[RequestRng], vocab_size: int, device: torch.device | str, out: Tensor | None = None
) -> Tensor:
    """Exponential(1) noise f32 [B, V], row i from ``rngs[i]``; fills ``out`` when given (static buffer)."""
    if out is None:
        out = torch.empty(len(rngs), vocab_size, dtype=torch.float32, device=device)
    for row, rng in zip(out, rngs, strict=True):
        rng.fill(row)
    return out


def argmax_rows(logits: Tensor, groups: int = 128) -> Tensor:
    """``logits.argmax(-1)`` for [B, V] (the first index of the maximum), in two parallel stages: a single-row
    reduction over a whole vocabulary runs on one block of the GPU, the grouped one on ``groups`` blocks."""
    b, v = logits.shape
    if v % groups:
        return logits.argmax(-1)
    best, index = logits.view(b, groups, v // groups).max(-1)  # per group: its maximum and first position
    group = best.argmax(-1, keepdim=True)  # the first group holding the row's maximum
    return (group * (v // groups) + index.gather(-1, group))[:, 0]


def seen_from_prompt(prompt_ids: Tensor | Sequence[int], vocab_size: int) -> Tensor:
    """Bool [V]: True for every id in the prompt (ids int64 [L]); the penalty applies to them."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    seen = torch.zeros(vocab_size, dtype=torch.bool, device=ids.device)
    seen[ids] = True
    return seen


def update_seen(seen: Tensor, token_ids: Tensor) -> Tensor:
    """Mark each row's new token (int64 [B]) in ``seen`` (bool [B, V]), in place; returns ``seen``."""
    return seen.scatter_(1, token_ids.view(-1, 1), True)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """Logits f32 [B, V] with seen ids made less likely: l/p where l > 0, else l*p (penalty f32 [B])."""
    p = penalty.view(-1, 1)
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def filter_logits(logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor) -> Tensor:
    """Tempered logits f32 [B, V] with the tokens outside top-k and top-p set to -inf.

    ``temperature`` must be > 0 in every row (greedy rows are handled by the caller).
    """
    vocab = logits.shape[-1]
    # Shifting by the row max changes no probability, ranking or top-p decision but keeps a tiny
    # temperature from overflowing finite logits to +inf (which would make the softmax NaN).
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature.view(-1, 1)
    ascending, _ = torch.sort(scaled, dim=-1)

    # Top-k keeps every token >= the k-th largest (ties included, as HF's topk threshold does);
    # k = 0 or k >= V keeps all: the "k-th largest" is then the smallest.
    k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    kth = ascending.gather(-1, (vocab - k).view(-1, 1))
    ascending = ascending.masked_fill(ascending < kth, -math.inf)

    # Top-p, HF's rule: in ascending order, drop tokens whose cumulative probability is <= 1 - top_p,
    # never the most probable one. The dropped tokens form a prefix of the ascending order (the
    # cumulative sum only grows), so count them and keep what is >= the first survivor's logit.
    # (A tie across the cut keeps all tied tokens; HF's unstable sort would drop an arbitrary few.)
    cumulative = ascending.softmax(-1).cumsum(-1)
    n_dropped = (cumulative <= (1 - top_p).view(-1, 1)).sum(-1).clamp(max=vocab - 1)
    threshold = ascending.gather(-1, n_dropped.view(-1, 1))
    return scaled.masked_fill(scaled < threshold, -math.inf)


def _greedy_rows(temperature: Tensor) -> tuple[Tensor, Tensor]:
    """(greedy rows: temperature <= 0, the temperatures with those rows at 1). Greedy rows are sampled at
    temperature 1 only to avoid 0/0; their result is replaced by the raw argmax."""
    greedy = temperature <= 0
    return greedy, torch.where(greedy, torch.ones_like(temperature), temperature)


def _race(probs: Tensor, noise: Tensor) -> Tensor:
    """The exponential race over the last axis: argmax_i p_i / E_i, kept as [B, 1] (see ``sample``). A zero
    variate would turn 0/0 into NaN (argmax's favourite); the clamp leaves p/E unchanged for all practical
    purposes and filtered tokens (p = 0) at 0, below every kept token."""
    return (probs / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax(-1, keepdim=True)


def probabilities(
    logits: Tensor, seen: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor, penalty: Tensor
) -> Tensor:
    """The distribution f32 [B, V] a sampling row draws from (greedy rows: one-hot on raw argmax)."""
    logits = logits.float()
    greedy, safe_t = _greedy_rows(temperature)
    filtered = filter_logits(apply_repetition_penalty(logits, seen, penalty), safe_t, top_p, top_k)
    one_hot = torch.zeros_like(logits).scatter_(1, argmax_rows(logits)[:, None], 1.0)
    return torch.where(greedy.view(-1, 1), one_hot, filtered.softmax(-1))


def sample(
    logits: Tensor,
    seen: Tensor,
    temperature: Tensor,
    top_p: Tensor,
    top_k: Tensor,
    penalty: Tensor,
    noise: Tensor,
) -> Tensor:
    """Next token int64 [B] from logits [B, V] (f32 or bf16), seen bool [B, V], per-row params [B]
    and noise f32 [B, V] of exponential(1) variates (``draw_noise``).

    Exponential race: if E_i ~ Exp(1) independently, argmax_i p_i / E_i = argmin_i E_i / p_i and
    E_i / p_i ~ Exp(rate p_i), the minimum of which is i with probability p_i / sum_j p_j. So this is
    an exact categorical draw, with no host round trip (unlike ``torch.multinomial``).
    """
    drawn = _race(probabilities(logits, seen, temperature, top_p, top_k, penalty), noise)[:, 0]
    # Greedy rows: argmax of the raw logits, no penalty, no noise.
    return torch.where(temperature <= 0, argmax_rows(logits.float()), drawn)


def sample_top_candidates(
    logits: Tensor,
    seen: Tensor,
    temperature: Tensor,
    top_p: Tensor,
    top_k: Tensor,
    penalty: Tensor,
    noise: Tensor,
    k_max: int,
) -> Tensor:
    """``sample`` restricted to each row's ``k_max`` best penalised logits: a sort of k_max values
    instead of the whole vocabulary. Exact whenever every sampling row has 0 < top_k <= k_max (top-k
    drops everything outside them, and top-p only sees what top-k kept). noise f32 [B, >= k_max].
    """
    logits = logits.float()
    greedy, safe_t = _greedy_rows(temperature)
    values, index = apply_repetition_penalty(logits, seen, penalty).topk(k_max, dim=-1)  # [B, k_max]
    probs = filter_logits(values, safe_t, top_p, top_k).softmax(-1)
    drawn = index.gather(-1, _race(probs, noise[:, :k_max]))
    return torch.where(greedy, argmax_rows(logits), drawn[:, 0])
