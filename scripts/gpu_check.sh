#!/usr/bin/env bash
# The VRAM tier's first real figures, in one call on a bare machine with an NVIDIA GPU and no network.
#
#   scripts/gpu_check.sh --prepare              # here (CPU machine with the package registry): fill .gpucheck/
#   scripts/gpu_check.sh --dry-run [--python PY]  # check tools and print the plan; builds nothing (CI runs this)
#   scripts/gpu_check.sh [options]              # on the GPU machine: everything below, outputs under $OUT
#
# On the GPU machine (16 cores, no network, only this repository's tracked files + what is carried), in
# under 8 minutes (BUDGET_S, default 470 s; each step has its own time limit and later optional steps
# are dropped when time runs short):
#   1. facts: nvidia-smi -q, compute capability, cores, memory, nvcc, python  -> $OUT/nvidia-smi.txt
#   2. the carried wheels (gguf, cffi, pycparser, diskcache) into $WORK/site (--no-index, nothing fetched)
#   3. the patched llama-cpp-python for this GPU: scripts/build_llama.sh --cuda from the carried trimmed
#      sdist, one architecture (CMAKE_CUDA_ARCHITECTURES from nvidia-smi's compute_cap), -j$(nproc),
#      pip --no-build-isolation (the image's scikit-build-core, cmake, ninja), into $WORK/site;
#      FlashAttention kernels off by default (--fa on: about twice the CUDA compile time), NCCL off
#   4. the native module (cffi + gcc), then `spac synth` writes a real-shape model on the spot
#      (default qwen3-30b-a3b, 8 layers, Q4_K experts: 128 experts of 2.53 MiB per layer, 3.71 GiB)
#   5. tests/test_vram_gpu.py with SPAC_REQUIRE_GPU=1: the pool in VRAM (empty pool bit-exact, full /
#      partial / changing pool within rounding, the tier on tiny models and on the synthesized one)
#      -> $OUT/tests.xml (JUnit, measured differences as properties)
#   6. scripts/bench_vram.py on the synthesized model at two VRAM budgets (default 25% and 50% of the
#      expert bytes on top of the fixed part): stock -ot exps=CPU, the best of three --n-cpu-moe, the
#      spac tier; with a replayed routing trace when bench_vram.py has --replay (feature-detected; the
#      trace is the carried .gpucheck/trace.* or one recorded on the spot), else without, said so in
#      the JSON; one bench_vram.py run per budget -> $OUT/bench.json (their JSON lines), $OUT/bench.log
#   7. $OUT/gpu_check.json: machine, steps (rc, seconds), build flags, model, test results, bench, notes;
#      $OUT/gpu_check.log: everything printed
#
# What must be carried (ignored by git, so `run` sends it only when named in carry): .gpucheck/, made
# here by `scripts/gpu_check.sh --prepare` (trimmed llama-cpp-python 0.3.36 sdist 2.6 MiB + wheels
# 0.4 MiB; the working tree plus carry must stay under 64 MiB: 25 MiB today). The device session's call:
#
#   run(command="bash scripts/gpu_check.sh", carry=[".gpucheck"], timeout_s=600)
#
# then read files_at/gpu_check.json (and gpu_check.log). Options: --budget-s S, --preset NAME,
# --layers N, --type T, --budget B (repeatable; a size or N%), -n TOKENS, --fa on|off, --trace FILE
# (with --prepare: carried; a route CSV / JSONL is imported with `spac trace import`), --work DIR,
# --python PY. A failed test does not stop the bench. --rehearse-cpu: the same run on a CPU machine
# (CPU build of the carried sdist, pool in host memory, RPC tests): checks the machinery. docs/gpu_check.md.
set -uo pipefail
{  # the whole script is one block: bash parses it before running any of it (safe against edits mid-run)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VERSION=0.3.36
CARRY=.gpucheck
SDIST_NAME=llama_cpp_python-$VERSION-trimmed.tar.xz

ARGS=("$@")
MODE=run
REHEARSE=0
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
PRESET=qwen3-30b-a3b
LAYERS=8
QTYPE=q4_k
BUDGETS=()
NPRED=64
FA=off
TRACE=
WORK=${SPAC_GPU_WORK:-/tmp/spac-gpu-check}
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry-run ;;
    --rehearse-cpu) REHEARSE=1 ;;
    --python) PY=$2; shift ;;
    --budget-s) BUDGET_S=$2; shift ;;
    --preset) PRESET=$2; shift ;;
    --layers) LAYERS=$2; shift ;;
    --type) QTYPE=$2; shift ;;
    --budget) BUDGETS+=("$2"); shift ;;
    -n) NPRED=$2; shift ;;
    --fa) FA=$2; shift ;;
    --trace) TRACE=$2; shift ;;
    --work) WORK=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#BUDGETS[@]} -gt 0 ] || BUDGETS=("25%" "50%")
