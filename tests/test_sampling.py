"""The sampler against independent truth: hand-worked numbers, float64 numpy, HF's processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf_lp

from dsvl2.errors import InputError
from dsvl2.serving.sampling import (
    RequestRng,
    SamplingParams,
    apply_repetition_penalty,
    draw_noise,
    params_to_tensors,
    probabilities,
    sample,
    seen_from_prompt,
    update_seen,
    validate_params,
)


def run(logits, seen, params: list[SamplingParams], noise=None, gen=None):
    """sample() with per-row params; noise from ``gen`` unless given."""
    if noise is None:
        noise = torch.empty(logits.shape, dtype=torch.float32).exponential_(generator=gen)
    return sample(logits, seen, *params_to_tensors(params, "cpu"), noise)


def test_penalty_worked_example_and_seen_helpers():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = seen_from_prompt([0, 1, 0], 4)[None]
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    seen = torch.stack([seen_from_prompt(torch.tensor([1, 3]), 6), seen_from_prompt([], 6)])
    update_seen(seen, torch.tensor([5, 2]))
    assert seen.nonzero().tolist() == [[0, 1], [0, 3], [0, 5], [1, 2]]


def test_temperature_zero_is_raw_argmax_and_ignores_penalty():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 100, generator=g)
    top = logits.argmax(-1)
    seen = torch.zeros(64, 100, dtype=torch.bool)
    seen[torch.arange(64), top] = True  # a penalty of 100 would move every row's argmax
    tokens = run(logits, seen, [SamplingParams(0.0, 0.9, 50, 100.0)] * 64, gen=g)
    assert torch.equal(tokens, top)


def test_tiny_temperature_is_argmax_of_penalised_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 100, generator=g) * 3
    seen = torch.rand(64, 100, generator=g) < 0.3
    penalised = apply_repetition_penalty(logits, seen, torch.full((64,), 1.7))
    tokens = run(logits, seen, [SamplingParams(1e-5, 1.0, 0, 1.7)] * 64, gen=g)
    assert torch.equal(tokens, penalised.argmax(-1))
    assert not torch.equal(tokens, logits.argmax(-1))  # the penalty did change some rows


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_top_p_near_zero_is_greedy(penalty: float):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(500, 300, generator=g) * 2
    seen = torch.rand(500, 300, generator=g) < 0.2
    tokens = run(logits, seen, [SamplingParams(0.8, 1e-6, 50, penalty)] * 500, gen=g)
    assert torch.equal(tokens, apply_repetition_penalty(logits, seen, torch.full((500,), penalty)).argmax(-1))
    if penalty == 1.0:
        assert torch.equal(tokens, logits.argmax(-1))


def test_temperature_one_unfiltered_matches_softmax():
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0, 2.0, -0.3])
    n, g = 200_000, torch.Generator().manual_seed(3)
    seen = torch.zeros(n, 6, dtype=torch.bool)
    tokens = run(logits.expand(n, -1), seen, [SamplingParams(1.0, 1.0, 0, 1.0)] * n, gen=g)
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert (freq - logits.double().softmax(-1)).abs().max() < 0.006  # ~5 sigma at n = 200k


# --- one distribution, closed form in float64, and proof that the check has power -------------

LOGITS = [1.2, 0.3, 2.0, -0.5, 1.0, 0.8, -1.5, 0.6]
SEEN = [0, 3]
PARAMS = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.3)
N_DRAWS = 100_000
TOL = 0.01  # max |frequency - p|; sigma <= 0.0016 at 100k draws


def closed_form(variant: str = "right", p: SamplingParams = PARAMS) -> np.ndarray:
    """The filtered distribution computed from the rule, plus deliberately wrong variants."""
    x = np.array(LOGITS, dtype=np.float64)
    seen = np.isin(np.arange(len(x)), SEEN)
    pen = 1.0 if variant == "no_penalty" else p.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / pen, x * pen), x)

    def top_k(x):
        return x if variant == "no_top_k" else np.where(x < np.sort(x)[-p.top_k], -np.inf, x)

    def top_p(x):
        order = np.argsort(x)
        e = np.exp(x[order] - x.max())
        dropped = np.cumsum(e / e.sum()) <= 1 - p.top_p
        n = min(int(dropped.sum()) + {"one_more": -1, "one_less": 1}.get(variant, 0), len(x) - 1)
        return np.where(np.isin(np.arange(len(x)), order[max(n, 0) :]), x, -np.inf)

    y = top_p(top_k(x)) / p.temperature if variant == "top_p_first" else top_p(top_k(x / p.temperature))
    e = np.exp(y - y.max())
    return e / e.sum()


WRONG = ["top_p_first", "no_top_k", "no_penalty", "one_more", "one_less"]


def test_distribution_matches_closed_form():
    seen = seen_from_prompt(SEEN, 8)
    logits = torch.tensor(LOGITS).expand(N_DRAWS, -1)
    tokens = run(logits, seen.expand(N_DRAWS, -1), [PARAMS] * N_DRAWS, gen=torch.Generator().manual_seed(4))
    freq = np.bincount(tokens.numpy(), minlength=8) / N_DRAWS
    truth = closed_form()
    assert np.abs(freq - truth).max() < TOL
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(truth))


@pytest.mark.parametrize("variant", WRONG)
def test_distribution_check_has_power(variant: str):
    # Each wrong rule is further than 2 * TOL from the right one: sampling it would fail the test above.
    assert np.abs(closed_form(variant) - closed_form()).max() > 2 * TOL


# --- against transformers' own processors ----------------------------------------------------


HF_CASES = [
    (0.1, 0.9, 50, 1.1),
    (0.7, 0.95, 20, 1.3),
    (1.0, 1.0, 0, 1.0),
    (1.5, 0.5, 5, 0.8),
    (0.4, 0.0, 50, 1.1),
]


@pytest.mark.parametrize("p", [SamplingParams(*case) for case in HF_CASES])
def test_matches_transformers_processors(p: SamplingParams):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(32, 2000, generator=g) * 4
    input_ids = torch.randint(0, 2000, (32, 300), generator=g)
    hf = hf_lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, logits.clone())
    hf = hf_lp.TemperatureLogitsWarper(p.temperature)(input_ids, hf)
    if p.top_k:
        hf = hf_lp.TopKLogitsWarper(p.top_k)(input_ids, hf)
    if p.top_p < 1.0:  # generate adds the warper only then
        hf = hf_lp.TopPLogitsWarper(p.top_p)(input_ids, hf)
    want = hf.softmax(-1)
    seen = torch.zeros(32, 2000, dtype=torch.bool).scatter_(1, input_ids, True)
    ours = probabilities(logits, seen, *params_to_tensors([p] * 32, "cpu"))
    assert torch.equal(ours > 0, want > 0)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-4)


# --- batching, seeds, bf16 --------------------------------------------------------------------


def test_batched_rows_behave_as_alone():
    g = torch.Generator().manual_seed(6)
    cases = [(0.0, 0.9, 50, 1.1), (0.7, 0.8, 5, 1.3), (1.0, 1.0, 0, 1.0), (0.3, 0.95, 100, 1.05)]
    params = [SamplingParams(*case) for case in cases]
    for _ in range(50):
        logits = torch.randn(4, 400, generator=g) * 3
        seen = torch.rand(4, 400, generator=g) < 0.1
        noise = torch.empty(4, 400).exponential_(generator=g)
        together = run(logits, seen, params, noise)
        rows = [slice(i, i + 1) for i in range(4)]
        alone = torch.cat([run(logits[r], seen[r], params[r], noise[r]) for r in rows])
        assert torch.equal(together, alone)
        probs = probabilities(logits, seen, *params_to_tensors(params, "cpu"))
        for r in rows:
            assert torch.equal(
                probs[r], probabilities(logits[r], seen[r], *params_to_tensors(params[r], "cpu"))
            )


def generate(seed: int, others: int = 0, steps: int = 50, vocab: int = 64) -> list[int]:
    """Decode with a fixed fake model; row 0 is the request, ``others`` neighbours share the batch."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(99)) * 2
    params = [SamplingParams(0.9, 0.95, 20, 1.2, seed)] + [SamplingParams(1.0, 1.0, 0, 1.0)] * others
    rngs = [RequestRng(p.seed, "cpu") for p in params]
    seen = torch.stack([seen_from_prompt([1, 2, 3], vocab)] * len(params))
    last = torch.full((len(params),), 3)
    out = []
    for _ in range(steps):
        logits = table[last]
        last = sample(logits, seen, *params_to_tensors(params, "cpu"), draw_noise(rngs, vocab, "cpu"))
        update_seen(seen, last)
        out.append(int(last[0]))
    return out


