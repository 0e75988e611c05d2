#!/usr/bin/env python3
"""Routing-sensor overhead: stock llama_cpp.Llama vs spac Llama with the sensor off and on.

All three load the same model (all in RAM) and decode the same prompt greedily, interleaved over
several rounds so that machine noise hits every configuration alike. Prints median decode tokens/s
per configuration and the ratios; the sensor's cost is ``1 - on/off``.

    python scripts/bench_sensor.py                # builds a mid-size factory MoE (about 0.9 GB, q8_0)
    python scripts/bench_sensor.py MODEL.gguf -n 64 --rounds 7
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spac_llamacpp import Llama  # noqa: E402
from spac_llamacpp.models.default import models_cache_dir  # noqa: E402
from spac_llamacpp.tools.generate import GenerationStats, stream_generate  # noqa: E402

BENCH_SPEC = {"n_layer": 16, "n_embd": 1024, "n_expert": 32, "n_expert_used": 4, "n_ff_exp": 512}


def bench_model() -> Path:
    """A mid-size random qwen3moe (q8_0) whose decode time is dominated by real expert matmuls."""
    from spac_llamacpp.models.factory import write_tiny_moe

    path = models_cache_dir() / "bench-qwen3moe-16x32-q8_0-v1.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        click.echo(f"writing benchmark model {path} ...", err=True)
        write_tiny_moe(path, "qwen3moe", dtype="q8_0", seed=1, **BENCH_SPEC)
    return path


def decode_rate(llm: llama_cpp.Llama, prompt: str, n: int) -> tuple[float, int]:
    stats = GenerationStats()
    for _ in stream_generate(llm, prompt, n, temperature=0.0, seed=0, stats=stats):
        pass
    return stats.decode_tokens_per_second, stats.generated_tokens


@click.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", default="The quick brown fox jumps over the lazy dog. " * 4)
@click.option("-n", "--n-predict", "n", type=int, default=64, show_default=True)
@click.option("--rounds", type=int, default=5, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
def main(model: str | None, prompt: str, n: int, rounds: int, threads: int | None, json_out: str | None) -> None:
    path = str(model or bench_model())
    common = {"n_ctx": 1024, "n_threads": threads, "verbose": False, "seed": 0}
    t0 = time.perf_counter()
    configs = {
        "stock llama_cpp": llama_cpp.Llama(path, **common),
        "spac sensor off": Llama(path, routing=False, **common),
        "spac sensor on": Llama(path, routing=True, **common),
    }
    click.echo(f"model {path}; loaded 3 instances in {time.perf_counter() - t0:.1f} s", err=True)
    for llm in configs.values():  # warm-up: page in the weights, settle caches
        decode_rate(llm, prompt, 8)

    rates: dict[str, list[float]] = {name: [] for name in configs}
    outputs: dict[str, list[int]] = {}
    for r in range(rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            rate, _ = decode_rate(configs[name], prompt, n)
            rates[name].append(rate)
    for name, llm in configs.items():  # same greedy tokens from every configuration
        stats = GenerationStats()
        for _ in stream_generate(llm, prompt, 16, temperature=0.0, seed=0, stats=stats):
            pass
        outputs[name] = stats.token_ids

    med = {name: statistics.median(v) for name, v in rates.items()}
    # paired per-round ratios: each round ran every configuration back to back, so slow phases of
    # the machine hit both sides of a ratio
    paired = [on / off for on, off in zip(rates["spac sensor on"], rates["spac sensor off"], strict=True)]
    click.echo(f"\n{'configuration':<18} {'median tok/s':>13} {'min':>8} {'max':>8}")
    for name, v in rates.items():
        click.echo(f"{name:<18} {med[name]:>13.2f} {min(v):>8.2f} {max(v):>8.2f}")
    on_off = statistics.median(paired)
    on_stock = med["spac sensor on"] / med["stock llama_cpp"]
    us_per_token = 1e6 / med["spac sensor on"] - 1e6 / med["spac sensor off"]
    click.echo(f"\nratio sensor on / off      : {on_off:.4f}  (median of {rounds} paired rounds; "
               f"overhead {100 * (1 - on_off):+.2f}%, {us_per_token:+.0f} us/token)")
    click.echo(f"ratio sensor on / stock    : {on_stock:.4f}  (ratio of medians)")
    same = len({tuple(t) for t in outputs.values()}) == 1
    click.echo(f"identical greedy tokens    : {same}")
    routing = configs["spac sensor on"].routing
    if routing is not None:
        click.echo(f"sensor: {routing.n_tokens} tokens observed, {routing.bad_ids} bad ids", err=True)
    if json_out:
        Path(json_out).write_text(json.dumps(
            {"model": path, "n_predict": n, "rounds": rounds, "rates": rates, "median": med,
             "ratio_on_off": on_off, "paired_ratios": paired, "ratio_on_stock": on_stock,
             "identical_tokens": same}, indent=2))
    for llm in configs.values():
        llm.close()


if __name__ == "__main__":
    main()