BACKEND=cuda
BENCH_EXTRA=()
TESTS=(tests/test_vram_gpu.py)
if [ "$REHEARSE" = 1 ]; then
  # the same run on a CPU machine (no GPU, any python with this package's dependencies): the CPU build of
  # the carried sdist, the pool in host memory, repacking off (the development VM's AMX kernels); checks
  # the script's machinery, its figures mean nothing
  BACKEND=cpu
  BENCH_EXTRA=(--pool-on-host --no-repack)
  TESTS=(tests/test_vram_gpu.py tests/test_rpc.py)  # the GPU tests skip; the RPC ones run the carried build
fi
if [ "$MODE" = run ] && [ -z "${GPU_CHECK_TEED:-}" ]; then
  # everything printed goes to $OUT/gpu_check.log too (what is under $OUT comes back even on a time-out)
  OUT=${OUT:-$ROOT/gpu_check_out}
  mkdir -p "$OUT"
  export OUT
  GPU_CHECK_TEED=1 bash "$0" "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
case "$FA" in on|off) ;; *) echo "gpu_check: --fa on|off" >&2; exit 2 ;; esac

# time limits of the steps (seconds): caps, each also cut to what is left of BUDGET_S; the bench runs
# one budget per invocation (a late time-out keeps the earlier budgets' JSON) with what the rest leave
T_FACTS=15 T_WHEELS=30 T_BUILD=${T_BUILD:-300} T_NATIVE=60 T_SYNTH=90 T_TESTS=${T_TESTS:-100}

find_nvcc() {
  command -v nvcc 2>/dev/null && return
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/cuda/bin; do
    [ -x "$d/nvcc" ] && { echo "$d/nvcc"; return; }
  done
  return 1
}

