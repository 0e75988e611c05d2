"""``spac_llamacpp.Llama``: a drop-in ``llama_cpp.Llama`` that observes MoE routing.

It is a subclass, so everything written for ``llama_cpp.Llama`` (``llama_cpp.server``, chat
handlers, speculative drafts) keeps working. On top it accepts the parameters the stock bindings
leave unused (``tensor_buft_overrides``, ``use_extra_bufts``, ``no_host``, ``cb_eval``) and installs
the native routing sensor, exposing what it saw as ``llm.routing``.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import itertools
import logging
import weakref
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_c
import numpy as np
from llama_cpp.llama_tokenizer import LlamaTokenizer

from spac_llamacpp.base.errors import ContextFullError, GGUFError, NotMoEError, SpacError
from spac_llamacpp.base.guard import EvalGuard
from spac_llamacpp.gguf.info import MoEModelInfo, read_model_header
from spac_llamacpp.native.params import OverridesArg, TensorBuftOverrides, patched_default_params
from spac_llamacpp.native.sensor import RoutingSensor, UserCallback, callback_address
from spac_llamacpp.observe.replay import ReplayEnded, RoutingReplay, attach_replay
from spac_llamacpp.observe.routing import RoutingLog, RoutingStep
from spac_llamacpp.planning.budgets import DEFAULT_COMPUTE_RESERVE, DEFAULT_N_CTX, parse_budget
from spac_llamacpp.planning.policies import check_policy
from spac_llamacpp.speculation.build import build_draft, build_speculation
from spac_llamacpp.speculation.drafts import check_same_vocabulary
from spac_llamacpp.speculation.tracker import FrequencyMap, SpeculationTracker
from spac_llamacpp.tiers.auto import AutoChoice, auto_llama_arguments
from spac_llamacpp.tiers.base import TierController
from spac_llamacpp.tiers.build import TierBuilder, tier_builder
from spac_llamacpp.tiers.cache_prior import CachePrior
from spac_llamacpp.tiers.flash import FlashTier
from spac_llamacpp.tiers.vram import VramTier

log = logging.getLogger(__name__)

_EXPERT_USED_SUFFIX = ".expert_used_count"
# position of ``idx`` among llama_cpp.Llama.sample's arguments after self
_SAMPLE_IDX = list(inspect.signature(llama_cpp.Llama.sample).parameters).index("idx") - 1
_CLOSED = "this Llama was closed; create a new one to use the model"

# the models still open, closed at interpreter exit while llama_cpp and our native module are still there
_OPEN: weakref.WeakValueDictionary[int, Llama] = weakref.WeakValueDictionary()
_OPEN_KEYS = itertools.count()


def _close_at_exit() -> None:
    """Close the models still open before the interpreter tears its modules down (freed later, llama.cpp's
    bindings may be gone: ``Exception ignored in Llama.__del__``); the newest first (a draft after its target)."""
    for key in sorted(_OPEN.keys(), reverse=True):
        llm = _OPEN.get(key)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm._close_at_exit()


atexit.register(_close_at_exit)


class _ClosedError(SpacError, AttributeError):
    """Using a closed Llama's model or context (an AttributeError too: ``getattr(llm._ctx, "ctx", None)`` is None)."""


class _Closed:
    """Stands in for a closed Llama's freed model, context and batch: any use is one line, not a segfault."""

    def __getattr__(self, name: str) -> Any:
        raise _ClosedError(_CLOSED)


