#!/usr/bin/env bash
# Verifies the CUDA backend on a machine with an NVIDIA GPU (sm_80 or newer): the checklist of docs/cuda.md, "What
# remains to verify on a GPU". Builds with CUDA, runs every CUDA parity test (a skipped CUDA test is a failure here:
# the GPU is present), runs the CLI on the CUDA device, and runs the two benchmarks, which print ratios to their
# anchors (not pass/fail). Writes everything to ${OUT:-build/gpu_check}/ as well.
#   KILN_FIXTURES        transformers-written fixtures (default: build/fixtures, generated here when python has torch)
#   KILN_BENCH_WORKSPACE a real workspace for the decode benchmark too (it always runs Llama-7B shapes with synthetic
#                        weights, int4 and fp16)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-build/gpu_check}
mkdir -p "$OUT_DIR"
log() { echo "== $* ($SECONDS s)"; }

log "device"
nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU visible (nvidia-smi failed)" >&2; exit 1; }

log "build with CUDA"
bash scripts/build.sh 2>&1 | tail -n 3
[ -x build/tests/kiln_bench_cuda_int4_gemv ] || { echo "gpu_check: kiln was built without CUDA (is nvcc on PATH?)" >&2; exit 1; }
build/tools/kiln devices | tee "$OUT_DIR/devices.txt"

export KILN_FIXTURES=${KILN_FIXTURES:-$PWD/build/fixtures}
if [ ! -f "$KILN_FIXTURES/index.json" ]; then
  log "fixtures (transformers)"
  python3 scripts/make_fixtures.py --out "$KILN_FIXTURES" --tokenizers build/testdata/tokenizers >"$OUT_DIR/fixtures.log" 2>&1 \
    || echo "gpu_check: could not write fixtures (see $OUT_DIR/fixtures.log); the end-to-end CUDA tests will skip"
fi

log "CUDA parity tests"
build/tests/kiln_unit_tests --gtest_filter='*Cuda*' 2>&1 | tee "$OUT_DIR/cuda_tests.txt" | tail -n 25
if grep -q "no CUDA device" "$OUT_DIR/cuda_tests.txt"; then
  echo "gpu_check: CUDA tests skipped although a GPU is present" >&2; exit 1
fi
grep -q "^\[  PASSED  \]" "$OUT_DIR/cuda_tests.txt" && ! grep -q "^\[  FAILED  \]" "$OUT_DIR/cuda_tests.txt" \
  || { echo "gpu_check: CUDA tests failed" >&2; exit 1; }

log "compute-sanitizer: memcheck over the op tests, racecheck over attention"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$SAN" ]; then
  "$SAN" --tool memcheck --error-exitcode 1 build/tests/kiln_unit_tests --gtest_filter='CudaOps*:CudaMatmul*:CudaAttention*:CudaAwqOps*' \
    >"$OUT_DIR/memcheck.txt" 2>&1 || { tail -n 30 "$OUT_DIR/memcheck.txt"; echo "gpu_check: memcheck failed" >&2; exit 1; }
  "$SAN" --tool racecheck --error-exitcode 1 build/tests/kiln_unit_tests --gtest_filter='CudaAttention.OddHeadDim*' \
    >"$OUT_DIR/racecheck.txt" 2>&1 || { tail -n 30 "$OUT_DIR/racecheck.txt"; echo "gpu_check: racecheck failed" >&2; exit 1; }
  echo "memcheck and racecheck clean"
else
  echo "gpu_check: compute-sanitizer not found; skipped"
fi

log "the CPU unit tests still pass"
build/tests/kiln_unit_tests --gtest_filter='-*Cuda*' 2>&1 | tail -n 3

log "CLI on the CUDA device (greedy tokens equal the CPU's; logits against transformers, measured errors printed)"
python3 -m pytest -q -s -rs tests/python/test_cuda_cli.py -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest_cuda_cli.txt" \
  | grep -E "CUDA vs transformers|passed|failed|SKIPPED|Error"

log "mixture of experts on the CUDA device: logits equal the CPU backend's"
python3 -m pytest -q -rs tests/python/test_arch_moe.py -k cuda -p no:cacheprovider 2>&1 | tail -n 3

log "oracle tests against transformers on the CUDA device (KILN_DEVICE=cuda; informational)"
KILN_DEVICE=cuda python3 -m pytest -q tests/python/test_runtime.py -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest_cuda.txt" | tail -n 15 || true

log "serve on the CUDA device: 64 concurrent greedy streams equal sequential"
KILN_DEVICE=cuda python3 -m pytest -q tests/python/test_serve.py -k concurrent_streams -p no:cacheprovider 2>&1 | tail -n 3

log "benchmark: W4A16 GEMV vs memcpy bandwidth (Llama-7B shapes)"
build/tests/kiln_bench_cuda_int4_gemv | tee "$OUT_DIR/bench_int4_gemv.txt"

log "benchmark: batch-1 decode vs the bandwidth floor (Llama-7B shapes, synthetic weights)"
for src in synthetic:llama7b-int4 synthetic:llama7b-fp16; do
  build/tests/kiln_bench_cuda_decode "$src" 512 128 | tee -a "$OUT_DIR/bench_decode.txt"
done
if [ -n "${KILN_BENCH_WORKSPACE:-}" ]; then
  build/tests/kiln_bench_cuda_decode "$KILN_BENCH_WORKSPACE" 512 128 | tee -a "$OUT_DIR/bench_decode.txt"
fi
log "benchmark: batched throughput at concurrency 64 vs HF transformers generate (1.2B Llama shape, bf16)"
python3 scripts/bench_batched_vs_hf.py --device cuda --concurrency 64 | tee "$OUT_DIR/bench_batched_vs_hf.txt"
log "gpu_check done; results in $OUT_DIR"
