"""The MoEfication pipeline: calibration -> per-layer plans -> qwen2moe GGUF, each stage cached.

Stages keep their results in a work folder so that a re-run skips what is done, and an interrupted run
resumes: the captured FFN inputs (``calib-<key>/``), one plan and one report per layer
(``plans-<config>-<key>/layer_<l>.npz|json``), and the final GGUF (written under a temporary name,
then renamed). ``<key>`` hashes everything the stage depends on (source checksum, text, windows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from spac_llamacpp.models.moefy.calibration import capture_ffn_inputs, load_inputs, save_inputs
from spac_llamacpp.models.moefy.corpus import Corpus, interleaved_chunks
from spac_llamacpp.models.moefy.ffn import MoELayer
from spac_llamacpp.models.moefy.plan import LayerReport, MoEfyConfig, plan_layer
from spac_llamacpp.models.moefy.source import DenseSource
from spac_llamacpp.models.moefy.writer import write_qwen2moe

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
"""Bump when the recipe changes in a way that changes the output file."""


def tokenize(model_path: Path, text: str) -> list[int]:
    """Token ids of ``text`` with the model's tokenizer (no BOS, no special-token parsing)."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)
    try:
        return vocab.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        vocab.close()


def calibration_chunks(model_path: Path, corpora: list[Corpus], n_ctx: int, n_chunks: int) -> list[list[int]]:
    """``n_chunks`` windows of ``n_ctx`` tokens from each corpus, spread evenly over it."""
    chunks: list[list[int]] = []
    for corpus in corpora:
        chunks += interleaved_chunks(tokenize(model_path, corpus.joined()), n_ctx, n_chunks)
    return chunks


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def calibrate(src_path: Path, source_sha: str, chunks: list[list[int]], work: Path,
              n_threads: int | None) -> tuple[dict[int, np.ndarray], Path]:
    """Captured FFN inputs for ``chunks`` (from the cache when present) and their folder."""
    folder = work / f"calib-{_key(source_sha, chunks)}"
    n_layer = DenseSource(src_path).n_layer
    cached = load_inputs(folder, n_layer)
    if cached is not None:
        log.info("calibration inputs cached in %s", folder)
        return cached, folder
    t0 = time.time()
    inputs = capture_ffn_inputs(src_path, chunks, n_threads=n_threads)
    save_inputs(inputs, folder)
    log.info("captured %d tokens x %d layers in %.0f s", len(next(iter(inputs.values()))), n_layer, time.time() - t0)
    return inputs, folder


def plan_layers(src: DenseSource, inputs: dict[int, np.ndarray], cfg: MoEfyConfig, folder: Path) -> tuple[
        list[MoELayer], list[LayerReport]]:
    """Plan every layer (cached per layer in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    layers: list[MoELayer] = []
    reports: list[LayerReport] = []
    for layer in tqdm(range(src.n_layer), desc="plan layers", unit="layer"):
        npz, js = folder / f"layer_{layer}.npz", folder / f"layer_{layer}.json"
        if npz.is_file() and js.is_file():
            layers.append(MoELayer.load(str(npz)))
            data = json.loads(js.read_text())
            data = {k: ({int(a): b for a, b in v.items()} if isinstance(v, dict) else v) for k, v in data.items()}
            reports.append(LayerReport(**data))
            continue
        moe, report = plan_layer(layer, inputs[layer], *src.ffn(layer), cfg)
        tmp = folder / f"layer_{layer}.tmp.npz"
        moe.save(str(tmp))
        tmp.replace(npz)
        js.write_text(json.dumps(report.to_json()))
        log.info("layer %d: rel. error %s, router recall %s", layer,
                 {k: round(v, 3) for k, v in report.rel_error.items()},
                 {k: round(v, 3) for k, v in report.router_recall.items()})
        layers.append(moe)
        reports.append(report)
    return layers, reports


def summarize(reports: list[LayerReport]) -> dict[str, Any]:
    """Means over layers of the per-layer validation measurements."""
    ks = sorted(reports[0].rel_error)
    return {
        "shared_mass": float(np.mean([r.shared_mass for r in reports])),
        "shared_gate_coverage_min": float(min(r.shared_gate_coverage for r in reports)),
        "shared_gate_min": float(min(r.shared_gate_min for r in reports)),
        "rel_error": {k: float(np.mean([r.rel_error[k] for r in reports])) for k in ks},
        "oracle_rel_error": {k: float(np.mean([r.oracle_rel_error[k] for r in reports])) for k in ks},
        "router_recall": {k: float(np.mean([r.router_recall[k] for r in reports])) for k in ks},
        "rel_error_before_refit": {k: float(np.mean([r.rel_error_before_refit[k] for r in reports]))
                                   for k in sorted(reports[0].rel_error_before_refit)},
    }


def moefy(src_path: Path, source_sha: str, out_path: Path, chunks: list[list[int]], cfg: MoEfyConfig, work: Path,
          *, expert_dtype: str = "f16", n_threads: int | None = None) -> dict[str, Any]:
    """Build ``out_path`` (skipped if present) and return a summary of the build (also saved as JSON)."""
    summary_path = out_path.with_name(out_path.name + ".build.json")
    if out_path.is_file() and summary_path.is_file():
        log.info("%s present", out_path)
        return json.loads(summary_path.read_text())
    src = DenseSource(src_path)
    timings: dict[str, float] = {}
    t0 = time.time()
    inputs, calib_dir = calibrate(src_path, source_sha, chunks, work, n_threads)
    timings["calibrate_s"] = time.time() - t0
    t0 = time.time()
    layers, reports = plan_layers(src, inputs, cfg, work / f"plans-{cfg.tag()}-{calib_dir.name.split('-', 1)[1]}")
    timings["plan_s"] = time.time() - t0
    del inputs
    t0 = time.time()
    write_qwen2moe(src, out_path, layers, cfg.n_expert_used, expert_dtype=expert_dtype, extra_kv={
        "spac.moefy.recipe_version": RECIPE_VERSION,
        "spac.moefy.config": json.dumps(asdict(cfg)),
        "spac.moefy.source_sha256": source_sha,
        "spac.moefy.calibration_tokens": int(sum(len(c) for c in chunks)),
    })
    timings["write_s"] = time.time() - t0
    summary = {
        "model": str(out_path), "size_bytes": out_path.stat().st_size, "source": str(src_path),
        "config": asdict(cfg), "expert_dtype": expert_dtype, "n_ff_exp": cfg.n_ff_exp(src.n_ff),
        "calibration_tokens": int(sum(len(c) for c in chunks)), "timings": timings,
        "layers": summarize(reports), "per_layer": [r.to_json() for r in reports],
    }
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary
