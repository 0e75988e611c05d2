"""The shipped default model (trained tiny Shakespeare MoE) and its dense draft model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from spac_llamacpp import Llama
from spac_llamacpp.gguf.info import inspect_model
from spac_llamacpp.models.bpe import read_tokenizer
from spac_llamacpp.models.default import (
    DEFAULT_LABEL,
    corpus_words_path,
    default_draft_path,
    default_model_path,
)
from spac_llamacpp.models.factory import write_tiny_model
from spac_llamacpp.models.tinylm.corpus import known_word_fraction, read_word_list
from spac_llamacpp.models.tinylm.recipe import DENSE_SPEC, MOE_SPEC
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.sim.trace_stats import realism_report
from spac_llamacpp.tools.generate import GenerationStats, stream_generate

BIN = Path(sys.executable).parent
COMMON = {"n_ctx": 512, "verbose": False, "seed": 0, "n_threads": 2}
PROMPTS = ("Once upon a time", "KING.\nWhat news, my lord?", "O Romeo, Romeo!", "The king is dead, and")
N_GEN = 48
READABLE = 0.9  # fraction of generated words that must be corpus words (see test_random_model_is_unreadable)


@pytest.fixture(scope="module")
def words() -> set[str]:
    return read_word_list(corpus_words_path())


@pytest.fixture(scope="module")
def random_twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model of the default's exact shape and tokenizer (the factory's weights)."""
    path = tmp_path_factory.mktemp("twin") / "random-twin.gguf"
    return write_tiny_model(path, MOE_SPEC, dtype="f16", seed=0, vocab=read_tokenizer(str(default_model_path())))


def greedy(llm: llama_cpp.Llama, prompt: str, n: int = N_GEN) -> tuple[str, list[int]]:
    stats = GenerationStats()
    text = "".join(stream_generate(llm, prompt, n, temperature=0.0, stats=stats))
    return text, stats.token_ids


def generations(path: Path) -> str:
    llm = llama_cpp.Llama(str(path), **COMMON)
    try:
        return "\n".join(greedy(llm, p)[0] for p in PROMPTS)
    finally:
        llm.close()


def trace_of(path: Path) -> RoutingTrace:
    llm = Llama(str(path), routing_history=None, **COMMON)
    try:
        for p in PROMPTS:
            greedy(llm, p)
        return RoutingTrace.from_log(llm.routing)
    finally:
        llm.close()


def test_shipped_files_and_metadata() -> None:
    path = default_model_path()
    draft = default_draft_path()
    total = path.stat().st_size + draft.stat().st_size + corpus_words_path().stat().st_size
    assert total < 30 * 2**20  # "tens of MB at most"
    info = inspect_model(path)
    assert info.architecture == "llama"
    assert info.n_expert == MOE_SPEC.n_expert == 16
    assert set(info.n_expert_used) == {MOE_SPEC.n_expert_used} == {2}
    assert info.block_count == MOE_SPEC.n_layer and info.moe_layers == tuple(range(MOE_SPEC.n_layer))
    assert info.gating == "softmax" and info.n_embd == MOE_SPEC.n_embd
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16  # non-experts stay F16 (AMX crash)
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied to token_embd
    assert "Shakespeare" in DEFAULT_LABEL


def test_draft_shares_the_vocabulary() -> None:
    target, draft = default_model_path(), default_draft_path()
    assert read_tokenizer(str(target)) == read_tokenizer(str(draft))
    meta_t = gguf.GGUFReader(target).fields
    meta_d = gguf.GGUFReader(draft).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert meta_t[key].contents() == meta_d[key].contents(), key
    assert meta_d["general.architecture"].contents() == "llama"
    assert "llama.expert_count" not in meta_d  # dense
    assert int(meta_d["llama.block_count"].contents()) == DENSE_SPEC.n_layer
    # llama.cpp sees the same vocabulary too
    lt = llama_cpp.Llama(str(target), vocab_only=True, verbose=False)
    ld = llama_cpp.Llama(str(draft), vocab_only=True, verbose=False)
    try:
        assert lt.n_vocab() == ld.n_vocab() == MOE_SPEC.n_vocab
        text = b"ROMEO.\nBut soft, what light through yonder window breaks?"
        assert lt.tokenize(text) == ld.tokenize(text)
    finally:
        lt.close()
        ld.close()


def test_spac_run_default_writes_readable_text(words: set[str]) -> None:
    proc = subprocess.run([str(BIN / "spac-run"), "-n", "64", "--stats"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "embedded default" in proc.stderr and "Shakespeare" in proc.stderr
    assert proc.stdout.startswith("Once upon a time")
    generated = proc.stdout[len("Once upon a time"):]
    fraction, n = known_word_fraction(generated, words)
    assert n >= 20, generated
    assert fraction >= READABLE, (fraction, generated)
    frac_all, _ = known_word_fraction(generations(default_model_path()), words)
    assert frac_all >= READABLE


def test_random_model_is_unreadable(words: set[str], random_twin: Path) -> None:
    """The readability check is real: the same shape and tokenizer with random weights fails it."""
    fraction, n = known_word_fraction(generations(random_twin), words)
    assert n >= 40
    assert fraction < READABLE - 0.2, fraction


def test_routing_is_learned_not_uniform(random_twin: Path) -> None:
    half = MOE_SPEC.n_expert // 2
    trained = realism_report(trace_of(default_model_path()), capacities=[half]).to_json()
    random = realism_report(trace_of(random_twin), capacities=[half]).to_json()
    hit, uniform = trained["lru"][str(half)]["hit_rate"], trained["lru"][str(half)]["uniform"]
    assert uniform == pytest.approx(0.5, abs=0.05)
    assert hit > uniform + 0.08, trained["lru"]
    assert hit > random["lru"][str(half)]["hit_rate"] + 0.05, (trained["lru"], random["lru"])
    # every expert gets used (the load-balancing loss worked: no collapse onto a few experts)
    assert min(trained["normalized_entropy"]) > 0.8


def test_greedy_identical_to_stock() -> None:
    path = str(default_model_path())
    stock = llama_cpp.Llama(path, **COMMON)
    expected = greedy(stock, PROMPTS[1], 32)[1]
    stock.close()
    spac = Llama(path, **COMMON)
    try:
        assert greedy(spac, PROMPTS[1], 32)[1] == expected
        assert spac.routing is not None and spac.routing.bad_ids == 0
    finally:
        spac.close()


def test_torch_reimplementation_matches_llama_cpp() -> None:
    """The PyTorch model on the shipped (dequantized) weights gives llama.cpp's logits."""
    pytest.importorskip("torch")
    from spac_llamacpp.models.tinylm.export import load_gguf_model
    from spac_llamacpp.models.tinylm.verify import compare, llama_cpp_run, torch_logits, verify_tokens

    for path in (default_model_path(), default_draft_path()):
        model, vocab = load_gguf_model(path)
        tokens = verify_tokens(vocab)
        ll, _ = llama_cpp_run(path, tokens)
        check = compare(path.name, torch_logits(model, tokens), ll, mean_abs=0.05, top1_min=0.97)
        assert check.ok, check.line()
        assert np.isfinite(ll).all()
