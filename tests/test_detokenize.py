"""Streaming detokenisation equals one-shot decoding and never splits a character."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from dsvl2.serving.detokenize import REPLACEMENT, StreamDecoder

GOLDEN = Path(__file__).parent / "fixtures" / "golden"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(GOLDEN / "checkpoint" / "tokenizer.json"))


@pytest.fixture(scope="module")
def drop_ids(tokenizer: Tokenizer) -> set[int]:
    ids = {
        tokenizer.token_to_id(t) for t in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>")
    }
    assert None not in ids
    return ids


def stream(tokenizer: Tokenizer, drop: set[int], ids: list[int]) -> list[str]:
    """All chunks of one sequence, flush last."""
    dec = StreamDecoder(tokenizer, drop)
    return [dec.push(i) for i in ids] + [dec.flush()]


def one_shot(tokenizer: Tokenizer, drop: set[int], ids: list[int]) -> str:
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)


def assert_no_premature_replacement(chunks: list[str], final: str) -> None:
    """Every emitted U+FFFD is one the full decode has at the same place."""
    at = 0
    for chunk in chunks:
        for k, ch in enumerate(chunk):
            if ch == REPLACEMENT:
                assert final[at + k] == REPLACEMENT, (chunks, final)
        at += len(chunk)


def test_golden_greedy_ids(tokenizer: Tokenizer, drop_ids: set[int]):
    cases = json.loads((GOLDEN / "golden.json").read_text())["cases"]
    assert cases
    for case in cases:
        ids = case["greedy_token_ids"]
        chunks = stream(tokenizer, drop_ids, ids)
        final = one_shot(tokenizer, drop_ids, ids)
        # greedy_text was decoded with special tokens kept (one case ends in "<|User|> quarter").
        assert "".join(chunks) == final == case["greedy_text"]
        assert_no_premature_replacement(chunks, final)


def test_random_sequences(tokenizer: Tokenizer, drop_ids: set[int]):
    rnd = random.Random(0)
    vocab = tokenizer.get_vocab_size()
    special = sorted(tokenizer.get_added_tokens_decoder())
    # Bias towards raw single bytes (the ids whose token is one char): they split characters most.
    single_bytes = [i for i in range(vocab) if len(tokenizer.id_to_token(i)) == 1 and i not in special]
    for _ in range(1500):
        pool = rnd.choice([range(vocab), single_bytes, single_bytes + special])
        ids = [rnd.choice(pool) for _ in range(rnd.randint(0, 40))]
        chunks = stream(tokenizer, drop_ids, ids)
        final = one_shot(tokenizer, drop_ids, ids)
        assert "".join(chunks) == final, ids
        assert_no_premature_replacement(chunks, final)


def test_drop_ids_removed_special_tokens_kept(tokenizer: Tokenizer, drop_ids: set[int]):
    ref = tokenizer.token_to_id("<|ref|>")
    end_ref = tokenizer.token_to_id("<|/ref|>")
    bos, eos = (
        tokenizer.token_to_id("<｜begin▁of▁sentence｜>"),
        tokenizer.token_to_id("<｜end▁of▁sentence｜>"),
    )
    ids = [bos, ref, *tokenizer.encode("the cat").ids, end_ref, eos]
    assert "".join(stream(tokenizer, drop_ids, ids)) == "<|ref|>the cat<|/ref|>"


@pytest.mark.parametrize("text", ["é", "中", "😀", "naïve café 中文 🎉👍🏽 — ok", "<|det|>ü😀<|/det|>中"])
def test_multibyte_characters_never_split(tokenizer: Tokenizer, drop_ids: set[int], text: str):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    chunks = stream(tokenizer, drop_ids, ids)
    assert "".join(chunks) == text
    assert not any(REPLACEMENT in c for c in chunks), chunks


def test_bytes_of_a_character_are_held_until_complete(tokenizer: Tokenizer):
    ids = tokenizer.encode("😀!").ids
    assert len(ids) >= 3  # the emoji's 4 bytes are spread over several ids in this vocab
    dec = StreamDecoder(tokenizer)
    chunks = [dec.push(i) for i in ids]
    assert chunks[:-1] == [""] * (len(ids) - 2) + ["😀"] and chunks[-1] == "!"
    assert dec.flush() == ""


def test_incomplete_tail_flushes_as_replacement(tokenizer: Tokenizer):
    emoji = tokenizer.encode("😀").ids
    dec = StreamDecoder(tokenizer)
    assert all(dec.push(i) == "" for i in emoji[:-1])
    assert dec.flush() == tokenizer.decode(emoji[:-1]) == REPLACEMENT


def test_window_stays_small(tokenizer: Tokenizer, drop_ids: set[int]):
    """Cost per token is bounded: the decoded window never grows with the sequence."""
    ids = tokenizer.encode("Stage one: naïve café 中文 🎉👍🏽, then <|ref|>the cat<|/ref|>. " * 60).ids
    dec = StreamDecoder(tokenizer, drop_ids)
    longest = 0
    out = []
    for i in ids:
        out.append(dec.push(i))
        longest = max(longest, len(dec._window))
    out.append(dec.flush())
    assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=False)
    assert longest <= 5


def test_byte_soup_window_stays_small(tokenizer: Tokenizer):
    """Even a long run of lone lead bytes (each ends in U+FFFD) restarts the window."""
    lead = tokenizer.token_to_id("ä")  # byte 0xE4 on its own
    dec = StreamDecoder(tokenizer)
    out, longest = [], 0
    for _ in range(200):
        out.append(dec.push(lead))
        longest = max(longest, len(dec._window))
    assert longest <= 5
    out.append(dec.flush())
    assert "".join(out) == REPLACEMENT * 200
