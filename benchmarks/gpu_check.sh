#!/usr/bin/env bash
# Builds the CUDA extension on a GPU machine, runs every GPU test, the example
# and the benchmark, and writes logs under $OUT (default ./gpu_out).
#
# On a machine without the CuTe DSL, export the kernels elsewhere first:
#   python -m jax_moe._export --out .gpu/kernels
# and pass that folder as KERNEL_DIR (default .gpu/kernels when it exists).
#
#   bash benchmarks/gpu_check.sh [build] [tests] [example] [bench]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
KERNEL_DIR=${KERNEL_DIR:-}
[ -z "$KERNEL_DIR" ] && [ -d .gpu/kernels ] && KERNEL_DIR=$PWD/.gpu/kernels
steps=${*:-build tests example bench}
log=$OUT/summary.txt
has() { case " $steps " in *" $1 "*) return 0;; *) return 1;; esac; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$log"

if has build; then
  define=()
  [ -n "$KERNEL_DIR" ] && define=(-Ccmake.define.JAX_MOE_KERNEL_DIR="$KERNEL_DIR")
  start=$(date +%s)
  python3 -m pip install -q --no-build-isolation --no-deps -e . "${define[@]}" \
    -Ccmake.define.JAX_MOE_REQUIRE_EXTENSION=ON > "$OUT/build.txt" 2>&1
  echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$log"
  (cd /tmp && python3 -c "import jax_moe._jax_moe_ffi as m; print('extension', m.__file__)") 2>&1 | tee -a "$log"
fi

if has tests; then
  timeout 200 python3 -m pytest -q -rs -p no:cacheprovider --durations=10 \
    tests/test_ffi_gpu.py tests/test_moe_gemm_gpu.py tests/test_fused_moe.py \
    > "$OUT/tests.txt" 2>&1
  echo "tests rc=$?: $(tail -n 1 "$OUT/tests.txt")" | tee -a "$log"
fi

if has example; then
  timeout 60 python3 examples/moe_layer.py --model=qwen3_30b_a3b --num_tokens=256 \
    > "$OUT/example.txt" 2>&1
  echo "example rc=$?: $(grep -E 'PASS|FAIL' "$OUT/example.txt" | tail -n 1)" | tee -a "$log"
fi

if has bench; then
  for model in deepseek_v3 qwen3_30b_a3b; do
    ep=8; [ "$model" = qwen3_30b_a3b ] && ep=1
    timeout 150 python3 benchmarks/bench_moe.py --model=$model --ep=$ep \
      > "$OUT/bench_${model}.txt" 2>&1
    echo "bench $model rc=$?" | tee -a "$log"
    tail -n 12 "$OUT/bench_${model}.txt" | tee -a "$log"
  done
fi
