#!/usr/bin/env python3
"""Routing realism of MoE models: expert popularity skew and LRU hit rate vs cache size.

Runs ``spac trace`` (greedy) over the prompts of ``scripts/realism_prompts.txt`` for each model and
summarises the traces with ``spac_llamacpp.sim.trace_stats``. Without MODEL arguments it compares the
shipped default model with two random-weight factory models: its "random twin" (same shape and
tokenizer, random weights) and the factory's qwen3moe of the old default's shape.

    python scripts/routing_realism.py                       # default vs random models, markdown
    python scripts/routing_realism.py MODEL.gguf -n 64 --json out.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spac_llamacpp.observe.trace import RoutingTrace  # noqa: E402
from spac_llamacpp.sim.trace_stats import RealismReport, realism_report  # noqa: E402

PROMPTS = Path(__file__).with_name("realism_prompts.txt")
SPAC = Path(sys.executable).with_name("spac")


def reference_models(tmp: Path) -> dict[str, Path]:
    """The shipped default and the random-weight factory models to compare it with."""
    from spac_llamacpp.models.bpe import read_tokenizer
    from spac_llamacpp.models.default import default_model_path
    from spac_llamacpp.models.factory import write_tiny_model, write_tiny_moe
    from spac_llamacpp.models.tinylm.recipe import MOE_SPEC

    default = default_model_path()
    twin = write_tiny_model(tmp / "random-twin.gguf", MOE_SPEC, dtype="f16", seed=0,
                            vocab=read_tokenizer(str(default)))
    old = write_tiny_moe(tmp / "factory-qwen3moe.gguf", "qwen3moe", dtype="f16", seed=0, n_layer=6, n_embd=128,
                         n_expert=16, n_ff_exp=64)
    return {"trained default (llama 6x16, top-2)": default, "random twin (same shape + tokenizer)": twin,
            "factory qwen3moe 6x16 (old default)": old}


def trace(model: Path, out: Path, n_predict: int, prompts: Path, temp: float) -> RoutingTrace:
    """Run ``spac trace`` on ``model`` and load the result."""
    subprocess.run([str(SPAC), "trace", str(model), "-f", str(prompts), "-n", str(n_predict), "-o", str(out),
                    "--threads", "2", "--temp", str(temp), "--seed", "0"], check=True)
    return RoutingTrace.load(out)


def markdown(reports: dict[str, RealismReport], caps: tuple[int, ...]) -> str:
    """Two tables: popularity skew (means over MoE layers) and LRU hit rate by cache size (docs/hit_rate.md)."""
    lines = ["| model | tokens (decode) | normalized entropy (min..max) | hottest quarter's share | "
             "hottest / mean | reuse of previous token's experts (uniform) |", "|---|---|---|---|---|---|"]
    for name, r in reports.items():
        p = r.popularity
        lines.append(
            f"| {name} | {r.n_tokens} ({r.n_counted}) | {p.normalized_entropy.mean():.3f} "
            f"({p.normalized_entropy.min():.3f}..{p.normalized_entropy.max():.3f}) | "
            f"{p.top_quarter_share.mean():.1%} | {p.max_over_mean.mean():.2f} | "
            f"{r.reuse.mean():.1%} ({r.k / r.n_expert:.1%}) |")
    lines += ["", "| cache (experts/layer) | " + " | ".join(reports) + " | uniform random router |",
              "|---" * (len(reports) + 2) + "|"]
    first = next(iter(reports.values()))
    for i, c in enumerate(caps):
        cells = [f"{r.pooled_hit_rate[i]:.1%}" for r in reports.values()]
        lines.append(f"| {c} of {first.n_expert} | " + " | ".join(cells) + f" | {first.uniform_hit_rate[i]:.1%} |")
    return "\n".join(lines)


@click.command()
@click.argument("models", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("-n", "--n-predict", type=int, default=48, show_default=True, help="Tokens generated per prompt.")
@click.option("-f", "--prompts", type=click.Path(exists=True, dir_okay=False), default=str(PROMPTS),
              show_default=True)
@click.option("--decode-only/--all-tokens", default=True, show_default=True,
              help="Count hits of generated tokens only (prompts still warm the cache).")
@click.option("--temp", type=float, default=0.0, show_default=True,
              help="Sampling temperature of the traced generations (0: greedy, which tends to loop).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write JSON here.")
def main(models: tuple[str, ...], n_predict: int, prompts: str, decode_only: bool, temp: float,
         json_out: str | None) -> None:
    """Trace MODELS (default: the shipped model and random references) and print the statistics."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        named = {Path(m).name: Path(m) for m in models} if models else reference_models(tmp)
        reports: dict[str, RealismReport] = {}
        for i, (name, path) in enumerate(named.items()):
            t = trace(path, tmp / f"t{i}.npz", n_predict, Path(prompts), temp)
            reports[name] = realism_report(t, decode_only=decode_only)
    caps = next(iter(reports.values())).capacities
    click.echo(markdown(reports, caps))
    if json_out:
        Path(json_out).write_text(json.dumps({k: r.to_json() for k, r in reports.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
