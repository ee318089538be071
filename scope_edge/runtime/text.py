"""Token bytes to streamed text: whole characters, stop strings held back."""
from __future__ import annotations

import codecs


class TextStream:
    """Turns token bytes into text that never splits a UTF-8 character and
    never shows a possible start of a stop string before it is resolved."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._held = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        self._held += self._decoder.decode(data)
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:  # the earliest stop string wins
            out, self._held, self.stopped = self._held[: min(hits)], "", True
            return out
        keep = self._longest_stop_prefix()
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _longest_stop_prefix(self) -> int:
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:k]):
                    best = k
                    break
        return best
