"""Byte-level BPE tokenizers in the GPT-2 format that llama.cpp loads (``tokenizer.ggml.model = gpt2``).

One job: train a vocabulary on a text, encode text with it exactly as llama.cpp's ``gpt-2``
pre-tokenizer + BPE does (for the ASCII texts we train on), and write it to / read it from a GGUF.
Used by the test-model factory (a small built-in English text) and by the trained default model
(Shakespeare), so both share one implementation.

Layout of a vocabulary: ids 0-255 are the 256 bytes (in GPT-2's printable byte-to-unicode
spelling), then the merged tokens in merge order, then ``<|reserved_N|>`` padding if the text ran
out of pairs, then :data:`SPECIAL_TOKENS` (bos = ``<|endoftext|>``, eos = ``<|im_end|>``).
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import gguf

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Control tokens, always the last ids of the vocabulary (bos = <|endoftext|>, eos = <|im_end|>)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, embedded in every GGUF written with :func:`add_tokenizer`."""

TOKEN_NORMAL = 1
TOKEN_CONTROL = 3

# GPT-2's pre-tokenizer (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2 regex), restricted to ASCII: the
# texts we train on are ASCII, where \p{L} is [A-Za-z] and \p{N} is [0-9].
PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable character map (as in tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return tuple(chr(table[b]) for b in range(256))


@dataclass(frozen=True)
class BpeVocab:
    """A byte-level BPE vocabulary: token texts (byte-level spelling), token types and merges."""

    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)
    _ranks: dict[tuple[str, str], int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.tokens)})
        ranks = {tuple(m.split(" ")): r for r, m in enumerate(self.merges)}
        object.__setattr__(self, "_ranks", ranks)

    @property
    def n_vocab(self) -> int:
        """Number of tokens."""
        return len(self.tokens)

    @property
    def bos_id(self) -> int:
        """Id of ``<|endoftext|>`` (bos and pad)."""
        return self._ids["<|endoftext|>"]

    @property
    def eos_id(self) -> int:
        """Id of ``<|im_end|>`` (eos)."""
        return self._ids["<|im_end|>"]

    def silent_ids(self) -> list[int]:
        """Ids that should never be generated as text: control tokens and non-printable bytes.

        The byte tokens kept are printable ASCII and newline.
        """
        printable = set(range(0x20, 0x7F)) | {0x0A}
        return [i for i, t in enumerate(self.types) if t == TOKEN_CONTROL or (i < 256 and i not in printable)]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos), as llama.cpp's gpt-2 BPE tokenizes ASCII text.

        Each pre-token is split into bytes and the lowest-ranked merge present is applied
        (to every occurrence, left to right) until none applies.
        """
        out: list[int] = []
        cache: dict[str, tuple[int, ...]] = {}
        for word in PRETOKENIZE.findall(text):
            ids = cache.get(word)
            if ids is None:
                ids = cache[word] = self._encode_word(word)
            out.extend(ids)
        return out

    def _encode_word(self, word: str) -> tuple[int, ...]:
        b2u = byte_to_unicode()
        syms = [b2u[b] for b in word.encode("utf-8")]
        ranks = self._ranks
        while len(syms) > 1:
            rank, best = min((ranks.get(p, len(ranks)), p) for p in zip(syms, syms[1:], strict=False))
            if rank == len(ranks):
                break
            syms = _merge_pair(syms, best)
        return tuple(self._ids[s] for s in syms)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (control tokens are dropped)."""
        u2b = {c: b for b, c in enumerate(byte_to_unicode())}
        data = bytearray()
        for i in ids:
            if self.types[i] != TOKEN_CONTROL:
                data.extend(u2b[c] for c in self.tokens[i])
        return data.decode("utf-8", errors="replace")


def _merge_pair(syms: list[str], pair: tuple[str, str]) -> list[str]:
    """``syms`` with every non-overlapping occurrence of ``pair`` (left to right) joined."""
    out: list[str] = []
    i = 0
    while i < len(syms):
        if i + 1 < len(syms) and syms[i] == pair[0] and syms[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(syms[i])
            i += 1
    return out


def train_bpe(text: str, n_vocab: int) -> BpeVocab:
    """Train a byte-level BPE of exactly ``n_vocab`` tokens on ``text`` (deterministic).

    Every step merges the most frequent adjacent pair (ties: the largest pair), counting pairs
    within pre-tokens only. Pair counts are updated incrementally, only for the words that
    contain the merged pair, so megabytes of text train in about a minute.
    """
    b2u = byte_to_unicode()
    n_merged_max = n_vocab - 256 - len(SPECIAL_TOKENS)
    if n_merged_max < 0:
        raise ValueError(f"n_vocab must be at least {256 + len(SPECIAL_TOKENS)}")
    word_counts = Counter(PRETOKENIZE.findall(text))
    words = [[b2u[b] for b in w.encode("utf-8")] for w in word_counts]
    freqs = list(word_counts.values())
    pairs: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, word in enumerate(words):
        for pair in zip(word, word[1:], strict=False):
            pairs[pair] += freqs[wi]
            where[pair].add(wi)

    tokens: list[str] = list(b2u)
    known = set(tokens)
    merges: list[str] = []
    while len(tokens) - 256 < n_merged_max and pairs:
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(f"{best[0]} {best[1]}")
        joined = best[0] + best[1]
        if joined not in known:  # two different merges can yield the same string
            known.add(joined)
            tokens.append(joined)
        for wi in sorted(where.pop(best)):
            old = words[wi]
            new = _merge_pair(old, best)
            f = freqs[wi]
            for pair in zip(old, old[1:], strict=False):
                pairs[pair] -= f
                if pairs[pair] == 0:
                    del pairs[pair]
            for pair in zip(new, new[1:], strict=False):
                pairs[pair] += f
                where[pair].add(wi)
            words[wi] = new
        pairs.pop(best, None)
    types = [TOKEN_NORMAL] * len(tokens)
    n_pad = n_merged_max - (len(tokens) - 256)
    tokens += [f"<|reserved_{i}|>" for i in range(n_pad)]
    types += [TOKEN_CONTROL] * n_pad
    tokens += list(SPECIAL_TOKENS)
    types += [TOKEN_CONTROL] * len(SPECIAL_TOKENS)
    return BpeVocab(tuple(tokens), tuple(types), tuple(merges))


def add_tokenizer(writer: gguf.GGUFWriter, vocab: BpeVocab, chat_template: str = CHAT_TEMPLATE) -> None:
    """Add ``vocab`` (gpt2 model, ``gpt-2`` pre-tokenizer, bos/eos/pad) and a chat template to ``writer``."""
    w = writer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(list(vocab.tokens))
    w.add_token_types(list(vocab.types))
    w.add_token_merges(list(vocab.merges))
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_pad_token_id(vocab.bos_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template)


def read_tokenizer(path: str) -> BpeVocab:
    """The vocabulary stored in the GGUF at ``path`` (as written by :func:`add_tokenizer`)."""
    reader = gguf.GGUFReader(path)

    def strings(key: str) -> tuple[str, ...]:
        f = reader.fields[key]
        return tuple(bytes(f.parts[i]).decode("utf-8") for i in f.data)

    types_field = reader.fields["tokenizer.ggml.token_type"]
    types = tuple(int(types_field.parts[i][0]) for i in types_field.data)
    return BpeVocab(strings("tokenizer.ggml.tokens"), types, strings("tokenizer.ggml.merges"))
