"""Cache-aware routing (Cache-Prior, "Mixture of Cache-Conditional Experts", arXiv 2412.00099). Opt-in.

In decode steps, each MoE layer's selection prefers experts that are already resident: per token,
``lambda * D`` is added to the router logits of resident experts and of the token's original top-J
(``D``: the layer's running average of the logit range), top-k is taken on the biased scores, and the
mixing weights come from the unbiased probabilities. The native sensor applies the bias inside the
graph callback (``native/spac_sensor.c``: it rewrites ``ffn_moe_probs-l`` in place for selection and
restores it at ``ffn_moe_topk-l``, before the weights are gathered; host tensors in place, tensors in
device memory, e.g. with GPU-resident routers, through ``ggml_backend_tensor_get/set``); no llama.cpp
patch is needed.

What "resident" means: with ``tier="flash"`` the experts the flash tier holds; otherwise a per-layer
LRU cache of ``cache_experts`` experts simulated from the routing (what a device-side expert cache
of that size would hold: the shared ``planning/reference_caches.LRUCache``), which is also how
``spac eval-ppl`` measures miss rates (1 - the hit rate of docs/hit_rate.md, over decode steps).

This changes the model's outputs (that is its point); with ``cache_prior`` unset nothing changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native import module as native
from spac_llamacpp.native.sensor import RoutingSensor
from spac_llamacpp.observe.routing import RoutingStep
from spac_llamacpp.planning.reference_caches import LRUCache, count_hits

GATING_CODES = {"softmax": 0, "sigmoid": 1, "softmax_weight": 2}
_UNSUPPORTED_ARCHS = ("llama4", "grovemoe")  # their selection does not read ffn_moe_probs


class CachePrior:
    """Cache-Prior state of one model: the native parameters, the resident mask and (without a tier) an LRU.

    Args:
        sensor: the model's routing sensor (the bias runs in its callback).
        info: the model header.
        lam: lambda, the bias strength in units of the running logit range (e.g. 0.1-0.2).
        top_j: each token's original top-J experts are protected. Default: 2 (the paper's choice for
            fine-grained MoEs), but at most k - 1: with J >= k the bias could never change a selection.
        cache_experts: experts per layer of the simulated LRU cache (default: half of them).
        max_rows: steps of at most this many tokens count as decode (a verification of k drafts is k+1).
        ema: weight of the newest token in the running logit range.
        resident: a fixed residency ([n_moe_layer, n_expert] bool, e.g. a pinned set) instead of the
            simulated LRU (a tier's residency, when there is one, still takes precedence).
    """

    def __init__(self, sensor: RoutingSensor, info: MoEModelInfo, lam: float, *, top_j: int | None = None,
                 cache_experts: int | None = None, max_rows: int = 16, ema: float = 0.05,
                 resident: np.ndarray | None = None) -> None:
        if not np.isfinite(lam) or lam < 0:
            raise SpacError(f"cache_prior must be a non-negative number, not {lam}")
        if info.architecture in _UNSUPPORTED_ARCHS or info.gating not in GATING_CODES:
            raise SpacError(f"cache-aware routing does not support {info.architecture} ({info.gating} gating)")
        n_expert = info.n_expert
        self.cache_experts = n_expert // 2 if cache_experts is None else int(cache_experts)
        if not 0 <= self.cache_experts <= n_expert:
            raise SpacError(f"cache_experts must be between 0 and {n_expert}, not {cache_experts}")
        self.lam = float(lam)
        k_min = min(info.n_expert_used[b] for b in info.moe_layers)
        self.top_j = max(0, min(2, k_min - 1)) if top_j is None else int(top_j)
        self.rows = np.asarray(info.moe_layers, dtype=np.int64)
        self.max_rows = int(max_rows)
        self.resident = np.zeros((info.block_count, n_expert), dtype=np.uint8)
        self.range_avg = np.full(info.block_count, -1.0, dtype=np.float32)
        self._lru = LRUCache(len(self.rows), n_expert, self.cache_experts)
        self.fixed = None
        if resident is not None:
            self.fixed = np.asarray(resident, dtype=bool)
            if self.fixed.shape != (len(self.rows), n_expert):
                raise SpacError(f"resident has shape {self.fixed.shape}, expected {(len(self.rows), n_expert)}")
            self.resident[self.rows] = self.fixed
        self.steps = 0
        self.selections = 0  # decode-step activations (docs/hit_rate.md)
        self.misses = 0  # ... of experts not resident
        ffi = native.load().ffi
        c = ffi.new("spac_cache_prior *")
        c.__setattr__("lambda", self.lam)  # "lambda" is a Python keyword
        c.top_j, c.max_rows, c.gating, c.ema = self.top_j, self.max_rows, GATING_CODES[info.gating], float(ema)
        c.resident = ffi.cast("uint8_t *", ffi.from_buffer(self.resident))
        c.range_avg = ffi.cast("float *", ffi.from_buffer(self.range_avg))
        self._c = c
        sensor._struct.prior = c  # freed with the sensor (spac_sensor_release)

    def on_step(self, step: RoutingStep | None, held: np.ndarray | None = None) -> None:
        """After a step: tally misses against what was resident, then update the residency.

        ``held`` ([n_moe_layer, n_expert] bool) is the tier's residency; None simulates the LRU.
        """
        if step is None:
            return
        counts = step.counts[self.rows]
        if step.n_tokens <= self.max_rows:  # decode: where the bias applies and misses cost
            hits, activations = count_hits(counts > 0, self.resident[self.rows].astype(bool))
            self.selections += activations
            self.misses += activations - hits
        self.steps += 1
        if held is None and self.fixed is not None:
            held = self.fixed
        if held is None:
            self._lru.step(counts > 0)
            held = self._lru.resident
        self.resident[self.rows] = held

    def stats(self) -> dict[str, Any]:
        c = self._c
        return {
            "lambda": self.lam,
            "top_j": self.top_j,
            "cache_experts": self.cache_experts,
            "miss_rate": self.misses / self.selections if self.selections else None,
            "decode_activations": self.selections,
            "rows_biased": int(c.n_rows),
            "changed_rate": int(c.n_changed) / int(c.n_selections) if int(c.n_selections) else None,
            "mean_logit_range": float(np.mean(self.range_avg[self.rows][self.range_avg[self.rows] >= 0]))
            if (self.range_avg[self.rows] >= 0).any() else None,
        }
