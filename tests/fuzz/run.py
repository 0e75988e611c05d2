"""Run the fuzz targets (``targets.py``) with atheris, a coverage-guided fuzzer (libFuzzer for Python).

    python tests/fuzz/run.py gguf_header --runs 100000        # one target (or several)
    python tests/fuzz/run.py --all --runs 12000 --jobs 2      # every target (CI), two at a time

Each target runs in a process of its own (libFuzzer exits when done): the corpus directory starts from
the seeds (``seeds.py``) and the regressions (``regressions/<target>/``), and grows with the inputs
that reached new code. A target's contract: return, or raise ``SpacError``; any other exception, a
crash, more than ``--timeout`` seconds on one input or ``--rss-mb`` of memory is a failure: libFuzzer
writes the input as ``crash-*`` / ``timeout-*`` / ``oom-*`` into ``--artifacts`` (copy it into
``regressions/<target>/`` once fixed), and this script exits 1.

Without atheris (it needs a wheel for this Python), a plain mutator runs instead (random byte edits and
splices of the corpus, no coverage feedback), with the same contract; the summary line says which ran.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TARGET_NAMES = ("gguf_header", "trace_load", "trace_import", "profile_load")
INSTRUMENTED = ("spac_llamacpp.base", "spac_llamacpp.gguf", "spac_llamacpp.observe", "spac_llamacpp.planning.budgets",
                "spac_llamacpp.sim.simulator")
DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def _fill_corpus(target: str, corpus: Path) -> None:
    import seeds  # noqa: PLC0415 - after sys.path and instrumentation are set up

    corpus.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seeds.seeds(target)):
        (corpus / f"seed-{i}").write_bytes(data)
    for p in seeds.regressions(target):
        shutil.copy(p, corpus / f"regression-{p.name}")


def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(pos, len(b) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and b:
            del b[pos:pos + rng.randint(1, 64)]
        elif op == 4 and b:
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice((0, 1, 2, 255, 1 << 31, (1 << 32) - 1, (1 << 63) - 1, (1 << 64) - 1,
                                rng.randrange(1 << 16)))
            b[pos:pos + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
        elif op == 5 and pool:
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            b = b[:pos] + bytearray(other[cut:cut + rng.randint(1, 256)]) + b[pos:]
        elif op == 6:
            del b[pos:]
    return bytes(b)


def _plain(target: str, corpus: Path, runs: int, max_time: float, artifacts: Path, seed: int) -> int:
    """The fallback fuzzer: no coverage feedback, same contract."""
    from targets import run_one  # noqa: PLC0415

    pool = [p.read_bytes() for p in sorted(corpus.iterdir())]
    rng = random.Random(seed)
    start = time.monotonic()
    done = 0
    while done < runs and time.monotonic() - start < max_time:
        data = _mutate(rng, rng.choice(pool), pool) if done >= len(pool) else pool[done]
        try:
            run_one(target, data)
        except BaseException:
            artifacts.mkdir(parents=True, exist_ok=True)
            crash = artifacts / f"crash-{target}-{done}"
            crash.write_bytes(data)
            print(f"failure on input {done}, written to {crash}", file=sys.stderr)
            raise
        done += 1
    print(f"Done {done} runs in {int(time.monotonic() - start)} second(s)", file=sys.stderr)
    return 0


def _worker(args: argparse.Namespace) -> int:
    """One target in this process."""
    sys.path[:0] = [str(HERE), str(ROOT)]
    corpus = Path(args.corpus)
    artifacts = Path(args.artifacts)
    try:
        import atheris
    except ImportError:
        atheris = None
    if atheris is None or args.plain:
        print(f"fuzz {args.target}: atheris is not installed; running the plain mutator", file=sys.stderr)
        _fill_corpus(args.target, corpus)
        return _plain(args.target, corpus, args.runs, args.max_time, artifacts, args.seed)
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        import targets  # noqa: PLC0415
    _fill_corpus(args.target, corpus)
    artifacts.mkdir(parents=True, exist_ok=True)
    run_one = targets.run_one
    target = args.target

    def test_one_input(data: bytes) -> None:
        run_one(target, data)

    flags = [sys.argv[0], f"-runs={args.runs}", f"-max_total_time={int(args.max_time)}", f"-timeout={args.timeout}",
             f"-rss_limit_mb={args.rss_mb}", f"-max_len={args.max_len}", f"-seed={args.seed}",
             f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]
    atheris.Setup(flags, test_one_input)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits


def _spawn(target: str, args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, Path]:
    log = work / f"{target}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), target, "--worker", "--runs", str(args.runs),
           "--max-time", str(args.max_time), "--timeout", str(args.timeout), "--rss-mb", str(args.rss_mb),
           "--max-len", str(args.max_len), "--seed", str(args.seed),
           "--corpus", str((Path(args.corpus) if args.corpus else work / "corpus") / target),
           "--artifacts", str(args.artifacts or work / "artifacts")]
    if args.plain:
        cmd.append("--plain")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    fh = log.open("w")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env), log


def _summary(target: str, rc: int, log: Path, seconds: float, runs_wanted: int) -> tuple[bool, str]:
    text = log.read_text(errors="replace")
    m = DONE.findall(text)
    runs = int(m[-1][0]) if m else 0
    engine = "plain mutator" if "running the plain mutator" in text else "atheris"
    ok = rc == 0 and runs > 0
    cov = re.findall(r"cov: (\d+)", text)
    line = (f"fuzz {target}: {runs} inputs ({engine}{', cov ' + cov[-1] if cov else ''}) in {seconds:.0f} s, "
            f"{'no failures' if ok else 'FAILED (exit ' + str(rc) + ')'}")
    if runs < runs_wanted and ok:
        line += f" (stopped at the time limit before {runs_wanted})"
    return ok, line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", nargs="*", help=f"targets: {', '.join(TARGET_NAMES)}")
    ap.add_argument("--all", action="store_true", help="every target")
    ap.add_argument("--runs", type=int, default=10_000, help="inputs per target")
    ap.add_argument("--max-time", type=float, default=3600, help="seconds per target at most")
    ap.add_argument("--jobs", type=int, default=1, help="targets run at once (--all)")
    ap.add_argument("--timeout", type=int, default=20, help="seconds one input may take")
    ap.add_argument("--rss-mb", type=int, default=3072)
    ap.add_argument("--max-len", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--corpus", help="corpus directory (kept; default: a temporary one)")
    ap.add_argument("--artifacts", help="where failing inputs go (default: a temporary directory, printed)")
    ap.add_argument("--plain", action="store_true", help="the plain mutator even when atheris is installed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [t for t in args.target if t not in TARGET_NAMES]
    if unknown:
        ap.error(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGET_NAMES)}")
    if args.worker:
        args.target = args.target[0]
        return _worker(args)
    names = list(TARGET_NAMES) if args.all else list(args.target)
    if not names:
        ap.error("name a target or pass --all")
    work = Path(tempfile.mkdtemp(prefix="spac-fuzz-run-"))
    pending, running, ok_all = list(names), [], True
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            t = pending.pop(0)
            proc, log = _spawn(t, args, work)
            running.append((t, proc, log, time.monotonic()))
        time.sleep(0.2)
        for item in list(running):
            t, proc, log, start = item
            rc = proc.poll()
            if rc is None:
                continue
            running.remove(item)
            ok, line = _summary(t, rc, log, time.monotonic() - start, args.runs)
            print(line, flush=True)
            if not ok:
                ok_all = False
                print(log.read_text(errors="replace")[-6000:], file=sys.stderr)
                print(f"failing inputs: {args.artifacts or work / 'artifacts'}", file=sys.stderr)
    if ok_all:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