def test_seed_reproduces_request_whatever_the_batch():
    a = generate(1234)
    assert a == generate(1234)
    assert a == generate(1234, others=3)  # the neighbours draw from their own generators
    assert a != generate(1235)
    assert len(set(a)) > 5  # really sampled, not stuck on one token


def test_unseeded_seed_is_recorded_and_noise_fills_a_static_buffer():
    a, b = RequestRng(None, "cpu"), RequestRng(None, "cpu")
    assert a.seed != b.seed
    buf = torch.zeros(2, 16)
    out = draw_noise([a, b], 16, "cpu", out=buf)
    assert out.data_ptr() == buf.data_ptr() and bool((buf > 0).all())
    assert torch.equal(buf[:1], draw_noise([RequestRng(a.seed, "cpu")], 16, "cpu"))  # the seed replays it


def test_bf16_logits_are_upcast():
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(8, 300, generator=g) * 3).bfloat16()
    seen = torch.rand(8, 300, generator=g) < 0.1
    noise = torch.empty(8, 300).exponential_(generator=g)
    params = [SamplingParams(0.7, 0.9, 50, 1.1)] * 4 + [SamplingParams(0.0)] * 4
    tokens = run(logits, seen, params, noise)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, run(logits.float(), seen, params, noise))


NAN, INF = float("nan"), float("inf")
BAD = {
    "temperature": [-0.1, INF, NAN],
    "top_p": [-0.01, 1.01, NAN],
    "repetition_penalty": [0.0, -1.0, INF, NAN],
    "top_k": [-1, 2.5],
    "seed": [-1, 2**64, 1.5],
}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in BAD.items() for v in values])
def test_validate_refuses(field: str, value):
    with pytest.raises(InputError, match=field):
        validate_params(SamplingParams(**{field: value}))


