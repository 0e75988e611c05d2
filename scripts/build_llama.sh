#!/usr/bin/env bash
# Build llama-cpp-python 0.3.36 with spac-llamacpp's llama.cpp patches (patches/*.patch, in order)
# and install it into the virtualenv (default .venv).
#
#   scripts/build_llama.sh [--cpu|--cuda|--metal|--vulkan] [--python PY] [--force]
#
# The sdist comes from the package registry (pip download, cached in
# ${SPAC_MODEL_CACHE:-~/.cache/spac-llamacpp}/sdist). Every patch is checked with a dry run before
# anything is changed. Extra CMake flags: CMAKE_ARGS (e.g. CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=89").
# Idempotent: when the installed build already carries these patches (same patch hash), it only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VERSION=0.3.36
PY=.venv/bin/python
BACKEND=cpu
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu|--cuda|--metal|--vulkan) BACKEND=${1#--} ;;
    --python) PY=$2; shift ;;
    --force) FORCE=1 ;;
    *) echo "build_llama: unknown option $1 (use --cpu|--cuda|--metal|--vulkan, --python PY, --force)" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$PY" ] || { echo "build_llama: $PY not found; create the virtualenv first (scripts/setup.sh)" >&2; exit 2; }

case "$BACKEND" in
  cpu) FLAGS="" ;;
  cuda) FLAGS="-DGGML_CUDA=on" ;;
  metal) FLAGS="-DGGML_METAL=on" ;;
  vulkan) FLAGS="-DGGML_VULKAN=on" ;;
esac

# a stamp of the patch series and backend, recorded next to the installed package
STAMP=$(cat patches/*.patch | sha256sum | cut -c1-16)-$BACKEND
INSTALLED=$("$PY" - <<'EOF' 2>/dev/null || true
import pathlib, llama_cpp
p = pathlib.Path(llama_cpp.__file__).with_name("spac_patches.txt")
print(p.read_text().strip() if p.is_file() and llama_cpp.__version__ == "0.3.36" else "")
EOF
)
if [ "$FORCE" = 0 ] && [ "$INSTALLED" = "$STAMP" ]; then
  echo "build_llama: llama-cpp-python $VERSION with spac patches $STAMP is installed"
  exit 0
fi

CACHE=${SPAC_MODEL_CACHE:-$HOME/.cache/spac-llamacpp}/sdist
mkdir -p "$CACHE"
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
  echo "build_llama: downloading the llama-cpp-python $VERSION sdist..."
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar -xzf "$SDIST" -C "$WORK"
SRC=$WORK/llama_cpp_python-$VERSION
for p in "$ROOT"/patches/*.patch; do
  if ! patch -d "$SRC" -p1 --dry-run --silent < "$p" >/dev/null; then
    echo "build_llama: $(basename "$p") does not apply to llama-cpp-python $VERSION" >&2
    exit 1
  fi
  patch -d "$SRC" -p1 --silent < "$p"
  echo "build_llama: applied $(basename "$p")"
done

echo "build_llama: building ($BACKEND; a few minutes)..."
CMAKE_ARGS="-DLLAVA_BUILD=OFF $FLAGS ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$PY" -m pip install -q --no-deps --force-reinstall --no-cache-dir "$SRC"
"$PY" - "$STAMP" <<'EOF'
import pathlib, sys, llama_cpp
pathlib.Path(llama_cpp.__file__).with_name("spac_patches.txt").write_text(sys.argv[1] + "\n")
EOF
echo "build_llama: installed llama-cpp-python $VERSION with spac patches $STAMP"
