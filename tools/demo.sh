#!/usr/bin/env bash
# First command of the README: install what is missing, build, and run moe-run on the demo
# model (generated on first use). Extra arguments go to moe-run.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/deps.sh
moerun_deps
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DMOERUN_TESTS=OFF >/dev/null
cmake --build build/release -j"$(nproc)" --target moe-run moe-synth
exec build/release/tools/moe-run "$@"
