"""Token ids -> user-visible text, shared by the terminal chat and the server.

Choices:
- Byte-level BPE tokens can split a multi-byte UTF-8 character; decoding such a prefix gives U+FFFD. The
  `IncrementalDecoder` holds back text while the pending tokens decode to a trailing U+FFFD, and restarts
  its window at every clean boundary, so each step decodes only a few tokens (O(1), not O(n)). After
  `MAX_PENDING` tokens that never complete a character it emits them as they are (invalid bytes stay U+FFFD).
- `StopMatcher` implements OpenAI's `stop` strings on text: the stop string itself is never shown, and
  text that could still be the start of a stop string is held back until it is decided.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
MAX_PENDING = 8  # a UTF-8 character is at most 4 bytes; a few tokens more is plenty


class IncrementalDecoder:
    """Feed token ids one at a time (or several); get back only complete, newly decoded text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, ids: int | Sequence[int]) -> str:
        self.pending += [ids] if isinstance(ids, int) else list(ids)
        text = self.tokenizer.decode(self.pending)
        if text.endswith(REPLACEMENT) and len(self.pending) < MAX_PENDING:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


class StopMatcher:
    """Cuts a text stream at the first occurrence of any stop string."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Returns the text that is safe to show now; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)]
        keep = 0  # longest suffix of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out