# ---------------------------------------------------------------------------------------------------
# --prepare: the carried inputs (this machine has the package registry and the sdist cache)
if [ "$MODE" = prepare ]; then
  set -e
  CACHE=${SPAC_MODEL_CACHE:-$HOME/.cache/spac-llamacpp}/sdist
  SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
  if [ ! -f "$SDIST" ]; then
    mkdir -p "$CACHE"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE"
  fi
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  tar -xzf "$SDIST" -C "$TMP"
  S=$TMP/llama_cpp_python-$VERSION
  L=$S/vendor/llama.cpp
  # what the CMake build with tools, tests and examples off never reads (the patches touch none of it)
  rm -rf "$S"/{docs,examples,tests,docker} "$L"/{models,docs,media,benches,examples,pocs,tests,gguf-py,conversion,app,ci,skills,grammars,requirements}
  find "$L/tools" -mindepth 1 -maxdepth 1 ! -name rpc ! -name CMakeLists.txt -exec rm -rf {} +
  # the git history (a 38 MB pack; the build only asks git for a commit id) and the backends that only a
  # CPU or CUDA build never configures: this sdist builds --cpu and --cuda only
  rm -rf "$S/.git" "$L/.git"
  for b in sycl vulkan opencl hexagon metal et webgpu openvino cann virtgpu zdnn zendnn musa hip; do
    rm -rf "$L/ggml/src/ggml-$b"
  done
  # the series must apply to what is kept (applied in order, then reverted: the sdist stays pristine)
  for p in patches/*.patch; do patch -d "$S" -p1 --silent < "$p" >/dev/null \
    || { echo "gpu_check: $(basename "$p") does not apply to the trimmed sdist" >&2; exit 1; }; done
  for p in $(ls -r patches/*.patch); do patch -d "$S" -p1 -R --silent < "$p" >/dev/null; done
  find "$S" -name '*.orig' -delete
  tar -C "$TMP" -cf - "llama_cpp_python-$VERSION" | xz -T0 -6 > "$CARRY/$SDIST_NAME"
  # wheels the GPU image lacks (its python3 is 3.12; numpy, jinja2, click, rich, tqdm, matplotlib,
  # pyyaml, requests, pytest, scikit-build-core, cmake and ninja are there). pulp (16 MiB) is left out:
  # the tier's default balancer solver is the greedy one.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" gguf==0.19.0 cffi==2.1.1 pycparser==3.12 diskcache==5.6.3 2>&1 | grep -v "^WARNING: Location" || true
  if [ -n "$TRACE" ]; then
    # a routing trace for the bench's replay, cut to the model's first --layers blocks (replay needs the
    # same MoE layers, experts and top-k: e.g. a Mixtral-8x7B trace with --preset mixtral-8x7b)
    case "$TRACE" in
      *.npz) cp "$TRACE" "$TMP/full.npz" ;;
      *) "$PY" -c 'import sys; from spac_llamacpp.tools.cli import spac; sys.argv[0] = "spac"; spac()' \
           trace import "$TRACE" -o "$TMP/full.npz" ;;
    esac
    "$PY" - "$TMP/full.npz" "$CARRY/trace.npz" "$LAYERS" "$TRACE" <<'EOF'
import dataclasses, sys
sys.path.insert(0, ".")
from spac_llamacpp.observe.trace import RoutingTrace
src, dst, n, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t = RoutingTrace.load(src)
keep = [i for i, b in enumerate(t.moe_layers) if b < n]
if t.ids.shape[1] > n:
    meta = dict(t.meta)
    if isinstance(meta.get("layout"), dict) and meta["layout"].get("expert_bytes") is not None:
        meta["layout"] = {**meta["layout"], "expert_bytes": [meta["layout"]["expert_bytes"][i] for i in keep]}
    meta["gpu_check"] = f"first {n} blocks of {t.ids.shape[1]}"
    t = dataclasses.replace(t, ids=t.ids[:, :n].copy(), counts=t.counts[:, :n].copy(),
                            moe_layers=t.moe_layers[keep].copy(), meta=meta)
t.meta["source_file"] = name
t.check()
t.save(dst)
print(f"gpu_check: trace {name}: {t.n_tokens} tokens, {len(t.moe_layers)} MoE layers x {t.n_expert} experts, "
      f"top-{t.ids.shape[2]} -> {dst}")
EOF
  fi
  {
    echo "made by scripts/gpu_check.sh --prepare on $(date -u +%FT%TZ) at commit $(git rev-parse --short HEAD 2>/dev/null)"
    (cd "$CARRY" && find . -type f ! -name MANIFEST.txt -exec sha256sum {} + | sort -k2)
  } > "$CARRY/MANIFEST.txt"
  tree_bytes=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
  carry_bytes=$(du -sb "$CARRY" | cut -f1)
  total=$(( tree_bytes + carry_bytes ))
  printf 'gpu_check: %s: %d MiB carried + %d MiB tracked = %d MiB of the 64 MiB a call sends\n' "$CARRY" \
    $(( carry_bytes >> 20 )) $(( tree_bytes >> 20 )) $(( total >> 20 ))
  [ "$total" -lt $(( 64 << 20 )) ] || { echo "gpu_check: over 64 MiB" >&2; exit 1; }
  grep -qx '/.gpucheck/' .gitignore || echo "gpu_check: warning: .gpucheck/ is not in .gitignore" >&2
  echo 'gpu_check: in the GPU session: run(command="bash scripts/gpu_check.sh", carry=[".gpucheck"], timeout_s=600)'
  exit 0
fi

# ---------------------------------------------------------------------------------------------------
# tools and plan (both --dry-run and a real run start here)
NOTES=()
PROBLEMS=()
check() {  # check NAME REQUIRED(1/0) COMMAND... : print "ok/missing NAME: detail"
  local name=$1 req=$2; shift 2
  local out
  if out=$("$@" 2>&1); then
    printf '  ok       %-18s %s\n' "$name" "$(echo "$out" | head -1)"
  else
    printf '  %-8s %-18s %s\n' "$([ "$req" = 1 ] && echo MISSING || echo absent)" "$name" "$(echo "$out" | head -1)"
    [ "$req" = 1 ] && PROBLEMS+=("$name")
  fi
}
GPU_REQ=$([ "$MODE" = run ] && [ "$REHEARSE" = 0 ] && echo 1 || echo 0)
NVCC=$(find_nvcc || true)
if [ -n "$NVCC" ]; then  # the toolkit's own nvcc, not a wrapper script (CMake derives the toolkit from it)
  top=$("$NVCC" --dryrun -c /dev/null -x cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  [ -n "$top" ] && [ -x "$top/nvcc" ] && NVCC=$(readlink -f "$top/nvcc")
  [ -n "$top" ] && [ -x "$top/bin/nvcc" ] && NVCC=$(readlink -f "$top/bin/nvcc")
fi
echo "gpu_check: tools"
check bash 1 bash -c 'echo "$BASH_VERSION"'
check python 1 "$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version; print(sys.version.split()[0], sys.executable)'
# cmake and ninja may exist only as the python packages of the same names (their binaries then sit in
# the packages' bin folders): put those on PATH
for m in cmake ninja; do
  command -v "$m" >/dev/null 2>&1 && continue
  d=$("$PY" -c "import $m, os; print(getattr($m, 'CMAKE_BIN_DIR', None) or getattr($m, 'BIN_DIR'))" 2>/dev/null) \
    && [ -x "$d/$m" ] && PATH=$d:$PATH
done
export PATH
# cuBLAS (ggml-cuda links it): in the toolkit nvcc belongs to, else in the nvidia-cublas python package
CUBLAS_FLAGS=
cublas_ok() {
  [ -n "$NVCC" ] || { echo "no nvcc"; return 1; }
  local top; top=$("$NVCC" --dryrun -c /dev/null -x cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  local inc
  for inc in "$top/include" "$top/targets/x86_64-linux/include"; do
    [ -f "$inc/cublas_v2.h" ] && { echo "$inc/cublas_v2.h (toolkit)"; return 0; }
  done
  local d; d=$("$PY" -c 'import nvidia.cublas as m; print(list(m.__path__)[0])' 2>/dev/null)
  if [ -n "$d" ] && [ -f "$d/include/cublas_v2.h" ]; then
    local lib lt
    lib=$(ls "$d"/lib/libcublas.so* 2>/dev/null | head -1)
    lt=$(ls "$d"/lib/libcublasLt.so* 2>/dev/null | head -1)
    [ -n "$lib" ] && [ -n "$lt" ] || { echo "$d has no libcublas"; return 1; }
    export CPATH=$d/include${CPATH:+:$CPATH} LIBRARY_PATH=$d/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
    export LD_LIBRARY_PATH=$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    CUBLAS_FLAGS="-DCUDA_cublas_LIBRARY=$lib -DCUDA_cublasLt_LIBRARY=$lt"
    echo "$d (python package nvidia-cublas)"
    return 0
  fi
  echo "cublas_v2.h neither in $top nor in a nvidia-cublas python package"
  return 1
}
cmake_ok() {
  local v; v=$(cmake --version 2>/dev/null | head -1 | awk '{print $3}')
  [ -n "$v" ] || { echo "not found"; return 1; }
  local maj=${v%%.*} rest=${v#*.}; local min=${rest%%.*}
  { [ "$maj" -gt 3 ] || { [ "$maj" -eq 3 ] && [ "$min" -ge 21 ]; }; } || { echo "$v (needs >= 3.21)"; return 1; }
  echo "$v"
}
check cmake 1 cmake_ok
check gcc 1 bash -c 'gcc -dumpfullversion && g++ -dumpfullversion >/dev/null'
check nvcc "$GPU_REQ" bash -c "[ -n '$NVCC' ] && '$NVCC' --version | tail -2 | head -1"
if [ "$BACKEND" = cuda ]; then
  cublas_ok >/dev/null 2>&1 || true  # (sets CUBLAS_FLAGS and the paths outside the check's subshell)
  check cublas "$GPU_REQ" cublas_ok
fi
check nvidia-smi "$GPU_REQ" nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
check ninja 0 bash -c 'ninja --version || "$0" -c "import ninja; print(ninja.__version__)"' "$PY"
check scikit-build-core "$GPU_REQ" "$PY" -c 'import scikit_build_core; print(scikit_build_core.__version__)'
check python-headers "$GPU_REQ" "$PY" -c 'import os, sysconfig; p = os.path.join(sysconfig.get_paths()["include"], "Python.h"); assert os.path.isfile(p), p + " missing (the native module needs it)"; print(p)'
check xz "$GPU_REQ" xz --version
check carried-sdist "$GPU_REQ" test -f "$CARRY/$SDIST_NAME"
check carried-wheels "$GPU_REQ" bash -c "ls $CARRY/wheels/*.whl | wc -l | grep -qv '^0$' && ls $CARRY/wheels | tr '\n' ' '"
check repo-files 1 test -f tests/test_vram_gpu.py -a -f scripts/bench_vram.py -a -f scripts/build_llama.sh
CORES=$(nproc)
CC_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
ARCH=${CUDA_ARCH:-${CC_CAP:-90}}
CMAKE_FLAGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH -DGGML_CUDA_FA=$( [ "$FA" = on ] && echo ON || echo OFF) -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON"
[ -n "$NVCC" ] && CMAKE_FLAGS="$CMAKE_FLAGS -DCMAKE_CUDA_COMPILER=$NVCC"
[ -n "$CUBLAS_FLAGS" ] && CMAKE_FLAGS="$CMAKE_FLAGS $CUBLAS_FLAGS"
[ "$BACKEND" = cpu ] && CMAKE_FLAGS="-DGGML_NATIVE=ON"
MODEL=$WORK/$PRESET-${LAYERS}L-$QTYPE.gguf

# the bench's replay option (routing replay is being added to the bench scripts and spac-run)
SPAC=("$PY" -c 'import sys; from spac_llamacpp.tools.cli import spac; sys.argv[0] = "spac"; spac()')
REPLAY=no
RUN_REPLAY=no
if PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/bench_vram.py --help 2>/dev/null | grep -q -- '--replay'; then
  REPLAY=yes
fi
if PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${SPAC[@]}" run --help 2>/dev/null | grep -q -- '--replay'; then
  RUN_REPLAY=yes
fi

echo "gpu_check: plan (budget ${BUDGET_S} s on $CORES cores; work dir $WORK; outputs in ${OUT:-./gpu_check_out})"
echo "  1 facts        ${T_FACTS}s  nvidia-smi -q > \$OUT/nvidia-smi.txt; compute_cap ${CC_CAP:-?} -> sm_$ARCH"
echo "  2 wheels       ${T_WHEELS}s  $PY -m pip install --no-index --no-deps --target $WORK/site $CARRY/wheels/*.whl"
echo "  3 build        ${T_BUILD}s  CMAKE_ARGS='$CMAKE_FLAGS' CMAKE_BUILD_PARALLEL_LEVEL=$CORES PIP_BUILD_OPTS='--no-build-isolation --no-index --target $WORK/site' scripts/build_llama.sh --$BACKEND --python $PY --sdist $CARRY/$SDIST_NAME"
echo "  4 native+synth ${T_NATIVE}+${T_SYNTH}s  spac build-native; spac synth $PRESET -o $MODEL --layers $LAYERS --type $QTYPE"
echo "  5 tests        ${T_TESTS}s  SPAC_REQUIRE_PATCHED=1 SPAC_REQUIRE_GPU=1 SPAC_SYNTH_MODEL=$MODEL pytest ${TESTS[*]} --junitxml=\$OUT/tests.xml"
echo "  6 bench        the rest  for B in ${BUDGETS[*]}: scripts/bench_vram.py $MODEL --budget B -n $NPRED$([ "$REPLAY" = yes ] && echo " --replay TRACE")"
echo "  7 report       \$OUT/gpu_check.json, \$OUT/gpu_check.log"
echo "  replay: spac-run --replay: $RUN_REPLAY; bench_vram.py --replay: $REPLAY; carried trace: $([ -f "$CARRY/trace.npz" ] && echo "$CARRY/trace.npz" || echo none)"
if [ "$REPLAY" = yes ] && [ -f "$CARRY/trace.npz" ]; then
  echo "          the bench replays $CARRY/trace.npz (its MoE layers, experts and top-k must match the model)"
else
  echo "          the bench runs on the synthesized model's own (random-weight) routing"
fi
if "$PY" - "$PRESET" "$LAYERS" "$QTYPE" "${BUDGETS[@]}" <<'EOF' 2>/dev/null
import sys
sys.path.insert(0, ".")
from spac_llamacpp.models.synth.presets import get_preset
from spac_llamacpp.models.synth.writer import plan_tensors
preset, layers, qtype, budgets = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
p = get_preset(preset)
ts = plan_tensors(p, p.with_layers(layers), qtype)
exp = sum(t.nbytes for t in ts if "_exps" in t.name)
tot = sum(t.nbytes for t in ts)
g = 2 ** 30
print(f"  model: {preset}, {layers} layers, {p.spec.n_expert} experts x {p.spec.n_expert_used}, {qtype}: "
      f"{tot / g:.2f} GiB, of which routed experts {exp / g:.2f} GiB "
      f"({exp / (layers * p.spec.n_expert) / 2**20:.2f} MiB per expert)")
for b in budgets:
    if b.endswith("%"):
        print(f"  budget {b}: fixed part (non-expert weights + KV + reserve) + {float(b[:-1]) / 100 * exp / g:.2f} GiB of experts")
EOF
then :; else echo "  model: (plan not computed: $PY cannot import spac_llamacpp's synth presets here)"; fi

if [ "$MODE" = dry-run ]; then
  if [ ${#PROBLEMS[@]} -gt 0 ]; then
    echo "gpu_check: dry run: missing ${PROBLEMS[*]}" >&2
    exit 1
  fi
  echo "gpu_check: dry run: nothing built; on a GPU machine: bash scripts/gpu_check.sh (carry .gpucheck)"
  exit 0
fi
if [ ${#PROBLEMS[@]} -gt 0 ]; then
  echo "gpu_check: cannot run: missing ${PROBLEMS[*]}" >&2
  NOTES+=("stopped before building: missing ${PROBLEMS[*]}")
fi

# ---------------------------------------------------------------------------------------------------
# the real run
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
STEPS=$WORK/steps.tsv
: > "$STEPS"
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
step() {  # step NAME LIMIT CMD... : run with a time limit, record rc and seconds
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  [ "$limit" -gt "$l" ] && limit=$l
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t0\tno time left\n' "$name" >> "$STEPS"
    echo "gpu_check: [$name] skipped: no time left"
    return 99
  fi
  echo "gpu_check: [$name] (limit ${limit}s) $(date -u +%T)"
  local t; t=$(date +%s)
  LIMIT=$limit STEP_T=$t
  "$@"
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" "$([ $rc = 124 ] && echo "timed out after ${limit}s")" >> "$STEPS"
  echo "gpu_check: [$name] rc=$rc in $(( $(date +%s) - t ))s"
  return $rc
}
T() {  # a command under what is left of the running step's limit (timeout signals its whole process group)
  local l=$(( LIMIT - ($(date +%s) - STEP_T) ))
  [ "$l" -gt 0 ] || return 124
  timeout --kill-after=10 "$l" "$@"
}
export PYTHONPATH=$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 SPAC_NATIVE_CACHE=$WORK/native SPAC_MODEL_CACHE=$WORK/cache

facts() {
  T nvidia-smi -q > "$OUT/nvidia-smi.txt" 2>&1 || true
  {
    echo "gpu=$(nvidia-smi --query-gpu=name,compute_cap,memory.total,memory.free,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader 2>&1 | head -1)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
    echo "mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "nvcc=$("${NVCC:-nvcc}" --version 2>&1 | tail -2 | head -1)"
    echo "python=$("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
    echo "kernel=$(uname -r)"
    echo "disk=$(df -h "$WORK" | tail -1 | awk '{print $4 " free"}')"
  } > "$WORK/facts.txt"
  cat "$WORK/facts.txt"
}
wheels() {
  T "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$CARRY"/wheels/*.whl
}
build() {
  CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$CORES \
    PIP_BUILD_OPTS="--no-build-isolation --no-index --target $WORK/site" SPAC_MODEL_CACHE=$WORK/cache \
    T bash scripts/build_llama.sh "--$BACKEND" --python "$PY" --sdist "$CARRY/$SDIST_NAME"
}
native() {
  T "${SPAC[@]}" build-native && REHEARSE=$REHEARSE T "$PY" - <<'EOF'
import os
from spac_llamacpp import patched_llama_available
from spac_llamacpp.native.libs import device_names
print("patch level 3:", patched_llama_available(3), "devices:", device_names())
assert patched_llama_available(3)
assert os.environ.get("REHEARSE") == "1" or any(n.startswith("CUDA") for n in device_names()), "no CUDA device"
EOF
}
synth() { T "${SPAC[@]}" synth "$PRESET" -o "$MODEL" --layers "$LAYERS" --type "$QTYPE" && T "${SPAC[@]}" inspect "$MODEL" --json > "$WORK/inspect.json"; }
tests() {
  SPAC_REQUIRE_PATCHED=1 SPAC_REQUIRE_GPU=$([ "$REHEARSE" = 1 ] || echo 1) SPAC_SYNTH_MODEL=$MODEL \
    T "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" -o junit_family=xunit1 \
      --junitxml="$OUT/tests.xml" -rfEs
}
trace_for_replay() {  # the carried trace, checked against the model (the replay refuses other shapes)
  cp "$CARRY/trace.npz" "$WORK/trace.npz" || return 1
  T "$PY" - "$WORK/trace.npz" "$MODEL" > "$WORK/trace.txt" <<'EOF'
import sys
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.observe.trace import RoutingTrace
t, m = RoutingTrace.load(sys.argv[1]), read_model_header(sys.argv[2])
shape = (len(t.moe_layers), t.n_expert, t.ids.shape[2])
want = (len(m.moe_layers), m.n_expert, m.n_expert_used if isinstance(m.n_expert_used, int) else max(m.n_expert_used))
src = t.meta.get("source_file", "carried")
print(f"{src}: {t.n_tokens} tokens, {shape[0]} MoE layers x {shape[1]} experts, top-{shape[2]}"
      + ("" if shape == want else f"; the model has {want[0]} x {want[1]}, top-{want[2]}: not replayed"))
sys.exit(0 if shape == want else 1)
EOF
  local rc=$?
  cat "$WORK/trace.txt"
  [ "$rc" = 0 ] || rm -f "$WORK/trace.npz"
  return "$rc"
}
bench() {  # bench BUDGET: one budget; its JSON line appended to $OUT/bench.json
  local args=("$MODEL" -n "$NPRED" --budget "$1" "${BENCH_EXTRA[@]}")
  [ "$REPLAY" = yes ] && [ -f "$WORK/trace.npz" ] && args+=(--replay "$WORK/trace.npz")
  T "$PY" scripts/bench_vram.py "${args[@]}" 2>&1 | tee -a "$OUT/bench.log"
  local rc=${PIPESTATUS[0]}
  tail -1 "$OUT/bench.log" | "$PY" -c 'import json, sys; json.loads(sys.stdin.read())' 2>/dev/null \
    && tail -1 "$OUT/bench.log" >> "$OUT/bench.json"
  return "$rc"
}

if [ ${#PROBLEMS[@]} -eq 0 ]; then
  step facts "$T_FACTS" facts
  if [ "$REHEARSE" = 0 ]; then step wheels "$T_WHEELS" wheels; fi  # (a rehearsal's python has them)
  if step build "$T_BUILD" build; then
    if step native "$T_NATIVE" native && step synth "$T_SYNTH" synth; then
      step tests "$T_TESTS" tests || NOTES+=("tests failed or timed out: see tests.xml and the log")
      if [ "$REPLAY" = yes ] && [ -f "$CARRY/trace.npz" ]; then
        step trace 30 trace_for_replay || NOTES+=("the carried trace does not fit the model: the bench ran without replay")
      elif [ "$REPLAY" = yes ]; then
        NOTES+=("no trace carried (scripts/gpu_check.sh --prepare --trace FILE): the bench ran on the synthesized model's own random-weight routing")
      else
        NOTES+=("bench_vram.py has no --replay yet (spac-run --replay: $RUN_REPLAY): the bench ran on the synthesized model's own random-weight routing")
      fi
      : > "$OUT/bench.json"
      : > "$OUT/bench.log"
      n_left=${#BUDGETS[@]}
      for b in "${BUDGETS[@]}"; do  # an even share of what is left for each remaining budget
        step "bench $b" $(( ($(left) - 10) / n_left )) bench "$b" || NOTES+=("bench at $b failed or timed out: see bench.log")
        n_left=$(( n_left - 1 ))
      done
    else
      NOTES+=("native module or model synthesis failed: no tests, no bench")
    fi
  else
    NOTES+=("the CUDA build failed or timed out: no tests, no bench (see the log)")
  fi
fi

# ---------------------------------------------------------------------------------------------------
# the report
printf '%s\n' "${NOTES[@]}" > "$WORK/notes.txt"
"$PY" - "$OUT" "$WORK" "$T0" "$BUDGET_S" "$CMAKE_FLAGS" "$PRESET" "$LAYERS" "$QTYPE" "$MODEL" "$REPLAY" "$FA" "$RUN_REPLAY" <<'EOF'
import json, os, sys, time
import xml.etree.ElementTree as ET

out, work, t0, budget, flags, preset, layers, qtype, model, replay, fa, run_replay = sys.argv[1:]
def read(p, default=""):
    try:
        return open(p).read()
    except OSError:
        return default
facts = dict(l.split("=", 1) for l in read(os.path.join(work, "facts.txt")).splitlines() if "=" in l)
steps = []
for line in read(os.path.join(work, "steps.tsv")).splitlines():
    name, rc, secs, note = (line.split("\t") + [""] * 4)[:4]
    steps.append({"step": name, "rc": None if rc == "skipped" else int(rc), "seconds": int(secs), "note": note})
tests = None
try:
    root = ET.parse(os.path.join(out, "tests.xml")).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for c in suite.iter("testcase"):
        outcome = "passed"
        msg = ""
        for tag in ("failure", "error", "skipped"):
            el = c.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (el.get("message") or "")[:500]
        props = {p.get("name"): p.get("value") for p in c.iter("property")}
        cases.append({"test": c.get("name"), "outcome": outcome, "seconds": float(c.get("time") or 0),
                      "message": msg, "properties": props})
    tests = {k: int(suite.get(k) or 0) for k in ("tests", "failures", "errors", "skipped")}
    tests["cases"] = cases
except (OSError, ET.ParseError, AttributeError):
    pass
bench = []
for line in read(os.path.join(out, "bench.json")).splitlines():
    try:
        bench.append(json.loads(line))
    except ValueError:
        pass
bench = bench or None
inspect = None
try:
    inspect = json.loads(read(os.path.join(work, "inspect.json")))
except ValueError:
    pass
report = {
    "what": "scripts/gpu_check.sh: the VRAM tier on a GPU (issue 14)",
    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "seconds": int(time.time()) - int(t0), "budget_s": int(budget),
    "machine": facts,
    "build": {"cmake_args": flags, "flash_attention_kernels": fa},
    "model": {"preset": preset, "layers": int(layers), "type": qtype, "path": model,
              "bytes": os.path.getsize(model) if os.path.exists(model) else None,
              "inspect": {k: inspect.get(k) for k in ("architecture", "block_count", "n_expert", "expert_ff_length",
                                                       "expert_bytes", "non_expert_bytes", "file_size")} if isinstance(inspect, dict) else None},
    "steps": steps,
    "tests": tests,
    "replay": {"bench_supports_replay": replay == "yes", "spac_run_supports_replay": run_replay == "yes",
               "trace": read(os.path.join(work, "trace.txt")).strip() or None,
               "replayed": os.path.exists(os.path.join(work, "trace.npz"))},
    "bench": bench,
    "notes": [n for n in read(os.path.join(work, "notes.txt")).splitlines() if n],
}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1)
ok = tests is not None and tests["failures"] == 0 and tests["errors"] == 0 and bench is not None
print(f"gpu_check: {'done' if ok else 'INCOMPLETE'} in {report['seconds']} s; report {os.path.join(out, 'gpu_check.json')}")
for n in report["notes"]:
    print(f"gpu_check: note: {n}")
sys.exit(0 if ok else 1)
EOF
exit $?
}