class Llama(llama_cpp.Llama):
    """``llama_cpp.Llama`` plus routing observation and tensor placement.

    Accepts every argument of ``llama_cpp.Llama``, and:

    Args:
        tensor_buft_overrides: tensor placement, ``"regex=DEVICE,..."`` (llama.cpp's ``-ot``), a
            mapping or a list of ``(regex, device)``; e.g. ``{r"\\.ffn_.*_exps": "CPU"}``.
        use_extra_bufts: allow CPU weight repacking (llama.cpp default True). Set False to keep
            CPU experts file-backed in the memory-mapped GGUF.
        no_host: bypass host (pinned) buffers for CPU-side weights.
        cb_eval, cb_eval_user_data: a graph-eval callback of your own; the routing sensor chains
            to it (a Python callable ``(tensor_ptr, ask, user_data) -> bool``, a
            ``llama_cpp.ggml_backend_sched_eval_callback`` or a C function address).
        routing: install the native routing sensor (default True). Dense models get none.
        routing_history: evaluation steps kept in ``llm.routing.steps`` (None = all).
        routing_capacity: tokens of per-token expert ids kept in the native ring.
        draft_model_path: a small GGUF draft model with the target's tokenizer, for speculative
            decoding (the stock ``draft_model=`` also works; both feed ``llm.speculation``).
        n_draft: draft tokens per verification step (the starting length when adaptive).
        adaptive_draft: adapt the draft length to the running acceptance rate.
        draft_kwargs: extra ``llama_cpp.Llama`` arguments for the draft model (``n_threads``, ...).
        speculation_history: frequency maps kept in ``llm.speculation.maps``.
        tier: ``"flash"``: routed experts stay in the memory-mapped GGUF and the engine keeps at most
            ``budget`` bytes of them in RAM (``llm.flash``, ``llm.stats()``). ``"vram"`` (needs the
            patched llama.cpp, ``patched_llama_available()``): non-expert weights on the GPU, routed
            experts in host memory, the most useful of them copied into a GPU expert pool sized from
            ``vram_budget`` (``llm.vram``). ``"auto"``: chosen from the header and this machine's free memory
            (:mod:`spac_llamacpp.planning.fit`; explicit ``budget``, ``vram_budget``, ``n_gpu_layers`` or tensor
            overrides win), what it chose in ``llm.fit``. None (the default): llama.cpp as is.
        budget: RAM for routed experts with ``tier="flash"``: bytes, a size such as ``"6GiB"`` or a share of the
            model's routed expert bytes such as ``"50%"``.
        vram_budget: GPU memory for the model with ``tier="vram"`` (non-expert weights, KV cache, a
            compute reserve, the rest is the expert pool); ``"50%"``: a pool of half the routed expert bytes plus
            the rest.
        vram_options: extra :class:`spac_llamacpp.tiers.vram.VramTier` arguments: ``on_host=True`` puts
            the pool in host memory (testing without a GPU), ``slots``, ``compute_reserve``, and the shared
            loop's (:class:`spac_llamacpp.tiers.base.LoopOptions`): ``config`` (a
            :class:`spac_llamacpp.planning.placement_config.PlacementConfig`) or any of its fields
            (``estimator``, ``solver``, ``replan_every``, ``horizon``, ``background``, ...), ``cost``,
            ``profile``, ``record``.
        flash_options: extra :class:`spac_llamacpp.tiers.flash.FlashTier` arguments (``threads``,
            ``pin_fraction``, ``lookahead``, ``check_every``, ``layer_ahead``,
            ``demand`` (``"async"`` or ``"wait"``), and the shared loop's as for
            ``vram_options``).
        policy: who places the experts of the tier (flash or vram): ``"spac"`` (ours, the default: utility
            estimate, balancer, re-planner), or a baseline on the same engine and budget
            (:mod:`spac_llamacpp.planning.policies`): ``"lru"`` (per-layer LRU admission of demand, llama.cpp
            PR #27861's design), ``"lfu"``, ``"pin"`` (a static hot set from the profile or the first 16 steps),
            ``"hysteresis"`` (MoE-SpAc's rule). Needs a tier.
        cache_prior: opt-in cache-aware routing with this lambda (e.g. 0.15): decode steps prefer
            resident experts (:mod:`spac_llamacpp.tiers.cache_prior`; changes outputs). None: exact routing.
        cache_prior_options: extra :class:`spac_llamacpp.tiers.cache_prior.CachePrior` arguments
            (``top_j``, ``cache_experts``, ``max_rows``, ``ema``, ``resident``).
        self_draft: speculative decoding with the model itself drafting on its resident experts
            (:mod:`spac_llamacpp.speculation.self_draft`); an int also lowers its experts per token while drafting.
        routing_replay: a routing trace (``.npz`` path or :class:`~spac_llamacpp.observe.trace.RoutingTrace`) whose
            expert selection every MoE layer is forced to, token t of the context taking token t of the trace
            (:mod:`spac_llamacpp.observe.replay`; ``llm.replay``). Outputs are meaningless, timings real.
        replay_end: past the trace's end, ``"cycle"`` (its tokens after the prompt step again) or ``"stop"``
            (generation ends).

    Threads: one model evaluates for one thread at a time (:class:`spac_llamacpp.base.guard.EvalGuard`): a
    completion, generation or embedding asked for while another thread's is running waits for it (a stream
    holds the model until it is exhausted or closed). After :meth:`close`, using the model raises a one-line
    :class:`SpacError`.
    """

    def __init__(
        self,
        model_path: str,
        *,
        tensor_buft_overrides: OverridesArg = None,
        use_extra_bufts: bool | None = None,
        no_host: bool | None = None,
        cb_eval: UserCallback = None,
        cb_eval_user_data: int | None = None,
        routing: bool = True,
        routing_history: int | None = 1024,
        routing_capacity: int = 4096,
        draft_model_path: str | None = None,
        n_draft: int = 4,
        adaptive_draft: bool = True,
        draft_kwargs: dict[str, Any] | None = None,
        speculation_history: int | None = 256,
        tier: str | None = None,
        budget: int | str | None = None,
        flash_options: dict[str, Any] | None = None,
        vram_budget: int | str | None = None,
        vram_options: dict[str, Any] | None = None,
        policy: str | None = None,
        cache_prior: float | None = None,
        cache_prior_options: dict[str, Any] | None = None,
        self_draft: bool | int = False,
        routing_replay: Any = None,
        replay_end: str = "cycle",
        **kwargs: Any,
    ) -> None:
        self._guard = EvalGuard()
        self._closed = False
        self._spac_options = {
            "tensor_buft_overrides": tensor_buft_overrides,
            "use_extra_bufts": use_extra_bufts,
            "no_host": no_host,
            "routing": routing,
            "routing_history": routing_history,
            "routing_capacity": routing_capacity,
            "draft_model_path": draft_model_path,
            "n_draft": n_draft,
            "adaptive_draft": adaptive_draft,
            "draft_kwargs": draft_kwargs,
            "speculation_history": speculation_history,
            "tier": tier,
            "budget": budget,
            "flash_options": flash_options,
            "vram_budget": vram_budget,
            "vram_options": vram_options,
            "policy": policy,
            "cache_prior": cache_prior,
            "cache_prior_options": cache_prior_options,
            "self_draft": self_draft,
            "routing_replay": routing_replay,
            "replay_end": replay_end,
        }
        self.moe_info: MoEModelInfo = read_model_header(model_path)
        self.fit: AutoChoice | None = None  # what tier="auto" chose (tiers/auto.py)
        if tier == "auto":
            tier, budget, vram_budget, self.fit = auto_llama_arguments(self.moe_info, budget, vram_budget,
                                                                       tensor_buft_overrides, kwargs)
        self.tier = tier
        self.flash: FlashTier | None = None
        self.vram: VramTier | None = None
        self._tier: TierController | None = None
        budget_bytes = _check_tier(self.moe_info, tier, budget, vram_budget, routing, use_extra_bufts, kwargs,
                                   vram_options)
        tier_options = _with_policy(policy, tier, flash_options if tier == "flash" else vram_options,
                                    auto=self.fit is not None)
        builder = tier_builder(tier, self.moe_info, budget_bytes, tier_options)
        tensor_buft_overrides, use_extra_bufts = builder.load_arguments(tensor_buft_overrides, use_extra_bufts, kwargs)
        self._buft_overrides = TensorBuftOverrides(tensor_buft_overrides) if tensor_buft_overrides else None
        self._install_routing(model_path, routing, routing_history, routing_capacity, cb_eval, cb_eval_user_data,
                              kwargs.get("kv_overrides"))
        self.cache_prior = self._build_cache_prior(model_path, cache_prior, cache_prior_options)
        self.replay: RoutingReplay | None = attach_replay(model_path, self.moe_info, self._sensor, self.routing,
                                                          routing_replay, replay_end,
                                                          cache_prior=self.cache_prior is not None)
        draft, self._draft_llm = build_draft(model_path, kwargs, self_draft=self_draft,
                                             draft_model_path=draft_model_path, n_draft=n_draft,
                                             draft_kwargs=draft_kwargs, n_expert=self.moe_info.n_expert,
                                             llama_cls=Llama)
        self._unlearned: RoutingStep | None = None  # a verification step the tiers learn from once resolved
        self.speculation: SpeculationTracker | None = build_speculation(
            self, draft, n_draft=n_draft, adaptive_draft=adaptive_draft, history=speculation_history,
            on_resolved=self._learn_verification)
        if self.speculation is not None:
            kwargs["draft_model"] = self.speculation
        builder.before_load(model_path)  # after any self-draft has loaded the same file
        self._load(model_path, kwargs, use_extra_bufts, no_host, cb_eval, cb_eval_user_data)
        if self.speculation is not None and not kwargs.get("logits_all", False):
            # the stock class forces logits_all with a draft model, and then copies every row's logits into
            # ``scores``, which it sized for n_batch rows: past n_batch tokens that copy fails (ValueError), and
            # every prompt token pays the output projection. Only a verification needs every row's logits (the
            # sampler reads them from the context): _eval_verification asks for them, nothing else does.
            self._logits_all = False
        _OPEN[next(_OPEN_KEYS)] = self
        self._link_draft()
        self._start_tier(builder)

    # --- the steps of __init__ --------------------------------------------------------------------
    def _install_routing(self, model_path: str, routing: bool, history: int | None, capacity: int,
                         cb_eval: UserCallback, cb_eval_user_data: int | None,
                         kv_overrides: dict[str, Any] | None) -> None:
        """The native routing sensor (chained to the user's callback) and its log; none for dense models."""
        self._sensor: RoutingSensor | None = None
        self.routing: RoutingLog | None = None
        info = self.moe_info
        if routing and info.n_expert > 0:
            k_max = _max_expert_used(info, kv_overrides)
            self._sensor = RoutingSensor(info.block_count, info.n_expert, k_max, capacity, cb_eval, cb_eval_user_data)
            self.routing = RoutingLog(self._sensor, info.moe_layers, history=history, expert_order=info.expert_order)
        elif routing:
            log.info("%s has no routed experts: routing sensor not installed", model_path)

    def _build_cache_prior(self, model_path: str, lam: float | None,
                           options: dict[str, Any] | None) -> CachePrior | None:
        if lam is None:
            return None
        if self._sensor is None:
            if self.moe_info.n_expert == 0:
                raise NotMoEError(f"{model_path} is a dense model; cache-aware routing needs an MoE GGUF")
            raise SpacError("cache_prior needs routing=True: the bias runs in the routing sensor")
        return CachePrior(self._sensor, self.moe_info, lam, **(options or {}))

    def _load(self, model_path: str, kwargs: dict[str, Any], use_extra_bufts: bool | None, no_host: bool | None,
              cb_eval: UserCallback, cb_eval_user_data: int | None) -> None:
        """``llama_cpp.Llama.__init__`` with the parameters the stock bindings leave unused."""

        def edit_model(p: llama_c.llama_model_params) -> None:
            if self._buft_overrides is not None:
                p.tensor_buft_overrides = self._buft_overrides.address
            if use_extra_bufts is not None:
                p.use_extra_bufts = use_extra_bufts
            if no_host is not None:
                p.no_host = no_host

        def edit_context(p: llama_c.llama_context_params) -> None:
            if self._sensor is not None:
                p.cb_eval = self._sensor.cb_eval
                p.cb_eval_user_data = self._sensor.cb_eval_user_data
            elif cb_eval is not None:
                addr, self._cb_keepalive = callback_address(cb_eval)
                p.cb_eval = llama_c.ggml_backend_sched_eval_callback(addr)
                p.cb_eval_user_data = cb_eval_user_data

        with patched_default_params(edit_model, edit_context):
            try:
                super().__init__(model_path, **kwargs)
            except ValueError as exc:
                raise GGUFError(f"llama.cpp could not load {model_path}: {exc}") from exc

    def _link_draft(self) -> None:
        """A draft this object made must share the target's vocabulary; a self-draft follows the target."""
        if self._draft_llm is not None:
            check_same_vocabulary(self, self._draft_llm.llm)
            if hasattr(self._draft_llm, "target"):
                self._draft_llm.target = self

    def _start_tier(self, builder: TierBuilder) -> None:
        try:
            self._tier = builder.start(self, self._sensor)
        except BaseException:
            self.close()
            raise
        if isinstance(self._tier, FlashTier):
            self.flash = self._tier
        elif isinstance(self._tier, VramTier):
            self.vram = self._tier
        adaptive = self.speculation.adaptive if self.speculation is not None else None
        if adaptive is not None and self._tier is not None:
            # on a tier the draft length weighs the experts a longer verify pass brings in (k = 0: greedy)
            adaptive.step_cost = self._tier.planner.step_seconds

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens (one routing step) and record the routing they took.

        The tiers (and the cache prior) learn from each step after it. For a verification step
        (the last sampled token plus drafts) that waits until the target's samples have decided which
        drafts it keeps (``SpeculationTracker``), so that the tiers' estimator sees the true path's
        counts (``estimators.Observation.accepted_counts``); at the latest before the next evaluation.
        """
        with self._guard.op():
            self._check_open()
            if self.n_tokens + len(tokens) > self._n_ctx:
                raise ContextFullError(
                    f"cannot evaluate {len(tokens)} tokens after {self.n_tokens}: the context window holds "
                    f"{self._n_ctx} tokens; stop generating earlier (max_tokens), reset(), or load with a larger n_ctx")
            if self.speculation is not None:
                self.speculation.finish_open()  # a verification whose samples stopped early: learn from it now
            if self.replay is not None:
                self.replay.begin(self.n_tokens)  # rows map to trace tokens by context position
            position = self.n_tokens
            step = None
            if self._tier is not None:
                self._tier.check_source()  # e.g. the GGUF truncated under the flash tier: one line, not SIGBUS
            verification = self.speculation is not None and self.speculation.is_verification(tokens)
            try:
                if self._tier is not None:  # a decode step: one token, or a verification of drafts
                    decode = len(tokens) == 1 or verification
                    self._tier.eval_begins()
                try:
                    if verification and not self._logits_all:
                        self._eval_verification(tokens)
                    else:
                        super().eval(tokens)
                finally:
                    if self._tier is not None:
                        self._tier.eval_ends(len(tokens), decode)
                if self._tier is not None:
                    self._tier.check_source()  # it changed during this evaluation: the logits are not the model's
            finally:
                if self.routing is not None:
                    step = self.routing.end_step()
                fmap = self.speculation.on_step(step, position, tokens) if self.speculation is not None else None
                if fmap is not None and fmap.n_draft:
                    self._unlearned = step  # -> _learn_verification, from the sample that decides it
                else:
                    self._after_step(step)

    def _eval_verification(self, tokens: Sequence[int]) -> None:
        """``llama_cpp.Llama.eval`` with every row's logits kept in the context (the sampler reads each row's
        there) and none copied into ``scores`` (as the stock eval does without logits_all)."""
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        for i in range(0, len(tokens), self.n_batch):
            batch = list(tokens[i: i + self.n_batch])
            n_past = self.n_tokens
            self._batch.set_batch(batch=batch, n_past=n_past, logits_all=True)
            self._ctx.decode(self._batch)
            self.input_ids[n_past: n_past + len(batch)] = batch
            self.n_tokens += len(batch)
            self._requires_eval = False

    def sample(self, *args: Any, **kwargs: Any) -> int:
        """``llama_cpp.Llama.sample``; with drafting, the tracker compares the sample with the draft."""
        with self._guard.op():
            self._check_open()
            token = super().sample(*args, **kwargs)
            if self.speculation is not None:
                idx = kwargs["idx"] if "idx" in kwargs else args[_SAMPLE_IDX] if len(args) > _SAMPLE_IDX else None
                self.speculation.on_sample(self.n_tokens - 1 if idx is None else int(idx), int(token))
        return token

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Generator[int, Sequence[int] | None, None]:
        """``llama_cpp.Llama.generate``; when it ends (or is closed), the last verification step is learnt. Other
        threads wait for it to end (a session of :class:`~spac_llamacpp.base.guard.EvalGuard`)."""
        return self._guard.session(self._generate(tokens, *args, **kwargs))

    def _generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Generator[int, Sequence[int] | None, None]:
        self._check_open()
        try:
            yield from super().generate(tokens, *args, **kwargs)
        except ReplayEnded:  # routing replay with replay_end="stop": the trace is over
            return
        finally:
            if self.speculation is not None:
                self.speculation.finish_open()

    def _create_completion(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Every completion (``__call__``, ``create_completion``, chat completions) is one session: another
        thread's waits until it has ended, streamed or not (the prompt cache and the logprobs included)."""
        return self._guard.session(super()._create_completion(*args, **kwargs))

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        """``llama_cpp.Llama.embed`` (``create_embedding`` calls it), each decoded batch one routing step that the
        tier learns from and checks its budget at, as for :meth:`eval`."""
        with self._guard.op():
            self._check_open()
            if self.speculation is not None:
                self.speculation.finish_open()
            ctx = self._ctx
            decode = ctx.decode

            def decode_observed(batch: Any) -> None:
                try:
                    decode(batch)
                finally:
                    self._after_step(self.routing.end_step() if self.routing is not None else None)

            ctx.decode = decode_observed
            try:
                return super().embed(*args, **kwargs)
            finally:
                del ctx.decode  # the class's method again

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        with self._guard.op(wait_sessions=False):  # the vocabulary: no need to wait for another's generation
            self._check_open()
            return super().tokenize(text, add_bos, special)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        with self._guard.op(wait_sessions=False):
            self._check_open()
            return super().detokenize(tokens, prev_tokens=prev_tokens, special=special)

    def save_state(self) -> Any:
        with self._guard.op():
            self._check_open()
            return super().save_state()

    def load_state(self, state: Any) -> None:
        with self._guard.op():
            self._check_open()
            super().load_state(state)

    def _check_open(self) -> None:
        if self._closed:
            raise SpacError(_CLOSED)

    def _learn_verification(self, fmap: FrequencyMap) -> None:
        step, self._unlearned = self._unlearned, None
        if step is not None and step.index == fmap.step:
            self._after_step(step, fmap.accepted_counts())

    def _after_step(self, step: RoutingStep | None, accepted_counts: np.ndarray | None = None) -> None:
        """The tier and the cache prior learn from a step (``accepted_counts``: its true path's, by block)."""
        if self._tier is not None:
            self._tier.on_step(step, accepted_counts)
        if self.cache_prior is not None:
            held = None  # without a tier: the cache prior's own simulated LRU
            if self.flash is not None:
                held = self.flash.wanted | self.flash.look
            elif self.vram is not None:
                held = self.vram.wanted  # the pool's plan: its experts cost no CPU compute
            self.cache_prior.on_step(step, held)

    def stats(self, settle: float = 0.0) -> dict[str, Any]:
        """Tier state: with ``tier="flash"`` the budget, the resident expert bytes measured with mincore
        (``resident_expert_bytes``), hit rate, moves and bytes read, the engine's failed system calls by
        kind (``engine_errors``); the routing sensor's skipped nodes and dropped ids by kind
        (``sensor_errors``); ``settle`` seconds to let queued moves finish first."""
        out: dict[str, Any] = {"tier": self.tier}
        if self._tier is not None:
            out.update(self._tier.stats(settle))
        if self.cache_prior is not None:
            out["cache_prior"] = self.cache_prior.stats()
        if self.routing is not None:
            out["routing_tokens"] = self.routing.summary()["tokens"]
        if self.replay is not None:
            out["replay"] = self.replay.stats()
        if self._sensor is not None:
            out["sensor_errors"] = self._sensor.errors()  # {kind: {count, errno, message}}, each kind logged once
        return out

    def close(self) -> None:
        """Stop the tier, free the model and context, then the sensor (the context must go first); between
        another thread's operations, which then refuse (idempotent)."""
        guard = getattr(self, "_guard", None)
        with guard.exclusive() if guard is not None else contextlib.nullcontext(True):
            self._unlearned = None  # a verification step resolved from now on is not learnt by closed tiers
            tier = getattr(self, "_tier", None)
            if tier is not None:
                tier.close()
            if hasattr(self, "_stack"):  # absent when __init__ failed before llama_cpp set it up
                super().close()
                if not getattr(self, "_closed", True):
                    self._closed = True
                    gone = _Closed()  # the freed objects' pointers must not be used again
                    self._model = self._ctx = self._batch = gone
                    if isinstance(getattr(self, "tokenizer_", None), LlamaTokenizer):
                        self.tokenizer_ = gone
            draft = getattr(self, "_draft_llm", None)
            if draft is not None:
                draft.close()
            sensor = getattr(self, "_sensor", None)
            if sensor is not None:
                sensor.close()

    def _close_at_exit(self) -> None:
        with self._guard.exclusive(timeout=10.0) as free:
            if free:  # else a daemon thread is inside an evaluation: leave it to the process's end
                self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finalizer, at interpreter exit least of all
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(self._spac_options)
        if self.speculation is not None:  # hand back what the user passed, not our wrapper
            state["draft_model"] = None if self._draft_llm is not None else self.speculation.inner
        return state


