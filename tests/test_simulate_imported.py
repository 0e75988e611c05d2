"""`spac simulate` on imported public traces, with no model file: the layout the trace records.

The route CSV and JSONL files are small ones the tests write in the public formats (tests/test_trace_import.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.observe.trace_import import import_trace
from spac_llamacpp.planning.costmodel import CostModel, CpuKernel, ExpertLayout, GpuCost, ReadCost
from spac_llamacpp.sim.policies import POLICIES
from spac_llamacpp.sim.simulator import (
    DEFAULT_WEIGHT_TYPE,
    RECORDED_TENSORS,
    compare,
    load_inputs,
    make_setup,
    recorded_layout,
)
from spac_llamacpp.tools.cli import spac

BIN = Path(sys.executable).parent
CSV_COLUMNS = "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes,dropped"
N_EXPERT, K = 8, 2
ONE = 30_001  # bytes of one expert (not a multiple of 3: the split over tensors keeps every byte)


def cost_model() -> CostModel:
    return CostModel(
        cpu={"F16": CpuKernel((1, 2, 4, 8), (1e-10, 1.2e-10, 1.5e-10, 2.2e-10)),
             "Q4_0": CpuKernel((1, 2, 4, 8), (3e-10, 3.5e-10, 4e-10, 5e-10))},
        flash_miss=ReadCost(1.0e9, 1e-3),
        flash_prefetch=ReadCost(1.5e9, 2e-4),
        gpu=GpuCost(),
    )


def skewed(rng: np.random.Generator) -> list[int]:
    """Two distinct experts, hot ones more often (a working set policies can learn)."""
    p = np.array([0.3, 0.2, 0.15, 0.1, 0.09, 0.07, 0.05, 0.04])
    return rng.choice(N_EXPERT, size=K, replace=False, p=p).tolist()


def write_csv(path: Path, seed: int = 0) -> Path:
    """Layer 0 dense, layers 1-2 MoE; 2 turns of 5 prompt tokens and 24 decoded ones."""
    rng = np.random.default_rng(seed)
    lines = [
        "# route_trace v1",
        f"# model=/models/not-here.gguf arch=qwen3moe n_layer=3 n_expert={N_EXPERT} n_expert_used={K}",
        "# layer=0 expert_bytes=0 dense_bytes=5000",
        f"# layer=1 expert_bytes={ONE} dense_bytes=1000",
        f"# layer=2 expert_bytes={ONE} dense_bytes=1000",
        CSV_COLUMNS,
    ]
    pos = 0
    for turn in range(2):
        for phase, n in ((0, 5), (1, 24)):
            for j in range(n):
                for layer in (1, 2):
                    if layer == 2 and phase == 0 and j < n - 1:
                        continue  # the last layer routes only the final prompt token
                    for slot, e in enumerate(skewed(rng)):
                        lines.append(f"{turn},{phase},{pos},{layer},{slot},{e},0.5,0,{ONE},0")
                pos += 1
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, seed: int = 1) -> Path:
    """4 MoE layers; 2 problems of 30 generated tokens (layer-major, as the public recorder writes them)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(2):
        for layer in range(4):
            for t in range(30):
                rows.append(json.dumps({"dataset": "gsm8k", "problem_id": p, "layer": layer, "experts": skewed(rng),
                                        "gating_probs": [0.6, 0.4], "token_idx": t}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def traces(tmp_path):
    """(csv trace .npz, jsonl trace .npz without sizes, calibration JSON)."""
    csv_t = tmp_path / "csv.npz"
    import_trace(write_csv(tmp_path / "route.csv"), "route-csv").save(csv_t)
    jsonl_t = tmp_path / "jsonl.npz"
    import_trace(write_jsonl(tmp_path / "routing.jsonl"), "jsonl").save(jsonl_t)
    cal = tmp_path / "cal.json"
    cost_model().save(cal)
    return csv_t, jsonl_t, cal


def run(*args: str):
    result = CliRunner().invoke(spac, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def test_recorded_layout_from_the_trace(traces):
    csv_t, jsonl_t, cal = traces
    trace, info, cost = load_inputs(csv_t, calibration=cal)  # the trace names a model that is not here
    assert isinstance(info, ExpertLayout)
    assert info.moe_layers == (1, 2) and info.n_expert == N_EXPERT and info.n_expert_used == (K, K)
    assert info.expert_bytes.tolist() == [ONE, ONE] and info.non_expert_bytes == 7000
    assert all(len(ts) == RECORDED_TENSORS and {t for t, _ in ts} == {DEFAULT_WEIGHT_TYPE} for ts in info.tensors)
    assert info.model == "recorded in csv.npz"
    # --expert-bytes replaces the recorded sizes, --weight-type the assumed type
    _, info2, _ = load_inputs(csv_t, calibration=cal, expert_bytes=12345, weight_type="q4_k")
    assert info2.expert_bytes.tolist() == [12345, 12345] and info2.tensors[0][0][0] == "Q4_K"
    # the jsonl trace records no sizes: --expert-bytes
    _, info3, _ = load_inputs(jsonl_t, calibration=cal, expert_bytes=ONE)
    assert info3.moe_layers == (0, 1, 2, 3) and info3.expert_bytes.tolist() == [ONE] * 4
    assert info3.non_expert_bytes == 0


@pytest.mark.parametrize("tier", ["flash", "vram"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_every_policy_from_the_recorded_layout(traces, fmt, tier):
    csv_t, jsonl_t, cal = traces
    path, kw = (csv_t, {}) if fmt == "csv" else (jsonl_t, {"expert_bytes": ONE})
    trace, info, cost = load_inputs(path, calibration=cal, **kw)
    # flash: the plan gets the budget less staging, keep and lookahead (k experts of the largest layer each; no
    # edge pages without a file); vram: the pool gets the budget as is, in whole slots
    fixed = 3 * K * ONE if tier == "flash" else 0
    for n in (2, 5, 9):
        setup = make_setup(trace, tier, fixed + n * ONE + ONE // 2, cost, info)
        assert setup.budget == (n * ONE + (ONE // 2 if tier == "flash" else 0))
        results = {r.policy: r for r in compare(trace, setup)}
        assert set(results) == set(POLICIES)
        for name, r in results.items():
            assert r.activations == results["none"].activations > 0
            assert r.preload_bytes <= setup.budget, name  # simulate() checks the budget every step
            assert r.hit_rate <= results["belady"].hit_rate + 1e-12, name
        assert results["min"].hits >= results["lru"].hits
        assert results["none"].hits == 0 and results["belady"].hits > 0
        if tier == "vram":
            assert setup.n_slots == (n,)


def test_weight_type_sets_the_cpu_cost(traces):
    csv_t, _, cal = traces
    out = {}
    for wt in ("F16", "Q4_0"):
        trace, info, cost = load_inputs(csv_t, calibration=cal, weight_type=wt)
        setup = make_setup(trace, "flash", (2 * K + 4) * ONE, cost, info)
        (r,) = compare(trace, setup, ("none",))
        out[wt] = r.seconds
    assert out["Q4_0"] > out["F16"]  # the calibration's Q4_0 kernel is slower per byte


def test_cli_compare_without_a_model(traces, tmp_path):
    csv_t, jsonl_t, cal = traces
    png = tmp_path / "c.png"
    r = run("simulate", str(csv_t), "--tier", "flash", "--budget", str((2 * K + 5) * ONE), "--compare",
            "--calibration", str(cal), "--png", str(png))
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert "2 MoE layers x 8 experts" in first and "recorded in csv.npz" in first, first
    assert "3 tensors per expert, F16 assumed" in first and "routed expert bytes only" in first, first
    for name in POLICIES:
        assert f"\n{name} " in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run("simulate", str(jsonl_t), "--tier", "vram", "--budget", str(6 * ONE), "--compare", "--expert-bytes",
            str(ONE), "--weight-type", "q4_k", "--calibration", str(cal), "--png", str(png))
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert "4 MoE layers x 8 experts" in first and "Q4_K;" in first and "Q4_K assumed" not in first, first
    r = run("simulate", str(jsonl_t), "--tier", "vram", "--budget", "200KiB", "--policy", "ours", "--expert-bytes",
            "30KiB", "--calibration", str(cal), "--json")
    assert r.exit_code == 0, r.output
    (res,) = json.loads(r.stdout)
    assert res["policy"] == "ours" and res["expert_budget"] == 6 * 30 * 1024 and res["budget"] == 200 * 1024


def test_cli_installed_spac_on_an_imported_trace(tmp_path):
    """The installed `spac`: import a route CSV, simulate it (the interface: no --model)."""
    src = write_csv(tmp_path / "route.csv")
    out, cal = tmp_path / "t.npz", tmp_path / "cal.json"
    cost_model().save(cal)
    env = dict(os.environ)
    proc = subprocess.run([str(BIN / "spac"), "trace", "import", str(src), "-o", str(out), "--format", "route-csv"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(BIN / "spac"), "simulate", str(out), "--tier", "flash", "--budget", "300KiB",
                           "--policy", "lru", "--calibration", str(cal)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "lru" in proc.stdout and "routed expert bytes only" in proc.stdout


def test_errors_without_a_model(traces, tmp_path):
    csv_t, jsonl_t, cal = traces
    c = ("--calibration", str(cal))
    assert_one_line_error(run("simulate", str(jsonl_t), "--budget", "1MiB", *c),
                          "records no expert sizes", "jsonl", "--expert-bytes", "spac trace import")
    assert_one_line_error(run("simulate", str(csv_t), "--budget", "1MiB", "--expert-bytes", "0", *c), "positive")
    assert_one_line_error(run("simulate", str(csv_t), "--budget", "1MiB", "--weight-type", "q5_q", *c),
                          "unknown weight type")
    assert_one_line_error(run("simulate", str(csv_t), "--budget", "1MiB", "--expert-bytes", "1KiB",
                              "--model", str(tmp_path / "m.gguf"), *c), "--expert-bytes", "--model")
    assert_one_line_error(run("simulate", str(csv_t), "--budget", "1MiB", "--model", str(tmp_path / "m.gguf"), *c),
                          "not found")
    # too small: flash needs staging + keep + lookahead + one expert; vram one slot
    assert_one_line_error(run("simulate", str(csv_t), "--budget", str(3 * K * ONE), *c), "too small",
                          str((3 * K + 1) * ONE))
    assert_one_line_error(run("simulate", str(csv_t), "--tier", "vram", "--budget", str(ONE - 1), *c),
                          "too small", "expert pool", str(ONE))
    assert_one_line_error(run("simulate", str(csv_t), "--tier", "vram", "--budget", "1MiB", "--n-ctx", "4096", *c),
                          "--n-ctx", "model file")
    assert_one_line_error(run("simulate", str(csv_t), "--tier", "vram", "--budget", "1MiB", "--compute-reserve",
                              "0", *c), "--compute-reserve")
    # a trace with no recorded layout: the model it names, else --expert-bytes
    t = RoutingTrace.load(csv_t)
    for meta, words in (({"model": str(tmp_path / "gone.gguf")}, ["gone.gguf", "not found", "--expert-bytes"]),
                        ({}, ["does not name the model", "--expert-bytes"])):
        bare = RoutingTrace(ids=t.ids, token_step=t.token_step, step_n_tokens=t.step_n_tokens, counts=t.counts,
                            moe_layers=t.moe_layers, n_expert=t.n_expert, meta=meta)
        p = tmp_path / "bare.npz"
        bare.save(p)
        assert_one_line_error(run("simulate", str(p), "--budget", "1MiB", *c), *words)
        r = run("simulate", str(p), "--budget", "1MiB", "--expert-bytes", str(ONE), "--policy", "min", *c)
        assert r.exit_code == 0, r.output
    with pytest.raises(SpacError, match="records no expert sizes"):
        recorded_layout(RoutingTrace.load(jsonl_t), name="jsonl.npz")


def test_cli_compare_policies_per_share(traces, tmp_path):
    """`spac compare-policies`: per trace and share, eval-utility and simulated hit rates and time of ours, lru and
    min, in the same bytes; the JSON carries the rows."""
    from spac_llamacpp.sim.compare import parse_share, tier_budget_for_share

    csv_t, jsonl_t, cal = traces
    out = tmp_path / "rows.json"
    r = run("compare-policies", str(csv_t), str(jsonl_t), "--expert-bytes", str(ONE), "--calibration", str(cal),
            "--share", "25%", "--share", "50", "--json", str(out))
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert [(x["trace"], x["share"], x["experts_per_layer"]) for x in rows] == \
        [("csv", 0.25, 2), ("csv", 0.5, 4), ("jsonl", 0.25, 2), ("jsonl", 0.5, 4)]
    for x in rows:
        assert set(x["ms_per_token"]) == {"ours", "lru", "min"} and x["ratio"] == pytest.approx(
            x["ms_per_token"]["ours"] / x["ms_per_token"]["lru"])
        assert x["eu_hit"]["min"] >= x["eu_hit"]["lru"] and x["sim_hit"]["min"] >= x["sim_hit"]["lru"]
    # the plan holds the share of the expert bytes: the flash budget adds the staging and lookahead reserves
    layout = recorded_layout(RoutingTrace.load(jsonl_t), ONE)
    n_all = layout.n_layer * N_EXPERT
    assert rows[2]["plan_bytes"] == n_all * ONE // 4 and rows[2]["budget"] == n_all * ONE // 4 + 3 * K * ONE
    assert tier_budget_for_share("flash", 0.25, layout) == rows[2]["budget"]
    assert "ours/lru" in r.stdout and "jsonl" in r.stdout
    assert parse_share("12.5%") == parse_share("12.5") == parse_share(0.125) == 0.125
    assert_one_line_error(run("compare-policies", str(csv_t), "--share", "150%"), "share")
    assert_one_line_error(run("compare-policies", str(jsonl_t), "--calibration", str(cal)), "--expert-bytes")
