"""``spac plot``: a layer x expert heat map of a profile, and hit rate over time of a trace (PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spac_llamacpp.observe.profile import Profile
from spac_llamacpp.observe.trace import RoutingTrace


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(profile: Profile, path: str | os.PathLike[str], title: str = "") -> Path:
    """Share of each layer's selections per expert (rows: MoE layers, columns: expert ids)."""
    plt = _pyplot()
    c = profile.counts.astype(np.float64)
    share = c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(min(18, 3 + profile.n_expert * 0.12), 2 + len(profile.moe_layers) * 0.18))
    im = ax.imshow(share, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (block)")
    ax.set_yticks(range(len(profile.moe_layers)))
    ax.set_yticklabels([str(b) for b in profile.moe_layers], fontsize=6)
    fig.colorbar(im, ax=ax, label="share of the layer's selections")
    ax.set_title(title or f"{profile.model}: expert demand ({profile.tokens} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_hit_rate(trace: RoutingTrace, path: str | os.PathLike[str], budget: int | None = None,
                  estimator: str = "spac", window: int = 16, title: str = "") -> Path:
    """Per-step hit rate (docs/hit_rate.md) of ``budget`` experts per layer: the shared reference LRU
    (``planning/reference_caches.py``, empty at the start) and ``estimator``'s top set, from step 1 on."""
    from spac_llamacpp.planning.estimators import make_estimator
    from spac_llamacpp.planning.reference_caches import lru
    from spac_llamacpp.sim.utility_eval import estimator_kept, step_hit_rates, trace_need

    plt = _pyplot()
    n_layer, n_expert = trace.counts.shape[1:]
    budget = budget or max(1, n_expert // 2)
    series = {"LRU": lru(trace_need(trace), budget).per_step_hit_rate()[1:],
              estimator: step_hit_rates(trace, estimator_kept(trace, make_estimator(estimator, n_layer, n_expert),
                                                              budget))}
    window = max(1, min(window, trace.n_steps - 1))  # "same" convolution returns the longer input's length
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, h in series.items():
        x = np.arange(1, len(h) + 1)
        ok = ~np.isnan(h)
        smooth = np.convolve(np.where(ok, h, 0), np.ones(window), "same") / np.maximum(
            np.convolve(ok.astype(float), np.ones(window), "same"), 1e-9)
        ax.plot(x, smooth, label=f"{name} (mean {np.nanmean(h):.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"hit rate ({window}-step moving average)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(title or f"{budget} of {n_expert} experts per layer kept")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
