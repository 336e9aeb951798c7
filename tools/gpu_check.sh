#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (the project's H100/H200 device machine), in
# stages that fit the device's per-call limit: build with CUDA in build-gpu/ (kept between calls
# on a warm machine), run every GPU test (CUDA parity, allocator, NCCL, device communicators,
# the model on the GPU), compute-sanitizer memcheck over the CUDA parity tests, the GPU
# benchmarks and PyTorch references (the MoE layer against PyTorch's, the training step's MFU,
# decode against the roofline and transformers), and the GRPO demo on the GPU. Everything
# it prints goes to $OUT (default ./out/gpu_check) as one file per step; a failing step is
# recorded and the others still run; the exit status is the number of failed steps.
#   OUT=/some/dir [BUDGET_S=540] tools/gpu_check.sh [STAGE...]
# Stages, in this order (none given: all; --quick: build tests):
#   build    nvidia-smi, configure, build          tests    the GPU tests
#   layer    MoE layer vs PyTorch (small, mid)      model    training step (MFU), attention
#                                                           (cuDNN vs kernel), LM head, comm
#   memcheck compute-sanitizer over the parity tests
#   decode   decode tokens/s vs roofline and transformers
#   demo     the GRPO demo on the GPU (50 steps)
# BUDGET_S bounds the whole call: each step gets the time left (it is stopped, and recorded as
# failed, when that runs out) and steps after it are skipped, so the files under $OUT come back
# before the caller's own limit. On a fresh machine with a 600 s limit per call and ~15 min of
# device time in all: `BUDGET_S=540 tools/gpu_check.sh build tests layer` first, then
# `BUDGET_S=540 tools/gpu_check.sh model memcheck decode demo` on the still-warm machine (the
# build is reused; a cold one rebuilds first).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-0}  # 0: no bound
all_stages=(build tests layer model memcheck decode demo)
if [ $# -eq 0 ]; then
  stages=("${all_stages[@]}")
elif [ "$1" = "--quick" ]; then
  stages=(build tests)
else
  stages=("$@")
  for s in "${stages[@]}"; do
    case " ${all_stages[*]} " in
      *" $s "*) ;;
      *) echo "gpu_check: unknown stage '$s' (stages: ${all_stages[*]})" >&2; exit 64 ;;
    esac
  done
fi
failed=0

step() {  # step <name> <command...>: runs it, output in $OUT/<name>.txt, wall time recorded
  local name=$1
  shift
  local t0=$SECONDS bound=()
  if [ "$BUDGET_S" -gt 0 ]; then
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 10 ]; then
      echo "== $name: skipped (the budget of $BUDGET_S s is spent)" | tee -a "$OUT/summary.txt"
      failed=$((failed + 1))
      return
    fi
    bound=(timeout --kill-after=10 "$left")
  fi
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  if "${bound[@]}" "$@" >"$OUT/$name.txt" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
  else
    echo "   FAILED with status $? ($((SECONDS - t0)) s); tail of $name.txt:" | tee -a "$OUT/summary.txt"
    tail -20 "$OUT/$name.txt" | tee -a "$OUT/summary.txt"
    failed=$((failed + 1))
  fi
}

build_stage() {
  step gpu_info nvidia-smi
  step configure cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFOREMOE_CUDA=ON
  step build cmake --build build-gpu -j "$(nproc)"
}

tests_stage() {
  # Every test whose name says CUDA, cuDNN, NCCL, device or GPU (the rest are CPU tests, which
  # CI runs; the cuDNN graph checks run in CI too, and here against the GPU machine's cuDNN
  # with its real driver). --no-tests=error: a filter that matches nothing is a failure.
  step gpu_tests ctest --test-dir build-gpu --output-on-failure --no-tests=error -j 4 \
    -R 'Cuda|Cudnn|Nccl|Device|Gpu|GPU'
}

memcheck_stage() {
  if command -v compute-sanitizer >/dev/null; then
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
      build-gpu/tests/fm_engine_tests --gtest_filter='CudaParity*:CudaBf16*:CudaGemmLt*:CudaStaging*:CudaAllocator*:CudaDeviceRouting*:CudaGroupedWgrad*:CudaCudnn*'
  else
    echo "== memcheck: compute-sanitizer not found" | tee -a "$OUT/summary.txt"
    failed=$((failed + 1))
  fi
}

layer_stage() {
  for preset in small mid; do
    step "moe_layer_torch_$preset" python3 bench/reference/moe_layer_torch.py --preset "$preset" \
      --out "$OUT/moe_layer_torch_$preset.json"
  done
  # foremoe's MoE layer at the same dimensions, with x_torch against the JSON just written.
  step bench_moe_layer build-gpu/bench/bench_moe_layer --torch-dir="$OUT" \
    --benchmark_counters_tabular=true
}

model_stage() {
  step bench_model_gpu build-gpu/bench/bench_model_gpu --benchmark_counters_tabular=true
  step bench_attention_gpu build-gpu/bench/bench_attention_gpu --benchmark_counters_tabular=true
  step bench_lm_head_gpu build-gpu/bench/bench_lm_head --benchmark_counters_tabular=true \
    --benchmark_filter=Cuda
  step bench_comm_gpu build-gpu/bench/bench_comm_gpu --benchmark_counters_tabular=true
}

decode_stage() {
  # foremoe at random weights (small, mid), then transformers' generate and foremoe on the
  # same mid weights (exported outside $OUT: 3 GB that should not come back).
  step bench_generation_gpu build-gpu/bench/bench_generation_gpu --benchmark_counters_tabular=true
  local hf_dir=${TMPDIR:-/tmp}/foremoe_decode_mid_hf
  rm -rf "$hf_dir"
  step decode_hf_mid python3 bench/reference/decode_hf.py --preset mid --export "$hf_dir" \
    --out "$OUT/decode_hf_mid.json"
  step bench_generation_gpu_hf build-gpu/bench/bench_generation_gpu --hf="$hf_dir" \
    --benchmark_counters_tabular=true
  rm -rf "$hf_dir"
}

demo_stage() {
  # make demo's job (4 in-process ranks sharing the GPU): its SFT warm start and 50 RL steps,
  # bounded to 5 minutes; metrics.jsonl comes back.
  local grpo_dir=${TMPDIR:-/tmp}/foremoe_grpo_gpu
  rm -rf "$grpo_dir"
  step grpo_demo_gpu timeout 300 build-gpu/tools/foremoe train --config rl/demo --device cuda \
    --steps 50 --run-dir "$grpo_dir"
  cp "$grpo_dir/metrics.jsonl" "$OUT/grpo_demo_gpu_metrics.jsonl" 2>/dev/null
  rm -rf "$grpo_dir"
}

: >"$OUT/summary.txt"
echo "stages: ${stages[*]}; budget: ${BUDGET_S} s (0: none)" | tee -a "$OUT/summary.txt"
for s in "${all_stages[@]}"; do  # the fixed order, whatever order they were named in
  case " ${stages[*]} " in
    *" $s "*) "${s}_stage" ;;
  esac
done
echo "failed steps: $failed" | tee -a "$OUT/summary.txt"
exit "$failed"
