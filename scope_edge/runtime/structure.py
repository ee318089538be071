"""Chat structure: which fed tokens are the chat template's markers and which
the system message's, so a policy's selection can be made around them.

Each fed token gets one mark, from the token and the marks before it (so a
cache continued over many calls is marked once, token by token):
  OPEN           a control token that is not end-of-generation
                 (<|im_start|>, <|start_header_id|>, a BOS);
  HEADER         the role after an OPEN: the tokens up to and including
                 the first with a newline, at most MAX_HEADER
                 ("user", "\\n"; Llama 3's "system", <|end_header_id|>, "\\n\\n");
  CLOSE          an end-of-generation control token (<|im_end|>, <|eot_id|>);
  SYSTEM         the system turn: its header, its content and its CLOSE;
  PLAIN          everything else (user and assistant content, the text
                 between turns).
Only the vocabulary's control attribute and its pieces are read: no
template's strings are written here.
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence

import llama_cpp
import numpy as np

from .model import Model

PLAIN, OPEN, HEADER, CLOSE, SYSTEM, SYSTEM_CLOSE = range(6)
TEMPLATE_MARKS = (OPEN, HEADER, CLOSE)
SYSTEM_MARKS = (SYSTEM, SYSTEM_CLOSE)
MAX_HEADER = 8  # a role header longer than this without a newline is taken as content
SYSTEM_ROLE = "system"


class StructureMarker:
    """Marks tokens as they are fed (see the module doc), for one model's
    vocabulary; what it learns of a token id is kept."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._kinds: dict[int, tuple[bool, bool, bool]] = {}

    def _kind(self, token: int) -> tuple[bool, bool, bool]:
        """(control, end of generation, its piece holds a newline)."""
        kind = self._kinds.get(token)
        if kind is None:
            attr = llama_cpp.llama_vocab_get_attr(self.model.vocab, token)
            kind = (bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL), self.model.is_eog(token),
                    b"\n" in self.model.piece(token))
            self._kinds[token] = kind
        return kind

    def extend(self, marks: array[int], tokens: Sequence[int]) -> None:
        """Append the marks of the tokens fed after len(marks): tokens holds
        every token fed (marks' tokens first)."""
        for i in range(len(marks), len(tokens)):
            marks.append(self._mark(marks, tokens, i))

    def _mark(self, marks: array[int], tokens: Sequence[int], i: int) -> int:
        control, eog, _ = self._kind(tokens[i])
        prev = marks[i - 1] if i else PLAIN
        if control:
            if eog:
                return SYSTEM_CLOSE if prev == SYSTEM else CLOSE
            return OPEN
        if prev == OPEN:
            return HEADER
        if prev == HEADER:
            start = self._header_start(marks, i)
            if not self._kind(tokens[i - 1])[2] and i - start < MAX_HEADER:
                return HEADER
            if self._role(marks, tokens, start, i) != SYSTEM_ROLE:
                return PLAIN
            marks[start:i] = array("b", [SYSTEM] * (i - start))  # the system turn's header is the system's
            return SYSTEM
        return SYSTEM if prev == SYSTEM else PLAIN

    @staticmethod
    def _header_start(marks: array[int], i: int) -> int:
        """First index of the run of OPEN / HEADER marks ending at i - 1."""
        j = i
        while j > 0 and marks[j - 1] in (OPEN, HEADER) and i - j < 4 * MAX_HEADER:
            j -= 1
        return j

    def _role(self, marks: array[int], tokens: Sequence[int], start: int, end: int) -> str:
        """The role a header names: the text of its HEADER tokens."""
        text = b"".join(self.model.piece(tokens[j]) for j in range(start, end) if marks[j] == HEADER)
        return text.decode("utf-8", errors="replace").strip().lower()


def pinned(marks: np.ndarray, cap: int) -> np.ndarray:
    """Indices into marks of the cells kept as structure, at most cap: the
    system turn's first (oldest first), then the template's markers newest
    first; the rest are ordinary cells."""
    system = np.flatnonzero(np.isin(marks, SYSTEM_MARKS))[:cap]
    template = np.flatnonzero(np.isin(marks, TEMPLATE_MARKS))[::-1][: cap - len(system)]
    return np.sort(np.concatenate([system, template]))
