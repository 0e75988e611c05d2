#!/usr/bin/env python
"""Cost of the expert pool's two-path graph on the CPU (pool in host memory), side by side in one process.

Decode tokens/s of one context: without a pool, with an empty pool (every expert on the full-tensor
path, plus the id maps and merges), and with a static pool holding a quarter of every layer's experts
(two matmul nodes per expert tensor). Stock llama.cpp placement: CPU weight repacking off, as the VRAM
tier needs. Usage: ``python scripts/bench_pool_overhead.py MODEL.gguf [-n 64] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from spac_llamacpp import Llama
from spac_llamacpp.native.expert_pool import ExpertPool, PoolLayout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    llm = Llama(args.model, routing=False, use_extra_bufts=False, n_ctx=512, n_threads=args.threads, verbose=False)

    def tps() -> float:
        llm.reset()
        toks = llm.tokenize(b"def merge_sort(items: list[int]) -> list[int]:")
        llm.eval(toks)
        tok = toks[-1]
        t0 = time.perf_counter()
        for _ in range(args.n):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return args.n / (time.perf_counter() - t0)

    res: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        res.setdefault("no pool", []).append(tps())
        layout = PoolLayout.of(llm.model)
        layers = layout.layers_of(0)  # the first group (most models have one)
        quarter = max(1, llm.moe_info.n_expert // 4)
        slots = [len(layers) * quarter] + [0] * (len(layout.slot_bytes) - 1)
        pool = ExpertPool(llm, slots, on_host=True)
        res.setdefault("empty pool", []).append(tps())
        for s, (il, e) in enumerate((il, e) for il in layers for e in range(quarter)):
            pool.load(il, e, s)
        pool.fence(wait_loads=True)
        res.setdefault("static pool, 1/4 of each layer's experts", []).append(tps())
        pool.close()
    base = float(np.mean(res["no pool"]))
    for k, v in res.items():
        print(f"{k:42s} {np.mean(v):7.2f} tok/s ({np.mean(v) / base:.3f}x)  runs {', '.join(f'{x:.2f}' for x in v)}")


if __name__ == "__main__":
    main()
