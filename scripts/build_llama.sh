#!/usr/bin/env bash
# Build llama-cpp-python 0.3.36 with spac-llamacpp's llama.cpp patches (patches/*.patch, in order)
# and install it into the virtualenv (default .venv; SPAC_VENV=DIR or --python PY for another one).
#
#   scripts/build_llama.sh [--cpu|--cuda|--metal|--vulkan] [--python PY] [--sdist FILE] [--force]
#
# Every backend also gets llama.cpp's RPC backend (GGML_RPC=ON: remote devices, e.g. `rpc-server` on
# another machine, or on 127.0.0.1 as a real non-host device for tests), and the `rpc-server` binary
# is compiled against the installed libraries into llama_cpp/lib/rpc-server (and linked as
# VENV/bin/rpc-server).
#
# The sdist comes from the package registry (pip download, cached in
# ${SPAC_MODEL_CACHE:-~/.cache/spac-llamacpp}/sdist). Every patch is checked with a dry run before
# anything is changed. Extra CMake flags: CMAKE_ARGS (e.g. CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=89").
# --sdist FILE uses that sdist (a .tar.gz or .tar.xz, e.g. the trimmed one scripts/gpu_check.sh carries to
# a machine without network). Parallel jobs: CMAKE_BUILD_PARALLEL_LEVEL (default nproc).
# Idempotent: when the installed build already carries these patches, backend and flags (same stamp:
# a hash of the patch series, the CMake flags and this build recipe), it only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VERSION=0.3.36
PY=${SPAC_VENV:-.venv}/bin/python
SDIST=
BACKEND=cpu
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu|--cuda|--metal|--vulkan) BACKEND=${1#--} ;;
    --python) PY=$2; shift ;;
    --sdist) SDIST=$2; shift ;;
    --force) FORCE=1 ;;
    *) echo "build_llama: unknown option $1 (use --cpu|--cuda|--metal|--vulkan, --python PY, --sdist FILE, --force)" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$PY" ] || { echo "build_llama: $PY not found; create the virtualenv first (scripts/setup.sh)" >&2; exit 2; }

case "$BACKEND" in
  cpu) FLAGS="-DGGML_RPC=ON" ;;
  cuda) FLAGS="-DGGML_CUDA=on -DGGML_RPC=ON" ;;
  metal) FLAGS="-DGGML_METAL=on -DGGML_RPC=ON" ;;
  vulkan) FLAGS="-DGGML_VULKAN=on -DGGML_RPC=ON" ;;
esac
ALL_ARGS="-DLLAVA_BUILD=OFF $FLAGS ${CMAKE_ARGS:-}"
# bump when the steps below change what gets installed (e.g. the rpc-server binary)
RECIPE=2

# a stamp of the patch series, the CMake flags and the recipe, recorded next to the installed package
STAMP=$({ cat patches/*.patch; echo "recipe $RECIPE: $ALL_ARGS"; } | sha256sum | cut -c1-16)-$BACKEND
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
if [ -z "$SDIST" ]; then
  mkdir -p "$CACHE"
  SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
fi
if [ ! -f "$SDIST" ]; then
  echo "build_llama: downloading the llama-cpp-python $VERSION sdist..."
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar -xf "$SDIST" -C "$WORK"
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
CMAKE_ARGS="$ALL_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$PY" -m pip install -q --no-deps --force-reinstall --no-cache-dir ${PIP_BUILD_OPTS:-} "$SRC"
LIB=$("$PY" -c 'import pathlib, llama_cpp; print(pathlib.Path(llama_cpp.__file__).parent / "lib")')

# rpc-server (llama.cpp's tools/rpc, which links only ggml): one translation unit against the installed
# libggml, so it serves exactly this build (patched kernels included); seconds, not a second cmake build
LL=$SRC/vendor/llama.cpp
"${CXX:-g++}" -std=c++17 -O2 -o "$LIB/rpc-server" "$LL/tools/rpc/rpc-server.cpp" -I"$LL/ggml/include" \
  -L"$LIB" -l:libggml.so.0 -l:libggml-base.so.0 -Wl,-rpath,'$ORIGIN' -pthread
BIN=$(dirname "$(command -v "$PY")")
if ln -sf "$LIB/rpc-server" "$BIN/rpc-server" 2>/dev/null; then
  echo "build_llama: rpc-server in $LIB (linked as $BIN/rpc-server)"
else
  echo "build_llama: rpc-server in $LIB"
fi

"$PY" - "$STAMP" <<'EOF'
import pathlib, sys, llama_cpp
pathlib.Path(llama_cpp.__file__).with_name("spac_patches.txt").write_text(sys.argv[1] + "\n")
EOF
echo "build_llama: installed llama-cpp-python $VERSION with spac patches $STAMP"