@pytest.mark.parametrize(
    "p",
    [SamplingParams(), SamplingParams(0.0, 0.0, 0, 1.0, 0), SamplingParams(2.5, 1.0, 10**6, 0.5, 2**64 - 1)],
)
def test_validate_accepts(p: SamplingParams):
    validate_params(p)


def test_top_candidates_sampler_draws_from_the_same_distribution() -> None:
    """The decode fast path (sort only the 64 best) samples what the full-vocabulary rule defines."""
    from dsvl2.serving.sampling import probabilities, sample_top_candidates

    gen = torch.Generator().manual_seed(5)
    vocab, draws = 300, 40_000
    base = torch.randn(1, vocab, generator=gen) * 2.0
    seen = torch.zeros(1, vocab, dtype=torch.bool)
    seen[0, base.topk(3).indices[0]] = True  # the penalty reorders the top of the distribution
    params = [torch.tensor([0.8]), torch.tensor([0.9]), torch.tensor([40]), torch.tensor([1.3])]
    expected = probabilities(base, seen, *params)[0]
    logits = base.expand(draws, vocab)
    noise = torch.empty(draws, vocab).exponential_(generator=gen)
    rows = [p.expand(draws) for p in params]
    tokens = sample_top_candidates(logits, seen.expand(draws, vocab), rows[0], rows[1], rows[2], rows[3], noise, 64)
    empirical = torch.bincount(tokens, minlength=vocab).double() / draws
    assert (empirical - expected.double()).abs().max().item() < 0.01
    assert set(tokens.unique().tolist()) <= set(expected.nonzero().flatten().tolist())
    greedy = sample_top_candidates(base, seen, torch.zeros(1), *params[1:], noise[:1], 64)
    assert greedy.item() == base.argmax().item()


def test_two_stage_argmax_equals_argmax_including_ties() -> None:
    from dsvl2.serving.sampling import argmax_rows

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 102400, generator=g)
    logits[1, 5000] = logits[1, 90000] = 50.0  # a tie across groups: the first index wins
    logits[2, 801] = logits[2, 802] = 50.0  # a tie inside a group
    logits[3] = 0.0  # all equal
    got = argmax_rows(logits)
    assert got.tolist() == logits.argmax(-1).tolist() == [got[0].item(), 5000, 801, 0]
    odd = torch.randn(2, 1000, generator=g)  # not a multiple of the groups: plain argmax
    assert argmax_rows(odd).tolist() == odd.argmax(-1).tolist()
