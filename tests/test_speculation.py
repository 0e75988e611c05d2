"""Draft providers, frequency maps and acceptance: speculation changes speed, never output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from spac_llamacpp import Llama
from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.speculation.drafts import (
    AdaptiveDraftLength,
    DraftVocabError,
    GGUFDraftModel,
    PromptLookupDraft,
    check_same_vocabulary,
)
from spac_llamacpp.tools.generate import GenerationStats, stream_generate

COMMON = {"n_ctx": 512, "verbose": False, "seed": 0, "n_threads": 2}
PROMPT = "the cat sat on the mat. the cat sat on the"
BIN = Path(sys.executable).parent


def greedy(llm: llama_cpp.Llama, n: int = 32, prompt: str = PROMPT) -> list[int]:
    stats = GenerationStats()
    for _ in stream_generate(llm, prompt, n, temperature=0.0, stats=stats):
        pass
    return stats.token_ids


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2", "gpt-oss"])
def test_drafting_never_changes_greedy_output(tiny_model, tiny_dense_model, arch):
    path = str(tiny_model(arch))
    expected = greedy(Llama(path, **COMMON))
    for kwargs in (
        {"draft_model_path": path},  # a perfect draft: every token accepted
        {"draft_model_path": str(tiny_dense_model)},  # a poor draft: most rejected
        {"draft_model_path": str(tiny_dense_model), "adaptive_draft": False, "n_draft": 3},
        {"draft_model": PromptLookupDraft()},
        {"draft_model": LlamaPromptLookupDecoding(num_pred_tokens=3)},  # the stock provider
    ):
        llm = Llama(path, **kwargs, **COMMON)
        assert greedy(llm) == expected, kwargs
        llm.close()


def test_drafting_past_n_batch_tokens(tiny_model):
    """The stock class, given a draft, copies every row's logits into ``scores`` sized for n_batch rows and
    fails past n_batch tokens; ours keeps verification logits in the context only, so a long generation runs,
    and gives the text of the same run with a batch that never fills. logits_all=True still fills scores."""
    path = str(tiny_model("qwen3moe"))

    def text(n_batch: int, **kw) -> tuple[str, Llama]:
        llm = Llama(path, n_batch=n_batch, draft_model=PromptLookupDraft(), **{**COMMON, "n_ctx": 256, **kw})
        out = llm.create_completion(PROMPT, max_tokens=80, temperature=0.0)
        assert out["usage"]["completion_tokens"] == 80
        return out["choices"][0]["text"], llm

    small, llm = text(16)
    assert llm.speculation.n_verifications > 0 and llm.n_tokens > 16
    llm.close()
    big, llm = text(256)
    llm.close()
    assert small == big
    _, llm = text(16, logits_all=True)
    n = llm.n_tokens
    assert np.isfinite(llm.scores[:n]).all() and np.abs(llm.scores[n - 1]).sum() > 0
    llm.close()


def test_perfect_draft_frequency_maps(tiny_model):
    path = str(tiny_model("qwen3moe"))
    llm = Llama(path, draft_model_path=path, n_draft=2, **COMMON)
    out = greedy(llm, n=40)
    spec = llm.speculation
    assert spec.acceptance_rate == 1.0 and spec.n_verifications >= 3
    assert spec.n_draft > 2  # the adaptive length grew on full acceptance
    k_used = llm.moe_info.n_expert_used
    verifications = [m for m in spec.maps if m.n_draft]
    assert verifications and all(m.n_tokens == m.n_draft + 1 for m in verifications)
    last = llm.moe_info.block_count - 1
    for m in spec.maps:
        for layer in llm.moe_info.moe_layers:
            # a verification asks for every row's logits: every row of every layer is routed; other steps
            # (the prompt) ask for the last row's only, and llama.cpp's last layer computes the output rows only
            rows = m.n_tokens if m.n_draft or layer != last else 1
            assert m.counts[layer].sum() == rows * k_used[layer], (m.step, layer)
        if m.accepted is not None:
            assert m.accepted_mask.sum() == m.n_tokens - m.n_draft + m.accepted
            np.testing.assert_array_equal(m.counts_where(np.ones(m.n_tokens, bool)), m.counts)
    # one verification step yields several tokens: fewer steps than tokens
    assert llm.routing.n_steps < len(out)
    # prefix reuse: the draft model evaluated each context token about once, not once per step
    assert llm._draft_llm.evaluated_tokens <= len(llm.tokenize(PROMPT.encode())) + len(out) + 2 * spec.n_verifications
    llm.close()


def test_poor_draft_shrinks_and_records_rejections(tiny_model, tiny_dense_model):
    llm = Llama(str(tiny_model("qwen3moe")), draft_model_path=str(tiny_dense_model), n_draft=6, **COMMON)
    greedy(llm, n=40)
    spec = llm.speculation
    assert spec.acceptance_rate < 0.5 and spec.n_draft < 6
    resolved = [m for m in spec.maps if m.n_draft and m.accepted is not None]
    assert any(m.accepted < m.n_draft for m in resolved)
    for m in resolved:
        assert m.accepted_mask[: m.accepted + 1].all() and not m.accepted_mask[m.accepted + 1:].any()
    llm.close()


def test_draft_catch_up_is_bounded_by_its_window(tiny_model, tiny_dense_model):
    """A draft far behind the input restarts on the input's last max_catch_up tokens, then reuses them; an input
    inside the window drafts exactly as without one; greedy output is unchanged with a tiny window."""
    target = Llama(str(tiny_model("qwen3moe")), **COMMON)
    ids = np.asarray(target.tokenize((PROMPT + " " + PROMPT).encode()), dtype=np.intc)
    assert len(ids) > 20
    full = GGUFDraftModel(str(tiny_dense_model), n_draft=3, n_ctx=512, max_catch_up=None, n_threads=2)
    win = GGUFDraftModel(str(tiny_dense_model), n_draft=3, n_ctx=512, max_catch_up=8, n_threads=2)
    first = win(ids)
    assert win.evaluated_tokens == 8 + 2 and win.last_catch_up_seconds > 0  # 8 of the input, 2 to draft 3
    longer = np.concatenate([ids, [first[0] ^ 1]]).astype(np.intc)  # not the draft's own next token
    win(longer)
    assert win.evaluated_tokens == 10 + 1 + 2  # one new token on the kept window, then drafting
    short = ids[:6]
    np.testing.assert_array_equal(win(short), full(short))  # inside the window: the same context, same drafts
    with pytest.raises(SpacError, match="max_catch_up"):
        GGUFDraftModel(str(tiny_dense_model), max_catch_up=0)
    full.close()
    win.close()
    expected = greedy(target)
    llm = Llama(str(tiny_model("qwen3moe")), draft_model_path=str(tiny_dense_model),
                draft_kwargs={"max_catch_up": 4}, **COMMON)
    assert llm._draft_llm.max_catch_up == 4
    assert greedy(llm) == expected
    llm.close()
    target.close()


def test_adaptive_draft_length():
    a = AdaptiveDraftLength(k_init=4, k_min=1, k_max=8)
    for _ in range(20):
        k = a.update(a.k, a.k)
    assert k == 8
    for _ in range(20):
        k = a.update(k, 0)
    assert k == 1
    with pytest.raises(SpacError):
        AdaptiveDraftLength(k_init=9, k_max=8)


def test_prompt_lookup_uses_the_most_recent_match():
    d = PromptLookupDraft(n_draft=3, max_ngram=2)
    ids = np.array([5, 6, 1, 2, 5, 6, 3, 4, 9, 5, 6], dtype=np.intc)
    assert d(ids).tolist() == [3, 4, 9]
    assert d(np.array([1, 2, 3], dtype=np.intc)).tolist() == []


def test_vocabulary_mismatch_is_one_line(tiny_model, tmp_path):
    other = write_tiny_moe(tmp_path / "other.gguf", "qwen3moe", n_vocab=300)
    with pytest.raises(DraftVocabError) as exc:
        Llama(str(tiny_model("qwen3moe")), draft_model_path=str(other), **COMMON)
    assert "\n" not in str(exc.value) and "vocabulary" in str(exc.value)


def test_vocabulary_texts_are_compared(tiny_model, monkeypatch):
    target = llama_cpp.Llama(str(tiny_model("qwen3moe")), **COMMON)
    draft = llama_cpp.Llama(str(tiny_model("olmoe")), **COMMON)
    check_same_vocabulary(target, draft)  # the factory's archs share one tokenizer
    original = draft._model.token_get_text
    monkeypatch.setattr(draft._model, "token_get_text", lambda t: "X" if t == target.n_vocab() - 1 else original(t))
    with pytest.raises(DraftVocabError):
        check_same_vocabulary(target, draft)
    target.close()
    draft.close()


def test_cli_draft_and_lookup(tiny_model, tmp_path):
    path = str(tiny_model("qwen2moe"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "spac-run"), path, "-p", PROMPT, "-n", "16", *args],
                              capture_output=True, text=True, timeout=120)

    plain = run()
    drafted = run("--draft", path, "--stats")
    lookup = run("--lookup", "--stats")
    assert plain.returncode == drafted.returncode == lookup.returncode == 0, drafted.stderr + lookup.stderr
    assert drafted.stdout == plain.stdout == lookup.stdout
    assert "speculation (GGUFDraftModel)" in drafted.stderr and "accepted (100.0%)" in drafted.stderr
    assert "speculation (PromptLookupDraft)" in lookup.stderr
    both = run("--lookup", "--draft", path)
    assert both.returncode == 2 and both.stderr.startswith("error: ")
    missing = run("--draft", str(tmp_path / "none.gguf"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_trace_records_drafts_and_acceptance(tiny_model, tmp_path):
    path = str(tiny_model("qwen3moe"))
    out = tmp_path / "t.npz"
    proc = subprocess.run([str(BIN / "spac"), "trace", path, "--draft", path, "-p", PROMPT, "-n", "24",
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    t = RoutingTrace.load(out)
    assert t.step_n_draft is not None and t.step_n_draft[0] == 0 and t.step_n_draft[1:].max() > 0
    verified = t.step_n_draft > 0
    np.testing.assert_array_equal(t.step_n_tokens[verified], t.step_n_draft[verified] + 1)
    known = t.step_accepted >= 0
    assert (t.step_accepted[known & verified] == t.step_n_draft[known & verified]).all()  # perfect draft


def _controller(acceptance: float, cost, **kw) -> AdaptiveDraftLength:
    a = AdaptiveDraftLength(k_init=4, k_min=1, k_max=8, step_cost=lambda ns: [cost(n) for n in ns], **kw)
    a.acceptance = acceptance
    return a


def test_draft_length_picks_greedy_when_reads_dominate():
    # every token of a verify pass brings in experts that must be read: the step costs in proportion to its
    # tokens, so even 60% acceptance yields fewer tokens per second than plain decoding
    a = _controller(0.6, lambda n: 0.050 * n)
    assert a.choose() == 0 and a.next_length() == 0
    assert a.expected_tokens(0) / 0.050 > max(a.expected_tokens(k) / (0.050 * (k + 1)) for k in range(1, 9))
    # the union grows with diminishing returns but the reads still dominate: greedy at low acceptance
    assert _controller(0.3, lambda n: 0.010 + 0.050 * (1 - 0.8 ** n) / 0.2).choose() == 0


def test_draft_length_drafts_when_acceptance_is_high():
    # the step's cost is mostly fixed (the same experts, read once for every token of the batch): at 90%
    # acceptance the longest draft pays
    a = _controller(0.9, lambda n: 0.050 + 0.002 * n, probe_every=2)
    assert a.choose() == 8
    assert [a.next_length() for _ in range(2)] == [0, 1]  # on a tier: greedy first, then a probe
    a.update(1, 1)
    assert a.next_length() == 8
    # in between (70% acceptance, each token adds a fifth of the fixed cost): a middle length, k = 3 by hand
    # (tokens per second 20, 28.3, 31.3, 31.7, 30.8 for k = 0..4); a slow draft provider shortens it
    mid = _controller(0.7, lambda n: 0.040 + 0.010 * n)
    k = mid.choose()
    assert k == 3
    mid.observe_draft_time(0.010 * 4, 4)  # 10 ms per drafted token
    assert mid.choose() < k


def test_draft_length_probes_acceptance_while_greedy():
    a = _controller(0.2, lambda n: 0.050 * n, probe_every=4)
    lengths = [a.next_length() for _ in range(8)]
    assert lengths == [0, 0, 0, 1, 0, 0, 0, 1] and a.probes == 2  # one verification of k_min per 4 steps
    for _ in range(40):  # the probes found high acceptance, and the cost model now favours drafting
        a.update(1, 1)
    a.step_cost = lambda ns: [0.050 + 0.002 * n for n in ns]
    # the cost model now favours drafting, but a greedy controller returns to it only through a probe (drafting
    # after greedy steps first pays the draft's catch-up)
    waits = [a.next_length() for _ in range(a.probe_gap)]
    assert waits[:-1] == [0] * (a.probe_gap - 1) and waits[-1] == 1
    a.update(1, 1)
    assert a.next_length() == 8
    with pytest.raises(SpacError):
        AdaptiveDraftLength(probe_every=0)
    with pytest.raises(SpacError):
        AdaptiveDraftLength(probe_every=32, probe_max=16)


def test_draft_length_probes_less_often_while_greedy_keeps_winning():
    """A probe after which greedy still wins doubles the gap to the next one (the draft's catch-up is paid at
    every probe), up to probe_max; a probe that makes drafting worth it resets the gap."""
    a = _controller(0.2, lambda n: 0.050 * n, probe_every=4, probe_max=16)
    at = []
    for step in range(80):
        if a.next_length():
            at.append(step)
            a.update(1, 0)  # rejected: greedy stays ahead
    assert at[:5] == [3, 11, 27, 43, 59] and a.probe_gap == 16  # gaps 8, 16, then capped at 16
    a.step_cost = lambda ns: [0.050 + 0.002 * n for n in ns]  # reads no longer dominate: drafting pays
    while not a.next_length():
        pass
    for _ in range(40):
        a.update(1, 1)
    assert a.k > 0 and a.probe_gap == 4


def test_probe_gap_follows_the_measured_probe_cost():
    """A probe whose draft call and verification cost far more than greedy decoding of what they yielded (the
    draft caught up on a long input) pushes the next probe out until probes take at most probe_share of the
    greedy time: here past doubling's 8 steps, to probe_max."""
    a = _controller(0.2, lambda n: 0.050 * n, probe_every=4, probe_max=200, probe_share=0.02)
    steps = 0
    while not a.next_length():
        a.observe_step_time(1, 0.050)
        steps += 1
    assert steps == 3 and a.greedy_seconds == pytest.approx(0.050)
    a.observe_draft_time(1.0, 1, catch_up_seconds=0.95)  # 50 ms to draft, 950 ms catching up
    a.observe_step_time(2, 0.100)
    assert a.update(1, 0) == 0
    assert a.draft_seconds == pytest.approx(0.050)  # the catch-up is not a per-token draft cost
    assert a.probe_cost == pytest.approx(1.0 + 0.100 - 0.050)
    assert a.probe_gap == 200  # ceil(1.05 / (0.02 * 0.05)) = 1050 steps, capped
    cheap = _controller(0.2, lambda n: 0.050 * n, probe_every=4, probe_max=200)
    for _ in range(3):
        cheap.next_length()
        cheap.observe_step_time(1, 0.050)
    assert cheap.next_length() == 1
    cheap.observe_draft_time(0.0, 1)  # prompt lookup: drafting costs nothing
    cheap.observe_step_time(2, 0.052)
    cheap.update(1, 0)
    assert cheap.probe_gap == 4  # a cheap probe (prompt lookup): probe_every again, no doubling
    with pytest.raises(SpacError, match="probe_share"):
        AdaptiveDraftLength(probe_share=0)


