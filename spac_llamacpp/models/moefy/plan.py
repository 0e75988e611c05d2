"""Planning one layer's MoEfication from calibration inputs: split, cluster, fit the gates, measure.

The calibration tokens are split (deterministically, every ``holdout_every``-th token) into a fitting
set and a validation set; the reported errors and router recall are on the validation tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from spac_llamacpp.models.moefy.ffn import MoELayer, activations, mixed_activations, moe_ffn, relative_error, sigmoid
from spac_llamacpp.models.moefy.refit import refit_down
from spac_llamacpp.models.moefy.router import (
    expert_output_norms,
    fit_router,
    fit_shared_gate,
    router_targets,
    temperature,
)
from spac_llamacpp.models.moefy.split import (
    balanced_kmeans,
    choose_shared,
    coactivation_features,
    contributions,
    experts_from_labels,
)


@dataclass(frozen=True)
class MoEfyConfig:
    """The recipe's knobs. ``n_ff = n_shared + n_expert * n_ff_exp`` must hold for the source model."""

    n_expert: int = 64
    n_shared: int = 768
    n_expert_used: int = 8
    seed: int = 0
    kmeans_iter: int = 10
    ridge: float = 1e-2
    router_target: str = "norm"  # "norm" (measured best perplexity) or "zscore" (balanced load; router.py)
    spread: float = 2e-3  # router logit spread (max - min) at the 99.9th percentile of calibration tokens
    gate_margin: float = 24.0  # smallest shared-gate logit on calibration tokens; sigmoid(24) = 1 - 4e-11
    holdout_every: int = 8
    eval_k: tuple[int, ...] = (4, 8, 16, 64)
    refit: bool = True  # refit the down matrices for top-n_expert_used (refit.py)
    refit_ridge: float = 1.0

    def n_ff_exp(self, n_ff: int) -> int:
        routed = n_ff - self.n_shared
        if routed <= 0 or routed % self.n_expert:
            raise ValueError(f"{n_ff} - {self.n_shared} shared neurons do not split into {self.n_expert} experts")
        return routed // self.n_expert

    def tag(self) -> str:
        refit = f"-refit{self.refit_ridge:g}k{self.n_expert_used}" if self.refit else ""
        router = "" if self.router_target == "zscore" else f"-router{self.router_target}"
        return f"e{self.n_expert}-s{self.n_shared}-seed{self.seed}{refit}{router}"


@dataclass
class LayerReport:
    """Validation-token measurements of one planned layer."""

    layer: int
    shared_mass: float  # share of total contribution carried by the shared expert
    shared_gate_coverage: float  # calibration tokens whose shared gate rounds to 1
    shared_gate_min: float  # smallest sigmoid(shared gate) on validation tokens
    router_recall: dict[int, float] = field(default_factory=dict)  # overlap of router top-k with oracle top-k
    rel_error: dict[int, float] = field(default_factory=dict)  # ||moe - dense||^2 / ||dense||^2, router top-k
    oracle_rel_error: dict[int, float] = field(default_factory=dict)  # same with the oracle's top-k
    rel_error_before_refit: dict[int, float] = field(default_factory=dict)  # router top-k, dense down

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def plan_layer(layer: int, x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
               cfg: MoEfyConfig) -> tuple[MoELayer, LayerReport]:
    """Cut one dense FFN (weights in gguf-py numpy order) using calibration inputs ``x [tokens, n_embd]``."""
    n_ff = gate.shape[0]
    cfg.n_ff_exp(n_ff)  # validates the shape
    val = np.zeros(len(x), dtype=bool)
    val[:: cfg.holdout_every] = True
    x_fit, x_val = x[~val], x[val]

    h_fit = activations(x_fit, gate, up)
    contrib = contributions(h_fit, down)
    shared = choose_shared(contrib, cfg.n_shared)
    mean_contrib = contrib.mean(axis=0)
    shared_mass = float(mean_contrib[shared].sum() / mean_contrib.sum())
    routed = np.setdiff1d(np.arange(n_ff), shared)
    labels = balanced_kmeans(coactivation_features(contrib[:, routed]), cfg.n_expert, cfg.kmeans_iter,
                             seed=cfg.seed + 1000 * layer)
    experts = experts_from_labels(routed, labels, cfg.n_expert)
    del contrib

    target = expert_output_norms(h_fit, down, experts)
    raw_router = fit_router(x_fit, router_targets(target, cfg.router_target), cfg.ridge)
    router = raw_router * np.float32(temperature(x_fit, raw_router, cfg.spread))
    shared_gate, coverage = fit_shared_gate(x_fit, cfg.gate_margin)
    moe = MoELayer(shared=shared, experts=experts, router=router, shared_gate=shared_gate,
                   down_scale=float(cfg.n_expert))
    if cfg.refit:
        phi = mixed_activations(x_fit, h_fit, moe, cfg.n_expert_used)
        y = h_fit @ down.T
        del h_fit
        moe.down = refit_down(phi, y, down, cfg.refit_ridge)
        del phi, y

    report = LayerReport(layer=layer, shared_mass=shared_mass,
                         shared_gate_coverage=coverage,
                         shared_gate_min=float(sigmoid(x_val @ shared_gate).min()) if len(x_val) else 1.0)
    if len(x_val):
        h_val = activations(x_val, gate, up)
        dense = h_val @ down.T
        oracle_scores = expert_output_norms(h_val, down, experts)
        oracle_order = np.argsort(-oracle_scores, axis=1, kind="stable")
        for k in cfg.eval_k:
            if k > cfg.n_expert:
                continue
            approx = moe_ffn(x_val, gate, up, down, moe, k, h=h_val)
            report.rel_error[k] = relative_error(approx, dense)
            if moe.down is not None:
                report.rel_error_before_refit[k] = relative_error(mixed_activations(x_val, h_val, moe, k) @ down.T,
                                                                  dense)
            oracle = _with_ids(x_val, moe, oracle_order[:, :k], h_val, down)
            report.oracle_rel_error[k] = relative_error(oracle, dense)
            chosen = np.argsort(-(x_val @ router.T), axis=1, kind="stable")[:, :k]
            hit = (chosen[:, :, None] == oracle_order[:, None, :k]).any(axis=2)
            report.router_recall[k] = float(hit.mean())
    return moe, report


def _with_ids(x: np.ndarray, moe: MoELayer, ids: np.ndarray, h: np.ndarray, down: np.ndarray) -> np.ndarray:
    """The MoE output with given expert ids, each at weight 1 (the best any router could do with k)."""
    out = sigmoid(x @ moe.shared_gate)[:, None] * (h[:, moe.shared] @ down[:, moe.shared].T)
    for e in range(moe.n_expert):
        rows = np.nonzero((ids == e).any(axis=1))[0]
        if rows.size:
            cols = moe.experts[e]
            out[rows] += h[np.ix_(rows, cols)] @ down[:, cols].T
    return out