def _check_tier(info: MoEModelInfo, tier: str | None, budget: int | str | None, vram_budget: int | str | None,
                routing: bool, use_extra_bufts: bool | None, kwargs: dict[str, Any],
                vram_options: dict[str, Any] | None = None) -> int | None:
    """Validate the tier arguments; returns the tier's budget in bytes (None without a tier). A budget is a size
    or a share of the routed expert bytes (``"50%"``, ``planning.budgets.parse_budget``)."""
    if tier is None:
        if budget is not None:
            raise SpacError("budget= needs a tier: pass tier='flash'")
        if vram_budget is not None:
            raise SpacError("vram_budget= needs tier='vram'")
        return None
    if tier == "vram":
        n_ctx = kwargs.get("n_ctx", DEFAULT_N_CTX) or info.context_length or DEFAULT_N_CTX
        reserve = (vram_options or {}).get("compute_reserve", DEFAULT_COMPUTE_RESERVE)
        return _check_vram(info, budget, vram_budget, routing, n_ctx, reserve)
    if vram_budget is not None:
        raise SpacError(f"vram_budget= belongs to tier='vram', not tier={tier!r}")
    if tier != "flash":
        raise SpacError(f"unknown tier {tier!r}; choose 'flash', 'vram', 'auto' or None")
    if info.n_expert == 0:
        raise NotMoEError(f"{info.path} is a dense model; tier='flash' needs a Mixture-of-Experts GGUF")
    if budget is None:
        raise SpacError("tier='flash' needs budget=, the RAM for routed experts (e.g. '6GiB')")
    if not routing:
        raise SpacError("tier='flash' needs routing=True: the engine follows the routing sensor")
    if kwargs.get("use_mmap") is False:
        raise SpacError("tier='flash' needs use_mmap=True: experts stream from the memory-mapped file")
    if use_extra_bufts:
        raise SpacError("tier='flash' needs use_extra_bufts=False: repacked experts would leave the mapped file")
    if kwargs.get("n_gpu_layers"):
        raise SpacError("tier='flash' keeps experts on the CPU; use n_gpu_layers=0")
    return parse_budget(budget, "flash", info, check=False)  # the tier checks it, with its reserves


