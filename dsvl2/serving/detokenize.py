"""Streaming detokenisation: turn generated ids into text chunks as they arrive.

Byte-level BPE ids carry bytes, not characters: one character of "中" or of an emoji can be split
over several ids, and decoding a prefix that ends inside a character gives U+FFFD. The decoder
(``tokenizers``' ByteLevel) joins the bytes of consecutive ordinary tokens and decodes them as
lossy UTF-8; special tokens are inserted verbatim between such byte runs. Two facts follow:

* appending ids can only change the last character of the decoded text, and only when it is
  U+FFFD (an incomplete sequence at the end, at most 3 bytes); everything before it is final;
* when the text of a window of ids ends in a complete character, the text of later ids is
  decoded independently of it, so the window can restart there.

``StreamDecoder`` therefore decodes a small window of recent ids, emits its final part at once,
holds back only a trailing U+FFFD, and restarts the window at every character boundary, keeping
the last id as left context (the usual prefix/read-offset technique, which also suits decoders
that strip a leading space). The concatenation of all chunks equals decoding all ids at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
# A window longer than this while held (byte soup) looks for an earlier restart point.
_MAX_HELD = 4


class StreamDecoder:
    """Incremental decoder for one sequence; special tokens are kept, ``drop_ids`` removed."""

    def __init__(self, tokenizer: Tokenizer, drop_ids: Iterable[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._drop = frozenset(int(i) for i in drop_ids)
        self._window: list[int] = []  # recent ids; the text before them has been emitted
        self._read = 0  # characters of decode(window) already emitted (or left context)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is final now (often "", never a split char)."""
        token_id = int(token_id)
        if token_id in self._drop:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        if not text.endswith(REPLACEMENT):
            # The window ends on a character boundary: emit all, restart with the last id as context.
            out = text[self._read :]
            self._window = [token_id]
            self._read = len(self._decode(self._window))
            return out
        # The last character may be an incomplete sequence that later bytes complete: hold it.
        final = len(text) - 1
        out = text[self._read : final]
        self._read = max(self._read, final)
        if len(self._window) > _MAX_HELD:
            self._restart(text)
        return out

    def _restart(self, text: str) -> None:
        """Drop the head of a long held window at a boundary whose text is already final.

        Boundary j is safe when decode(w[:j]) + decode(w[j:]) == decode(w): the first byte after j
        then does not continue an incomplete sequence before it (if it did, that sequence and its
        continuation would decode to fewer characters than decoded apart), so whatever follows
        decodes identically with or without the head. Only the last few boundaries are tried, so
        the cost stays bounded; the window spans only ids since the last boundary between
        characters, which real text reaches every few tokens.
        """
        window = self._window
        for j in range(len(window) - 1, max(0, len(window) - 1 - _MAX_HELD), -1):
            head = self._decode(window[:j])
            if head + self._decode(window[j:]) == text:
                # head is a strict prefix of the text and at most len(text) - 1 == read chars long.
                self._window = window[j:]
                self._read -= len(head)
                return

    def flush(self) -> str:
        """End of sequence: return what is still held (a truly incomplete tail stays U+FFFD)."""
        out = self._decode(self._window)[self._read :]
        self._window = []
        self._read = 0
        return out
