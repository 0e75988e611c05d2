#!/usr/bin/env bash
# Set up spac-llamacpp on a fresh machine (Python >= 3.10, gcc, cmake): a virtualenv in .venv,
# llama-cpp-python 0.3.36 built from source, this package (editable) and its native module.
# Idempotent: a second run only checks. GPU builds: SPAC_LLAMA_BACKEND=--cuda (extra CMake flags
# in CMAKE_ARGS).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

# llama-cpp-python's own dependencies, then llama-cpp-python 0.3.36 built from its sdist
# with our llama.cpp patches (patches/; a no-op when already installed). SPAC_LLAMA_BACKEND picks
# the backend: --cpu (default), --cuda, --metal, --vulkan.
.venv/bin/python -m pip install -q "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
bash scripts/build_llama.sh "${SPAC_LLAMA_BACKEND:---cpu}"

# this package (editable) and its dependencies, the server (fastapi, uvicorn, sse-starlette, ...) and, for
# the tests, openai: pyproject.toml lists the [server] extra's packages itself, so pip keeps the
# llama-cpp-python built above (it only checks its version)
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/spac build-native >/dev/null
echo "setup: done. Try: .venv/bin/spac-run --stats"