def _check_vram(info: MoEModelInfo, budget: int | str | None, vram_budget: int | str | None, routing: bool,
                n_ctx: int, compute_reserve: int) -> int:
    from spac_llamacpp import patched_llama_available
    from spac_llamacpp.native.expert_pool import POOL_PATCH_LEVEL

    if not patched_llama_available(POOL_PATCH_LEVEL):
        raise SpacError("tier='vram' needs spac's patched llama.cpp, which is not installed: run "
                        "scripts/build_llama.sh --cuda (docs/patches.md); tier='flash' works without it")
    if info.n_expert == 0:
        raise NotMoEError(f"{info.path} is a dense model; tier='vram' needs a Mixture-of-Experts GGUF")
    if budget is not None:
        raise SpacError("tier='vram' takes vram_budget= (GPU memory for the model), not budget=")
    if vram_budget is None:
        raise SpacError("tier='vram' needs vram_budget=, the GPU memory for the model (e.g. '6GiB')")
    if not routing:
        raise SpacError("tier='vram' needs routing=True: the pool follows the routing sensor")
    return parse_budget(vram_budget, "vram", info, n_ctx=n_ctx, compute_reserve=compute_reserve, check=False)


def _with_policy(policy: str | None, tier: str | None, options: dict[str, Any] | None,
                 auto: bool = False) -> dict[str, Any] | None:
    """The tier's options with ``policy`` (checked: a known name, and a tier to apply it)."""
    if policy is None:
        return options
    check_policy(policy)
    if tier is None:
        why = "tier='auto' chose none (the model fits in memory)" if auto else "without one llama.cpp places experts"
        raise SpacError(f"policy={policy!r} needs a tier: pass tier='flash' with budget= or tier='vram' with "
                        f"vram_budget= ({why})")
    out = dict(options or {})
    if out.get("policy", policy) != policy:
        raise SpacError(f"policy={policy!r} and {tier}_options policy={out['policy']!r} disagree; give one")
    out["policy"] = policy
    return out


def _max_expert_used(info: MoEModelInfo, kv_overrides: dict[str, Any] | None) -> int:
    """Largest experts-per-token in any layer, honouring ``kv_overrides`` of expert_used_count."""
    k = max(info.n_expert_used) if info.n_expert_used else 1
    for key, value in (kv_overrides or {}).items():
        if key.endswith(_EXPERT_USED_SUFFIX) and isinstance(value, int) and not isinstance(value, bool):
            k = max(k, value)
    return min(max(k, 1), info.n_expert)
