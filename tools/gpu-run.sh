#!/usr/bin/env bash
# run.sh (a bundle made by tools/gpu-bundle.sh): the GPU checks on the machine that has the GPU.
#
# usage: bash run.sh test|sanitize|bench|model-bench|all
#   test         the gpu-labelled tests: each kernel and op against float64 and the CPU, the
#                golden cases on the GPU, the three-tier invariant and failed uploads on the GPU
#   sanitize     compute-sanitizer memcheck and racecheck over the CUDA backend tests, the
#                forward pass and the three tiers on the GPU
#   bench        bench_gpu: pinned host->GPU bandwidth, GPU memory bandwidth, matvec per type
#   model-bench  bench-gpu.sh on a generated Mixtral-8x7B-shaped Q4_K model (~26 GB of disk)
# Logs go to $OUT (or ./out) as well as to the terminal.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
export LD_LIBRARY_PATH=$here/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export MOERUN_SHARED_DIR=$here
export CMOCKA_MESSAGE_OUTPUT=stdout
bin=$here/bin
status=0

run_test() { # name, env...
    local name=$1
    shift
    echo "== $name $*"
    env "$@" "$bin/${name%%:*}" >"$out/${name//:/-}.log" 2>&1
    local rc=$?
    tail -25 "$out/${name//:/-}.log"
    echo "== $name: exit $rc$([[ $rc == 77 ]] && echo ' (skipped: no device)')"
    [[ $rc == 0 ]] || status=1
}

do_test() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    run_test test_cuda
    run_test test_cuda_ops
    run_test test_cuda_backend
    run_test test_cuda_streams
    run_test test_forward:cuda MOERUN_TEST_DEVICE=cuda
    run_test test_gpu_tiers:cuda MOERUN_TEST_DEVICE=cuda
}

do_sanitize() {
    command -v compute-sanitizer >/dev/null || PATH=$PATH:/usr/local/cuda/bin
    for tool in memcheck racecheck; do
        for t in test_cuda_backend test_cuda_streams test_forward test_gpu_tiers; do
            echo "== compute-sanitizer --tool $tool $t"
            MOERUN_TEST_DEVICE=cuda compute-sanitizer --tool "$tool" --error-exitcode 9 \
                "$bin/$t" >"$out/san-$tool-$t.log" 2>&1
            local rc=$?
            grep -E "ERROR SUMMARY|RACECHECK SUMMARY|========= (Invalid|Race|Error)" \
                "$out/san-$tool-$t.log" | head -20
            echo "== $tool $t: exit $rc"
            [[ $rc == 0 ]] || status=1
        done
    done
}

do_bench() {
    "$bin/bench_gpu" --reps 9 2>&1 | tee "$out/bench_gpu.log"
}

do_model_bench() {
    mkdir -p "$here/fake-build/tools" "$here/fake-build/tests"
    ln -sf "$bin/moe-run" "$bin/moe-synth" "$here/fake-build/tools/"
    ln -sf "$bin/bench_gpu" "$here/fake-build/tests/"
    BUILD=$here/fake-build THREADS=${THREADS:-16} bash "$here/bench-gpu.sh" "${MODEL_DIR:-/tmp/moerun-bench}" \
        2>&1 | tee "$out/bench-model.log"
}

case ${1:-all} in
test) do_test ;;
sanitize) do_sanitize ;;
bench) do_bench ;;
model-bench) do_model_bench ;;
all) do_test; do_sanitize; do_bench ;;
*) echo "usage: run.sh test|sanitize|bench|model-bench|all" >&2; exit 2 ;;
esac
exit $status
