#!/usr/bin/env bash
# Builds the CUDA extension on a GPU machine, runs every GPU test, the example
# and the benchmark, and writes logs under $OUT (default ./gpu_out).
#
# On a machine without the CuTe DSL, export the kernels elsewhere first:
#   python -m jax_moe._export --out .gpu/kernels
# and pass that folder as KERNEL_DIR (default .gpu/kernels when it exists).
#
#   bash benchmarks/gpu_check.sh [build] [site] [tests] [memcheck] [ncu] [dsl_memcheck]
#                                [dsl_ncu] [example] [bench] [tune] [evaluate]
#
# site: instead of the editable install of `build`, installs the package built from
# KERNEL_DIR into the folder SITE (pip --target), so that several builds (say, kernels
# exported with and without JAX_MOE_PDL) sit side by side: run Python with
# PYTHONPATH=$SITE from a folder other than the checkout (which would shadow it).
#
# memcheck: compute-sanitizer over benchmarks/memcheck_kernels.py (every compiled
# variant on a small EP slice), with XLA's platform allocator so that every buffer
# is its own allocation and an out-of-bounds access cannot land in a neighbour;
# MEMCHECK_FLAGS: more compute-sanitizer flags (e.g. --force-blocking-launches),
# MEMCHECK_ARGS: flags of memcheck_kernels.py (e.g. --filter=split_k=1).
# ncu: Nsight Compute over the two GEMMs of one fused_moe call (NCU_MODEL, NCU_EP, and
# each token count in NCU_TOKENS), clocks left alone; NCU_SECTIONS overrides the sections.
# dsl_memcheck, dsl_ncu: the same two tools over benchmarks/gemm_kernels_dsl.py, which
# compiles the kernels with the CuTe DSL and runs them from torch with JAX kept on the
# CPU (needs the DSL on PYTHONPATH); DSL_MEMCHECK_ARGS / DSL_NCU_ARGS: its flags.
# bench: BENCH_MODELS ("model:ep ..."), BENCH_FLAGS (more bench_moe.py flags).
# tune: python -m jax_moe.tune for DeepSeek-V3 at the EP sizes in TUNE_EP, merged
# into $OUT/tactics.json (started from TUNE_TABLE when given); TUNE_FLAGS.
# evaluate: python -m jax_moe.tune --evaluate on TUNE_TABLE (or $OUT/tactics.json).
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
} 2>&1 | tee -a "$log"

# A tool that dies can leave its target process holding the GPU; clear them after each tool.
reap() { pkill -9 -f "benchmarks/(memcheck_kernels|bench_moe|gemm_kernels_dsl).py" 2>/dev/null; sleep 1; }

if has build; then
  define=()
  [ -n "$KERNEL_DIR" ] && define=(-Ccmake.define.JAX_MOE_KERNEL_DIR="$KERNEL_DIR")
  start=$(date +%s)
  python3 -m pip install -q --no-build-isolation --no-deps -e . "${define[@]}" \
    -Ccmake.define.JAX_MOE_REQUIRE_EXTENSION=ON > "$OUT/build.txt" 2>&1
  echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$log"
  (cd /tmp && python3 -c "import jax_moe._jax_moe_ffi as m; print('extension', m.__file__)") 2>&1 | tee -a "$log"
fi

if has site; then
  : "${SITE:?site needs SITE, the folder to install into}"
  define=()
  [ -n "$KERNEL_DIR" ] && define=(-Ccmake.define.JAX_MOE_KERNEL_DIR="$KERNEL_DIR")
  start=$(date +%s)
  python3 -m pip install -q --no-build-isolation --no-deps --target "$SITE" . "${define[@]}" \
    -Ccmake.define.JAX_MOE_REQUIRE_EXTENSION=ON > "$OUT/site_$(basename "$SITE").txt" 2>&1
  echo "site $SITE from ${KERNEL_DIR:-the DSL} rc=$? in $(( $(date +%s) - start )) s" | tee -a "$log"
  (cd /tmp && PYTHONPATH=$SITE python3 -c "import jax_moe._jax_moe_ffi as m; print('extension', m.__file__)") 2>&1 | tee -a "$log"
fi

if has tests; then
  # TESTS: test files (default: every file with GPU tests).
  timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -rs -p no:cacheprovider --durations=10 \
    ${TESTS:-tests/test_ffi_gpu.py tests/test_moe_gemm_gpu.py tests/test_fused_moe.py tests/test_tune.py tests/test_routing_kernel.py} \
    > "$OUT/tests.txt" 2>&1
  echo "tests rc=$?: $(tail -n 1 "$OUT/tests.txt")" | tee -a "$log"
fi

if has memcheck; then
  start=$(date +%s)
  XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout ${MEMCHECK_TIMEOUT:-300} \
    compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 ${MEMCHECK_FLAGS:-} \
    python3 benchmarks/memcheck_kernels.py ${MEMCHECK_ARGS:-} > "$OUT/memcheck.txt" 2>&1
  rc=$?; reap
  echo "memcheck rc=$rc in $(( $(date +%s) - start )) s: $(grep -E 'ERROR SUMMARY|^done' "$OUT/memcheck.txt" | tr '\n' ' ')" | tee -a "$log"
fi

