#!/usr/bin/env bash
# bench-run.sh: prompt and decode speed of moe-run on a Mixtral-shaped synthetic model.
#
# Makes (once, with moe-synth) a model of vocab 32000, dim 1024, 8 layers, 16 heads / 4 KV heads,
# 8 experts top-2, expert FFN 2816 in F16, Q8_0 and Q4_K, cached in DIR (default build/bench),
# then for each type runs moe-run at -t 2 (greedy, a fixed prompt of 64 ids via --tokens,
# 32 tokens generated) three times and prints the median prompt and decode tokens/s from the
# --json stats, next to llama.cpp's figures for the same shape on this machine type.
#
# usage: tools/bench-run.sh [DIR]
#   MOE_RUN, MOE_SYNTH   the binaries (default: build/tools/moe-run, build/tools/moe-synth)
#   THREADS              threads (default 2), RUNS (default 3)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/build/bench}
moe_run=${MOE_RUN:-$root/build/tools/moe-run}
moe_synth=${MOE_SYNTH:-$root/build/tools/moe-synth}
threads=${THREADS:-2}
runs=${RUNS:-3}
n_prompt=64
n_gen=32

for b in "$moe_run" "$moe_synth"; do
    if [[ ! -x $b ]]; then
        echo "bench-run: $b not found: build first (cmake --build build), or set MOE_RUN/MOE_SYNTH" >&2
        exit 1
    fi
done
mkdir -p "$dir"

# a fixed prompt: BOS then 63 ids spread over the vocabulary
prompt=1
for ((i = 1; i < n_prompt; i++)); do
    prompt+=",$(((i * 7919 + 3) % 32000))"
done

# the median of the arguments
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

# a number from the --json stats object
stat() {
    sed -n "s/.*\"$1\":\([0-9.eE+-]*\).*/\1/p" <<<"$2"
}

# llama.cpp on this machine type, same shape, 2 threads (tok/s): decode Q8_0 ~150, F16 ~92;
# prompt ~400
ref_decode() {
    case $1 in
    f16) echo "~92" ;;
    q8_0) echo "~150" ;;
    *) echo - ;;
    esac
}
ref_prompt=400

printf '%-6s %10s %12s %12s %12s %12s\n' type size "prompt t/s" "llama.cpp" "decode t/s" "llama.cpp"
for type in f16 q8_0 q4_k; do
    model=$dir/mixtral-v32000-d1024-l8-e8x2816-$type.gguf
    if [[ ! -f $model ]]; then
        echo "bench-run: generating $model ..." >&2
        "$moe_synth" -o "$model" --type "$type" --vocab 32000 --embd 1024 --layers 8 \
            --heads 16 --kv-heads 4 --experts 8 --experts-used 2 --ff 2816 --ctx 4096 \
            --seed 7 -t "$threads" >&2
    fi
    pp=()
    tg=()
    for ((r = 0; r < runs; r++)); do
        out=$("$moe_run" -m "$model" --tokens "$prompt" -n "$n_gen" --temp 0 -t "$threads" \
            -c 512 --json 2>/dev/null)
        pp+=("$(stat prompt_tps "$out")")
        tg+=("$(stat gen_tps "$out")")
        n=$(stat gen_tokens "$out")
        if [[ $n != "$n_gen" ]]; then
            echo "bench-run: $type: generated $n tokens, not $n_gen (an end-of-generation token)" >&2
        fi
    done
    size=$(du -m "$model" | cut -f1)
    printf '%-6s %7s MiB %12.1f %12s %12.1f %12s\n' "$type" "$size" "$(median "${pp[@]}")" \
        "~$ref_prompt" "$(median "${tg[@]}")" "$(ref_decode "$type")"
done
echo "(-t $threads, prompt $n_prompt tokens, decode $n_gen tokens, median of $runs runs;" \
    "llama.cpp: same shape, 2 threads, this machine type)"
