#!/usr/bin/env bash
# Set up spac-llamacpp on a fresh machine (Python >= 3.10, gcc, cmake): a virtualenv in .venv,
# llama-cpp-python 0.3.36 built from source, this package (editable) and its native module.
# Idempotent: a second run only checks. Set CMAKE_ARGS for GPU builds, e.g. "-DGGML_CUDA=on".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LLAMA_CPP_VERSION=0.3.36

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  echo "setup: building llama-cpp-python $LLAMA_CPP_VERSION from source (a few minutes)..."
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    .venv/bin/python -m pip install -q "llama-cpp-python==$LLAMA_CPP_VERSION"
fi

.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/spac build-native >/dev/null
echo "setup: done. Try: .venv/bin/spac-run --stats"
