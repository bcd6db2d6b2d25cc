#!/usr/bin/env bash
# Second command of the README, and exactly what CI runs: install what is missing, then
#  1. build everything with warnings as errors (the CUDA backend too where nvcc is found) and
#     run the test suite;
#  2. build with ASan+UBSan and run the suite again;
#  3. check the formatting with clang-format;
#  4. fuzz the GGUF reader for a fixed time (libFuzzer, clang).
# Tests that need ../shared/golden skip when it is absent; GPU tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/deps.sh
moerun_deps clang clang-format libclang-rt-14-dev
jobs=$(nproc)
fuzz_seconds=${MOERUN_FUZZ_SECONDS:-60}

step() { printf '\n=== %s\n' "$*"; }

step "build (warnings as errors) and test"
cmake -S . -B build/check -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOERUN_WERROR=ON >/dev/null
cmake --build build/check -j"$jobs"
ctest --test-dir build/check --output-on-failure -j"$jobs"

step "build with ASan+UBSan and test"
cmake -S . -B build/check-asan -DCMAKE_BUILD_TYPE=Debug -DMOERUN_WERROR=ON \
    -DMOERUN_SANITIZE=address -DMOERUN_CUDA=OFF >/dev/null
cmake --build build/check-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build/check-asan --output-on-failure -j"$jobs"

step "clang-format"
git ls-files -z '*.c' '*.h' '*.cu' '*.cuh' | xargs -0 clang-format --dry-run -Werror
echo "clang-format: clean"

step "fuzz the GGUF reader for ${fuzz_seconds}s"
CC=clang cmake -S . -B build/check-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOERUN_FUZZ=ON \
    -DMOERUN_SANITIZE=address -DMOERUN_CUDA=OFF -DMOERUN_JEMALLOC=OFF >/dev/null
cmake --build build/check-fuzz -j"$jobs" --target fuzz_gguf fuzz_model test_gguf moe-synth
corpus=build/check-fuzz/corpus
rm -rf "$corpus" && mkdir -p "$corpus"
build/check-fuzz/tests/test_gguf --write-corpus "$corpus"
build/check-fuzz/tests/fuzz_gguf -max_total_time="$fuzz_seconds" -rss_limit_mb=2048 \
    -malloc_limit_mb=512 -timeout=30 -artifact_prefix=build/check-fuzz/ -print_final_stats=1 \
    "$corpus" 2>&1 | tail -n 15
echo "fuzz: the GGUF reader: no crash in ${fuzz_seconds}s"

step "fuzz whole model files for ${fuzz_seconds}s"
# -timeout: an input that runs 30 s (a hang) fails the run and is saved under build/check-fuzz/
models=build/check-fuzz/corpus-models
rm -rf "$models" && mkdir -p "$models"
for arch in mixtral qwen2moe qwen3moe olmoe; do
    build/check-fuzz/tools/moe-synth -o "$models/$arch.gguf" --arch "$arch" --type f32 \
        --vocab 259 --embd 8 --ff 8 --layers 1 --heads 2 --kv-heads 1 --experts 2 >/dev/null
done
build/check-fuzz/tests/fuzz_model -max_total_time="$fuzz_seconds" -rss_limit_mb=2048 \
    -malloc_limit_mb=512 -timeout=30 -artifact_prefix=build/check-fuzz/ -print_final_stats=1 \
    "$models" 2>&1 | tail -n 15
echo "fuzz: whole model files: no crash in ${fuzz_seconds}s"
