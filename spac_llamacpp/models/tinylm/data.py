"""Token streams and training windows for the tiny models (numpy only).

Every training window starts at the beginning of a line and is prefixed with the bos token, which
is what llama.cpp feeds at inference (``add_bos`` is on): ``x = [bos, t_s, ..., t_{s+T-2}]`` and
``y = [t_s, ..., t_{s+T-1}]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spac_llamacpp.models.bpe import BpeVocab, byte_to_unicode


@dataclass
class TokenStream:
    """Concatenated token ids of some texts and the positions where a line starts."""

    ids: np.ndarray  # [n] int64
    line_starts: np.ndarray  # [m] int64, positions p with ids[p-1] ending in a newline (and 0)

    @classmethod
    def from_texts(cls, texts: list[str], vocab: BpeVocab) -> TokenStream:
        """Tokenize ``texts`` one by one and join them, separated by a blank line."""
        ids: list[int] = []
        for text in texts:
            if ids:
                ids += vocab.encode("\n")
            ids += vocab.encode(text)
        arr = np.asarray(ids, dtype=np.int64)
        newline = byte_to_unicode()[ord("\n")]
        ends_line = np.array([t.endswith(newline) for t in vocab.tokens], dtype=bool)
        starts = np.flatnonzero(ends_line[arr[:-1]]) + 1
        return cls(arr, np.concatenate([[0], starts]).astype(np.int64))

    def window_starts(self, seq: int) -> np.ndarray:
        """Line starts ``s`` with a full window ``ids[s : s + seq]``."""
        return self.line_starts[self.line_starts + seq <= len(self.ids)]

    def windows(self, starts: np.ndarray, seq: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` [len(starts), seq] int64 for the given window starts (see module docstring)."""
        y = np.stack([self.ids[s : s + seq] for s in starts])
        x = np.concatenate([np.full((len(starts), 1), bos, dtype=np.int64), y[:, :-1]], axis=1)
        return x, y

    def eval_starts(self, seq: int, max_windows: int | None = None) -> np.ndarray:
        """Deterministic, nearly non-overlapping windows covering the stream: the first line start
        at or after each multiple of ``seq - 1``; at most ``max_windows`` of them, evenly spread."""
        valid = self.window_starts(seq)
        if len(valid) == 0:
            return valid
        targets = np.arange(0, len(self.ids) - seq + 1, seq - 1)
        idx = np.unique(np.minimum(np.searchsorted(valid, targets), len(valid) - 1))
        starts = valid[idx]
        if max_windows is not None and len(starts) > max_windows:
            starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
        return starts