def test_measured_verifications_correct_the_cost_model():
    """The tier's model says a long draft pays at 90% acceptance; verifications measured 0.6 s slower than it
    (experts the plan did not keep) turn the choice to greedy, since plain steps measured as modelled."""
    a = _controller(0.9, lambda n: 0.050 + 0.002 * n)
    assert a.choose() == 8
    for _ in range(20):
        a.observe_step_time(1, 0.052)
        a.observe_step_time(9, 0.050 + 0.002 * 9 + 0.6)
    assert a.overhead == pytest.approx(0.0, abs=1e-9)
    assert a.verify_excess == pytest.approx(0.6 / 8, rel=0.02)
    assert a.choose() == 0
    # a model that overestimates plain steps is corrected there too (overhead below 0), so greedy is not
    # made to look slower than it is
    over = _controller(0.6, lambda n: 0.100 * n)
    for _ in range(20):
        over.observe_step_time(1, 0.050)
    assert over.overhead == pytest.approx(-0.050, rel=0.02)


def test_draft_length_without_a_tier_is_the_acceptance_rule():
    a = AdaptiveDraftLength(k_init=4, k_min=1, k_max=8)
    assert a.next_length() == 4  # unchanged until a verification updates it
    a.acceptance = 0.9
    assert a.choose() == 8 and a.next_length() == 4  # next_length keeps the acceptance rule's last choice


def test_draft_length_counts_the_measured_step_overhead():
    # the expert model alone says reads dominate (greedy); measured steps take 0.2 s more than it (the
    # non-expert layers, paid once per step): speculation amortises that, and drafting pays again
    a = _controller(0.6, lambda n: 0.050 * n)
    assert a.choose() == 0
    for _ in range(10):
        a.observe_step_time(1, 0.250)
    assert a.overhead == pytest.approx(0.2, rel=0.05) and a.choose() > 0
    no_tier = AdaptiveDraftLength()
    no_tier.observe_step_time(1, 1.0)
    assert no_tier.overhead == 0.0  # without a tier's cost model there is nothing to compare with
