"""``spac plot BENCH.json``: a benchmark result's tok/s per budget per configuration, with the ceiling line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from spac_llamacpp.tools.plots import benchmark_series, read_benchmark

DOCS = Path(__file__).resolve().parent.parent / "docs"
PNG = b"\x89PNG\r\n\x1a\n"


def plot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from spac_llamacpp.tools.cli import spac; spac()", "plot", *args],
                          capture_output=True, text=True, timeout=120)


def test_bench_flash_result(tmp_path):
    d = json.loads((DOCS / "bench_flash_qwen15moe.json").read_text())
    b = benchmark_series(d)
    assert b.tier == "flash" and set(b.series) == {"stock llama.cpp", "spac flash tier"}
    assert b.ceiling == d["ceiling_tps"] and [x for x, _ in b.series["spac flash tier"]] == \
        [r["budget_bytes"] for r in d["runs"]]
    out = tmp_path / "flash.png"
    proc = plot(str(DOCS / "bench_flash_qwen15moe.json"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == PNG


def test_bench_vram_result_and_a_saved_log(tmp_path):
    run = {"budget_bytes": 2 << 30, "exps_cpu": {"tps": 5.0}, "n_cpu_moe_best": {"tps": 6.0, "n_cpu_moe": 3},
           "spac": {"tps": 8.0}, "n_cpu_moe_runs": [{"tps": 6.0}]}
    result = {"model": "m.gguf", "pool_on_host": False, "repack": True,
              "runs": [run, {**run, "budget_bytes": 4 << 30, "spac": {"tps": 11.0}}]}
    log = tmp_path / "bench.log"
    log.write_text("model m.gguf: ...\nVRAM budget 2 GiB:\n  stock exps=CPU 5.00 tok/s\n" + json.dumps(result) + "\n")
    b = benchmark_series(read_benchmark(log))
    assert b.tier == "vram" and b.ceiling is None
    assert b.series == {"stock -ot exps=CPU": [(2 << 30, 5.0), (4 << 30, 5.0)],
                        "stock, best --n-cpu-moe": [(2 << 30, 6.0), (4 << 30, 6.0)],
                        "spac vram tier": [(2 << 30, 8.0), (4 << 30, 11.0)]}
    out = tmp_path / "vram.png"
    assert plot(str(log), "-o", str(out)).returncode == 0 and out.read_bytes()[:8] == PNG


def test_one_budget_many_sources_and_not_a_benchmark(tmp_path):
    b = benchmark_series(json.loads((DOCS / "bench_speculation_flash.json").read_text()))
    assert b is not None and "prompt lookup" in b.series and len({x for p in b.series.values() for x, _ in p}) == 1
    out = tmp_path / "spec.png"
    assert plot(str(DOCS / "bench_speculation_flash.json"), "-o", str(out)).returncode == 0
    assert out.read_bytes()[:8] == PNG
    assert benchmark_series({"runs": [{"x": 1}]}) is None and read_benchmark(DOCS / "balancer.md") is None
    proc = plot(str(DOCS / "bench_sensor_mid.json"), "-o", str(tmp_path / "x.png"))  # neither: the profile error
    assert proc.returncode == 2 and "not a spac profile" in proc.stderr
