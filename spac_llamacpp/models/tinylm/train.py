"""The training loop of the tiny models: AdamW, warmup + cosine schedule, MoE auxiliary losses.

Deterministic for a given seed and thread count: the window sampler uses its own numpy RNG and
the weights are initialised from a seeded ``torch.Generator``. Matmuls run under bfloat16 autocast
(on CPUs with AVX512-BF16/AMX this is several times faster than float32); the master weights,
norms, router softmax and losses stay float32.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from spac_llamacpp.models.tinylm.data import TokenStream
from spac_llamacpp.models.tinylm.model import TinyLM
from spac_llamacpp.models.tinylm.recipe import TrainConfig


@dataclass
class History:
    """Loss curves: ``train`` rows are (step, loss, balance, seconds), ``val`` rows (step, loss)."""

    train: list[tuple[int, float, float, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    seconds: float = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _autocast(cfg: TrainConfig) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


@torch.no_grad()
def evaluate(model: TinyLM, stream: TokenStream, starts: np.ndarray, cfg: TrainConfig, bos: int) -> float:
    """Mean next-token cross-entropy (nats) over the windows at ``starts``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), cfg.batch):
        x, y = stream.windows(starts[i : i + cfg.batch], cfg.seq, bos)
        with _autocast(cfg):
            logits, _ = model(torch.from_numpy(x))
        total += F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten(), reduction="sum").item()
        count += y.size
    model.train()
    return total / max(1, count)


def train(
    model: TinyLM,
    train_stream: TokenStream,
    val_stream: TokenStream,
    cfg: TrainConfig,
    bos: int,
    log: Callable[[str], None] = print,
    sample: Callable[[TinyLM], str] | None = None,
) -> History:
    """Train ``model`` in place for ``cfg.steps`` steps; return the loss curves.

    Logs one line per 50 steps (train loss, balance loss, lr, tokens/s) and the validation loss
    every ``cfg.eval_every`` steps, followed by ``sample(model)`` if given.
    """
    rng = np.random.default_rng(cfg.seed)
    starts = train_stream.window_starts(cfg.seq)
    val_starts = val_stream.eval_starts(cfg.seq)
    val_starts_quick = val_stream.eval_starts(cfg.seq, cfg.eval_windows)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "router" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "router" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    hist = History()
    t0 = time.perf_counter()
    ema = None
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = train_stream.windows(rng.choice(starts, cfg.batch), cfg.seq, bos)
        with _autocast(cfg):
            logits, stats = model(torch.from_numpy(x))
        ce = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten())
        loss = ce
        balance = 0.0
        if stats:
            bal = torch.stack([s.balance_loss for s in stats]).mean()
            z = torch.stack([s.z_loss for s in stats]).mean()
            loss = ce + cfg.balance_coef * bal + cfg.z_coef * z
            balance = bal.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ce_v = ce.item()
        ema = ce_v if ema is None else 0.95 * ema + 0.05 * ce_v
        elapsed = time.perf_counter() - t0
        if step % 10 == 0 or step == cfg.steps - 1:
            hist.train.append((step, round(ce_v, 4), round(balance, 4), round(elapsed, 1)))
        if step % 50 == 0 or step == cfg.steps - 1:
            tok_s = (step + 1) * cfg.batch * cfg.seq / elapsed
            log(f"step {step:5d}  loss {ce_v:.3f} (ema {ema:.3f})  balance {balance:.3f}  "
                f"lr {lr_at(step, cfg):.2e}  {tok_s:,.0f} tok/s  {elapsed / 60:.1f} min")
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            vl = evaluate(model, val_stream, val_starts_quick, cfg, bos)
            hist.val.append((step + 1, round(vl, 4)))
            log(f"step {step + 1:5d}  val loss {vl:.3f} ({len(val_starts_quick)} windows)")
            if sample is not None:
                log("sample: " + sample(model).replace("\n", "\n        "))
    hist.seconds = round(time.perf_counter() - t0, 1)
    # Final losses over fixed window sets: all validation windows, and as many training windows.
    hist.final_val_loss = round(evaluate(model, val_stream, val_starts, cfg, bos), 4)
    train_eval = train_stream.eval_starts(cfg.seq, len(val_starts))
    hist.final_train_loss = round(evaluate(model, train_stream, train_eval, cfg, bos), 4)
    hist.val.append((cfg.steps, hist.final_val_loss))
    log(f"done in {hist.seconds / 60:.1f} min: train loss {hist.final_train_loss:.3f}, "
        f"val loss {hist.final_val_loss:.3f} ({len(val_starts)} windows of {cfg.seq} tokens)")
    return hist


def save_checkpoint(path: str, model: TinyLM, cfg: TrainConfig, hist: History, extra: dict[str, Any]) -> None:
    """Weights, spec, training config, loss curves and ``extra`` metadata in one ``torch.save`` file."""
    torch.save(
        {
            "spec": asdict(model.spec),
            "state": model.state_dict(),
            "config": asdict(cfg),
            "history": asdict(hist),
            "extra": json.loads(json.dumps(extra)),
        },
        path,
    )
