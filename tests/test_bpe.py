"""The byte-level BPE tokenizer: training, encoding as llama.cpp does, GGUF round trip."""

from __future__ import annotations

from collections import Counter

import llama_cpp
import pytest

from spac_llamacpp.models.bpe import PRETOKENIZE, SPECIAL_TOKENS, byte_to_unicode, read_tokenizer, train_bpe
from spac_llamacpp.models.factory import factory_vocab

TEXT = (
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n"
) * 3 + "Numbers 12 345, symbols --!? and  double  spaces\n\n\nend"


def naive_merges(text: str, n_merges: int) -> list[str]:
    """Reference trainer: recount every pair after every merge."""
    b2u = byte_to_unicode()
    words = Counter(tuple(b2u[b] for b in w.encode()) for w in PRETOKENIZE.findall(text))
    merges: list[str] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, c in words.items():
            for p in zip(word, word[1:], strict=False):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(f"{best[0]} {best[1]}")
        new: Counter[tuple[str, ...]] = Counter()
        for word, c in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return merges


def test_incremental_training_matches_reference() -> None:
    vocab = train_bpe(TEXT, 256 + 60 + len(SPECIAL_TOKENS))
    assert list(vocab.merges) == naive_merges(TEXT, len(vocab.merges))
    assert vocab.n_vocab == 256 + 60 + len(SPECIAL_TOKENS)
    assert vocab.tokens[-3:] == SPECIAL_TOKENS and vocab.bos_id == vocab.n_vocab - 3
    assert train_bpe(TEXT, 400) == train_bpe(TEXT, 400)  # deterministic


def test_pads_when_pairs_run_out() -> None:
    vocab = train_bpe("ab ab ab", 300)
    assert vocab.n_vocab == 300 and vocab.tokens[-4] == f"<|reserved_{300 - 256 - 3 - 3}|>"
    assert vocab.encode("ab ab") == [vocab.tokens.index("ab"), vocab.tokens.index("Ġab")]
    with pytest.raises(ValueError):
        train_bpe(TEXT, 100)


def test_encode_decode_and_llama_cpp_agree(tiny_model) -> None:
    path = tiny_model("llama", "f16")
    vocab = read_tokenizer(str(path))
    assert vocab == factory_vocab(512)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in (TEXT, "The cat sat on the mat", " leading space", "it's 'quoted' -- dashes\n\n"):
            ids = vocab.encode(text)
            assert vocab.decode(ids) == text
            assert llm.tokenize(text.encode(), add_bos=False) == ids
    finally:
        llm.close()
