"""The speculative signal reaches the runtime: a tier learns from each verification step with its true path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from spac_llamacpp import Llama
from spac_llamacpp.observe.routing import RoutingStep
from spac_llamacpp.planning.estimators import Observation, SpacEstimator
from spac_llamacpp.speculation.drafts import PromptLookupDraft
from spac_llamacpp.speculation.tracker import SpeculationTracker
from spac_llamacpp.tools.generate import GenerationStats, stream_generate

PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"
COMMON = {"n_ctx": 256, "verbose": False, "seed": 0, "n_threads": 2}


# --- the tracker alone --------------------------------------------------------------------------------


def _tracker(drafts: list[int]) -> tuple[SpeculationTracker, list]:
    llm = SimpleNamespace(n_tokens=0, n_vocab=lambda: 100)
    tracker = SpeculationTracker(llm, lambda ids, **kw: np.array(drafts, np.intc), history=None)  # type: ignore[arg-type]
    resolved: list = []
    tracker.on_resolved = lambda fmap: resolved.append((fmap.step, fmap.accepted, fmap.confirmed))
    return tracker, resolved


def _verify(tracker: SpeculationTracker, position: int, first: int, index: int = 1):
    drafts = tracker(np.zeros(position + 1, np.intc))
    tokens = [first, *drafts.tolist()]
    ids = np.zeros((len(tokens), 1, 1), np.int32)
    ids[:, 0, 0] = np.arange(len(tokens))  # token j picks expert j
    counts = np.bincount(ids.ravel(), minlength=8)[None, :]
    return tracker.on_step(RoutingStep(index, position, len(tokens), counts, None, ids), position, tokens)


def test_a_sample_that_differs_from_the_draft_resolves_the_step():
    tracker, resolved = _tracker([7, 8, 9])
    fmap = _verify(tracker, 10, 5)
    assert fmap.n_draft == 3 and fmap.accepted is None
    tracker.on_sample(10, 7)  # the sample at the first row equals draft 1: kept
    assert fmap.confirmed == 1 and not resolved
    tracker.on_sample(12, 1)  # not the row checked next: ignored
    tracker.on_sample(11, 4)  # differs from draft 2: the correction; draft 2 and 3 rejected
    assert resolved == [(1, 1, 1)] and tracker.n_accepted == 1 and tracker.n_drafted == 3
    assert fmap.accepted_mask.tolist() == [True, True, False, False]
    assert fmap.accepted_counts()[0, :4].tolist() == [1, 1, 0, 0]
    tracker.on_sample(12, 9)  # after the resolution: nothing changes
    assert len(resolved) == 1


def test_the_bonus_token_resolves_a_fully_accepted_step():
    tracker, resolved = _tracker([7, 8])
    fmap = _verify(tracker, 3, 5)
    for row, token in enumerate([7, 8, 42]):  # two drafts kept, then the bonus token
        tracker.on_sample(3 + row, token)
    assert resolved == [(1, 2, 2)] and tracker.acceptance_rate == 1.0
    np.testing.assert_array_equal(fmap.accepted_counts(), fmap.counts)


def test_generation_that_stops_mid_verification_is_finished_with_the_confirmed_drafts():
    tracker, resolved = _tracker([7, 8, 9])
    fmap = _verify(tracker, 0, 5)
    tracker.on_sample(0, 7)
    tracker.finish_open()  # the caller stopped sampling
    assert resolved == [(1, None, 1)] and fmap.accepted is None  # out of the statistics ...
    assert tracker.n_verifications == 0
    assert fmap.accepted_mask.tolist() == [True, True, False, False]  # ... but its true path is known
    tracker.finish_open()
    assert len(resolved) == 1


def test_the_truncated_position_still_resolves_a_step_without_samples():
    tracker, resolved = _tracker([7, 8, 9])
    _verify(tracker, 4, 5)
    tracker.llm.n_tokens = 4 + 1 + 2  # Llama.generate kept the first token and two drafts
    _verify(tracker, 7, 6, index=2)
    assert resolved == [(1, 2, 2)]


# --- a flash-tier Llama with drafting ----------------------------------------------------------------


def _run(path: str, rejected_weight: float = 1.0, n: int = 40, **kwargs):
    """Greedy generation on a flash tier whose spac estimator records every observation it learns from."""
    llm = Llama(path, tier="flash", budget="64MiB", flash_options={"background": False}, **COMMON, **kwargs)
    est = SpacEstimator(*llm.flash.demand.shape, rejected_weight=rejected_weight)
    seen: list[tuple[Observation, int | None, int]] = []  # (observation, the map's accepted and confirmed then)
    learn = est.update

    def update(obs: Observation) -> None:
        fmap = llm.speculation.maps[-1] if llm.speculation is not None and llm.speculation.maps else None
        seen.append((obs, getattr(fmap, "accepted", None), getattr(fmap, "confirmed", 0)))
        learn(obs)

    est.update = update  # type: ignore[method-assign]
    llm.flash.demand = est
    stats = GenerationStats()
    for _ in stream_generate(llm, PROMPT, n, temperature=0.0, stats=stats):
        pass
    return llm, est, seen, stats.token_ids


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return str(tiny_model("qwen3moe"))


def test_verification_steps_reach_the_tier_with_the_true_path(model):
    # a fixed draft length: on a tier the adaptive one weighs measured step times, and may choose greedy
    llm, est, seen, out = _run(model, draft_model=PromptLookupDraft(n_draft=4), adaptive_draft=False)
    try:
        spec, rows = llm.speculation, llm.flash.rows
        steps = list(llm.routing.steps)
        assert len(seen) == len(steps) == len(spec.maps)  # every step learnt once, the last one included
        prompt_len = len(llm.tokenize(PROMPT.encode(), add_bos=True, special=True))
        context = [*llm.tokenize(PROMPT.encode(), add_bos=True, special=True), *out]
        verified = rejected = 0
        for (o, accepted_then, confirmed_then), step, fmap in zip(seen, steps, spec.maps, strict=True):
            assert fmap.step == step.index
            np.testing.assert_array_equal(o.counts, step.counts[rows])
            if not fmap.n_draft:
                assert o.accepted_counts is None
                continue
            verified += 1
            # the tier learnt after the target's samples decided the step, with the tracker's true path
            assert o.accepted_counts is not None
            assert accepted_then == fmap.accepted and confirmed_then == fmap.confirmed
            np.testing.assert_array_equal(o.accepted_counts, fmap.counts_where(fmap.accepted_mask)[rows])
            kept = fmap.confirmed if fmap.accepted is None else fmap.accepted
            assert o.accepted_counts.sum() == (1 + kept) * o.counts.sum() // fmap.n_tokens
            # the acceptance is the generated text's: accepted drafts are the tokens that followed
            tokens = fmap.tokens.tolist()
            assert tokens[: 1 + kept] == context[fmap.position: fmap.position + 1 + kept]
            end = fmap.position + 1 + kept
            if fmap.accepted is not None and fmap.accepted < fmap.n_draft and end < prompt_len + len(out):
                assert tokens[1 + kept] != context[end]  # the first rejected draft differs from the output
            rejected += fmap.n_draft - kept
        assert verified >= 3 and rejected > 0 and spec.n_accepted > 0  # a mix: the test can tell them apart
    finally:
        llm.close()


def test_rejected_weight_changes_the_runtime_utility(model):
    # a fixed draft length: the two runs must verify the same steps (the adaptive length on a tier follows
    # measured step times)
    draft = {"draft_model": PromptLookupDraft(n_draft=4), "adaptive_draft": False}
    a, est_a, seen_a, out_a = _run(model, 1.0, **draft)
    b, est_b, seen_b, out_b = _run(model, 0.25, **draft)
    try:
        assert out_a == out_b and len(seen_a) == len(seen_b)
        assert any((o.accepted_counts is not None and (o.accepted_counts != o.counts).any()) for o, _, _ in seen_a)
        ua, ub = est_a.utility(), est_b.utility()
        assert not np.allclose(ua, ub)
        np.testing.assert_allclose(ua.sum(), ub.sum())  # the same expected tokens, spread differently
    finally:
        a.close()
        b.close()


def test_no_rejection_no_difference(model):
    # the target drafting for itself with a fixed length: every draft accepted; 1 + 3 x 4 tokens end on a
    # bonus token, so no verification is cut short
    draft = {"draft_model_path": model, "n_draft": 3, "adaptive_draft": False}
    a, est_a, seen_a, _ = _run(model, 1.0, n=13, **draft)
    b, est_b, _, _ = _run(model, 0.25, n=13, **draft)
    try:
        checked = [o for o, _, _ in seen_a if o.accepted_counts is not None]
        assert len(checked) == 3 and all((o.accepted_counts == o.counts).all() for o in checked)
        np.testing.assert_allclose(est_a.utility(), est_b.utility())
    finally:
        a.close()
        b.close()


def test_without_drafting_nothing_waits(model):
    llm, _, seen, out = _run(model, n=8)
    try:
        assert llm.speculation is None and len(seen) == llm.routing.n_steps == len(out)
        assert all(o.accepted_counts is None for o, _, _ in seen)
    finally:
        llm.close()


def test_a_generation_cut_inside_a_verification_is_learnt_at_its_end(model):
    # 1 + 4 + 2 tokens: the second verification's drafts are checked up to the second one when the
    # caller stops; the tier learns from it with the first token and the two confirmed drafts
    draft = {"draft_model_path": model, "n_draft": 3, "adaptive_draft": False}
    llm, _, seen, out = _run(model, n=7, **draft)
    try:
        assert len(out) == 7 and len(seen) == llm.routing.n_steps == 3
        last = llm.speculation.maps[-1]
        assert last.n_draft == 3 and last.accepted is None and last.confirmed == 2
        o = seen[-1][0]
        true_path = last.counts_where(np.array([1, 1, 1, 0], bool))
        np.testing.assert_array_equal(o.accepted_counts, true_path[llm.flash.rows])
        assert llm.speculation.n_verifications == 1  # the cut step stays out of the acceptance statistics
    finally:
        llm.close()
