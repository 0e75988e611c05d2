"""``spac plot``: a layer x expert heat map of a profile, hit rate over time of a trace, and a benchmark
result's tok/s per budget per configuration (PNG)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


# --- benchmark results (issue 17): tok/s per budget per policy / tier --------------------------------

_BENCH_LABELS = {"stock": "stock llama.cpp", "exps_cpu": "stock -ot exps=CPU",
                 "n_cpu_moe_best": "stock, best --n-cpu-moe"}


@dataclass(frozen=True)
class BenchmarkSeries:
    """Decode speed per budget of each configuration a benchmark JSON compared."""

    model: str
    tier: str  # "flash" or "vram": what the budget means
    series: dict[str, list[tuple[int, float]]]  # label -> [(budget bytes, tok/s)]
    ceiling: float | None  # tok/s with everything in RAM (bench_flash.py), if measured


def read_benchmark(path: str | os.PathLike[str]) -> dict | None:
    """The benchmark JSON of ``path``: the whole file, or its last line that is a JSON object (a bench script's
    output saved as is); None when there is none."""
    text = Path(path).read_text(errors="replace")
    try:
        d = json.loads(text)
        return d if isinstance(d, dict) else None
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(d, dict):
                return d
    return None


def benchmark_series(d: dict) -> BenchmarkSeries | None:
    """The series of a ``scripts/bench_flash.py`` / ``bench_vram.py`` result (``runs`` by budget) or of a
    ``bench_speculation.py`` / cache-prior result (``rows`` at one ``budget``); None for anything else."""
    from spac_llamacpp.base.sizes import parse_size

    model = Path(str(d.get("model", ""))).name
    series: dict[str, list[tuple[int, float]]] = {}
    runs, rows = d.get("runs"), d.get("rows")
    if isinstance(runs, list) and runs and all(isinstance(r, dict) and "budget_bytes" in r for r in runs):
        tier = "vram" if "pool_on_host" in d or any("exps_cpu" in r for r in runs) else "flash"
        for r in runs:
            for key, v in r.items():
                if isinstance(v, dict) and isinstance(v.get("tps"), (int, float)):
                    label = f"spac {tier} tier" if key == "spac" else _BENCH_LABELS.get(key, key)
                    series.setdefault(label, []).append((int(r["budget_bytes"]), float(v["tps"])))
        ceiling = d.get("ceiling_tps")
        return BenchmarkSeries(model, tier, series, float(ceiling) if ceiling else None) if series else None
    if isinstance(rows, list) and rows and "budget" in d:
        try:
            budget = parse_size(d["budget"])
        except Exception:  # noqa: BLE001 - not a size: not a benchmark this can plot
            return None
        for r in rows:
            if isinstance(r, dict) and isinstance(r.get("tps"), (int, float)):
                series.setdefault(str(r.get("source", "?")), []).append((budget, float(r["tps"])))
        return BenchmarkSeries(model, "flash", series, None) if series else None
    return None


def plot_benchmark(bench: BenchmarkSeries, path: str | os.PathLike[str], title: str = "") -> Path:
    """Decode tok/s against the budget, one line per configuration (bars when all share one budget), and the
    all-in-RAM ceiling as a dashed line."""
    plt = _pyplot()
    budgets = sorted({b for pts in bench.series.values() for b, _ in pts})
    what = "RAM for routed experts" if bench.tier == "flash" else "GPU memory for the model"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(budgets) == 1:
        labels = list(bench.series)
        values = [bench.series[k][0][1] for k in labels]
        bars = ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=15, ha="right")
        ax.bar_label(bars, fmt="%.2f")
        ax.set_xlabel(f"{bench.tier} budget {budgets[0] / (1 << 30):.2f} GiB ({what})")
    else:
        for i, (label, pts) in enumerate(bench.series.items()):
            pts = sorted(pts)
            ax.plot([b / (1 << 30) for b, _ in pts], [t for _, t in pts], marker="o", color=f"C{i}", label=label)
        ax.set_xlabel(f"{bench.tier} budget, GiB ({what})")
    if bench.ceiling:
        ax.axhline(bench.ceiling, color="0.3", linestyle="--",
                   label=f"ceiling: all in RAM, warm ({bench.ceiling:.2f} tok/s)")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(bottom=0)
    if len(budgets) > 1 or bench.ceiling:
        ax.legend(fontsize=8)
    ax.set_title(title or (f"{bench.model}: decode speed by configuration" if len(budgets) == 1
                           else f"{bench.model}: {bench.tier} tier, decode speed by budget"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