if has ncu; then
  sections=${NCU_SECTIONS:-SpeedOfLight MemoryWorkloadAnalysis SchedulerStats WarpStateStats Occupancy LaunchStats InstructionStats}
  args=(); for s in $sections; do args+=(--section "$s"); done
  for n in ${NCU_TOKENS:-32 128}; do
    start=$(date +%s)
    timeout ${NCU_TIMEOUT:-150} ncu --clock-control none -k regex:MoeGemm --launch-count 2 "${args[@]}" \
      python3 benchmarks/bench_moe.py --model=${NCU_MODEL:-deepseek_v3} --ep=${NCU_EP:-8} \
      --num_tokens=$n --impls=fused_moe --timer=wall --reps=1 --trials=1 > "$OUT/ncu_n$n.txt" 2>&1
    rc=$?; reap
    echo "ncu n=$n rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$log"
    grep -E "MoeGemm|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Executed Ipc Active|Achieved Occupancy|Registers Per|No Eligible" \
      "$OUT/ncu_n$n.txt" | sed 's/(.*//' | head -40 >> "$log"
  done
fi

if has dsl_memcheck; then
  start=$(date +%s)
  JAX_PLATFORMS=cpu timeout ${MEMCHECK_TIMEOUT:-300} \
    compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 ${MEMCHECK_FLAGS:-} \
    python3 benchmarks/gemm_kernels_dsl.py --out_dir="$OUT/dsl_memcheck" --models=small \
    --tokens=37 --no_timing ${DSL_MEMCHECK_ARGS:-} > "$OUT/dsl_memcheck.txt" 2>&1
  rc=$?; reap
  echo "dsl_memcheck rc=$rc in $(( $(date +%s) - start )) s: $(grep -E 'ERROR SUMMARY|cases=' "$OUT/dsl_memcheck.txt" | tr '\n' ' ')" | tee -a "$log"
fi

if has dsl_ncu; then
  sections=${NCU_SECTIONS:-SpeedOfLight MemoryWorkloadAnalysis SchedulerStats WarpStateStats Occupancy LaunchStats InstructionStats}
  args=(); for s in $sections; do args+=(--section "$s"); done
  start=$(date +%s)
  JAX_PLATFORMS=cpu timeout ${NCU_TIMEOUT:-150} ncu --clock-control none -k regex:MoeGemm "${args[@]}" \
    python3 benchmarks/gemm_kernels_dsl.py --out_dir="$OUT/dsl_ncu" --models=deepseek_v3_ep8 \
    --tokens=${NCU_TOKENS:-32,128} --tactics=default --no_timing ${DSL_NCU_ARGS:-} > "$OUT/dsl_ncu.txt" 2>&1
  rc=$?; reap
  echo "dsl_ncu rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$log"
  grep -E "MoeGemm|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Executed Ipc Active|Achieved Occupancy|Registers Per|No Eligible" \
    "$OUT/dsl_ncu.txt" | sed 's/(.*//' | head -60 >> "$log"
fi

if has example; then
  timeout 60 python3 examples/moe_layer.py --model=qwen3_30b_a3b --num_tokens=256 \
    > "$OUT/example.txt" 2>&1
  echo "example rc=$?: $(grep -E 'PASS|FAIL' "$OUT/example.txt" | tail -n 1)" | tee -a "$log"
fi

if has bench; then
  # BENCH_MODELS: "model:ep" pairs; BENCH_FLAGS: more flags for bench_moe.py.
  for pair in ${BENCH_MODELS:-deepseek_v3:8 qwen3_30b_a3b:1}; do
    model=${pair%%:*}; ep=${pair##*:}
    timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_moe.py --model=$model --ep=$ep \
      ${BENCH_FLAGS:-} > "$OUT/bench_${model}.txt" 2>&1
    echo "bench $model rc=$?" | tee -a "$log"
    tail -n 20 "$OUT/bench_${model}.txt" | tee -a "$log"
  done
fi

if has tune; then
  # TUNE_EP: EP sizes, each optionally with its largest token bucket ("1:2048 8 16").
  [ -n "${TUNE_TABLE:-}" ] && cp "$TUNE_TABLE" "$OUT/tactics.json"
  for spec in ${TUNE_EP:-8}; do
    ep=${spec%%:*}; max=16384; [ "$spec" != "$ep" ] && max=${spec##*:}
    start=$(date +%s)
    timeout ${TUNE_TIMEOUT:-300} python3 -m jax_moe.tune --model=deepseek_v3 --ep=$ep \
      --max_tokens=$max --out="$OUT/tactics.json" --merge ${TUNE_FLAGS:-} \
      > "$OUT/tune_ep${ep}.txt" 2>&1
    echo "tune deepseek_v3 ep=$ep max_tokens=$max rc=$? in $(( $(date +%s) - start )) s" | tee -a "$log"
    tail -n 25 "$OUT/tune_ep${ep}.txt" >> "$log"
  done
fi

if has evaluate; then
  start=$(date +%s)
  timeout ${EVALUATE_TIMEOUT:-540} python3 -m jax_moe.tune --evaluate="${TUNE_TABLE:-$OUT/tactics.json}" \
    ${EVALUATE_FLAGS:-} > "$OUT/evaluate.txt" 2>&1
  echo "evaluate rc=$? in $(( $(date +%s) - start )) s" | tee -a "$log"
  tail -n 40 "$OUT/evaluate.txt" >> "$log"
fi
