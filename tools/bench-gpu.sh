#!/usr/bin/env bash
# bench-gpu.sh: the GPU path on a Mixtral-8x7B-shaped model (dim 4096, 32 layers, 32 heads /
# 8 KV heads, 8 experts top-2, expert FFN 14336, vocab 32000, Q4_K: about 26 GB).
#
# 1. bench_gpu: pinned host -> GPU copy bandwidth, GPU memory bandwidth, matvec per type.
# 2. moe-run with the whole model on the GPU (--gpu-mem 0 = free memory less 1 GiB, when the
#    model fits): decode tok/s against the bound bytes read per token / GPU memory bandwidth.
# 3. moe-run with --gpu-mem = a third of the model (and the pinned host tier holding the rest):
#    decode tok/s, bytes copied per token, hit rate, achieved copy bandwidth against the pinned
#    bandwidth, and time per token against max(compute time, copy time).
# Medians of RUNS runs. Generates the model once into DIR (needs ~27 GB of disk).
#
# usage: tools/bench-gpu.sh [DIR]
#   BUILD (default build), RUNS (default 3), N_GEN (default 32), THREADS (default 8),
#   POLICIES (default "lru lfu predicted"), PREFETCH (default "auto on off": --prefetch modes),
#   GPU_MEM (default: a third of the model's bytes)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/build/bench}
build=${BUILD:-$root/build}
runs=${RUNS:-3}
n_gen=${N_GEN:-32}
threads=${THREADS:-8}
policies=${POLICIES:-lru lfu predicted}
moe_run=$build/tools/moe-run
moe_synth=$build/tools/moe-synth
bench_gpu=$build/tests/bench_gpu
for b in "$moe_run" "$moe_synth" "$bench_gpu"; do
    [[ -x $b ]] || { echo "bench-gpu: $b not found: build first (CUDA on)" >&2; exit 1; }
done
mkdir -p "$dir"
model=$dir/mixtral-8x7b-shape-q4_k.gguf
if [[ ! -f $model ]]; then
    echo "bench-gpu: generating $model (about 26 GB) ..." >&2
    "$moe_synth" -o "$model" --type q4_k --vocab 32000 --embd 4096 --layers 32 --heads 32 \
        --kv-heads 8 --experts 8 --experts-used 2 --ff 14336 --seed 8 -t "$threads" >&2
fi

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# a number from moe-run's --json line
jstat() { sed -n "s/.*\"$1\":\([-0-9.e+]*\).*/\1/p" <<<"$2"; }

echo "== links ==" >&2
links=$("$bench_gpu" --type Q4_K --reps 7)
echo "$links"
pinned=$(sed -n 's/.*pinned \([0-9.]*\) GB\/s.*/\1/p' <<<"$links")
dev_copy=$(sed -n 's/^device memory: copy \([0-9.]*\) GB\/s.*/\1/p' <<<"$links")
dev_read=$(awk -v c="$dev_copy" 'BEGIN { print c / 2 }')

# bytes a token reads: everything but the experts, plus k/E of them (from --info)
info=$("$moe_run" -m "$model" --info)
tensor_mib=$(sed -n 's/^tensors .*, \([0-9.]*\) MiB$/\1/p' <<<"$info")
expert_mib=$(sed -n 's/^expert bytes *\([0-9.]*\) MiB.*/\1/p' <<<"$info")
model_bytes=$(stat -c %s "$model")
active=$(awk -v t="$tensor_mib" -v e="$expert_mib" 'BEGIN { printf "%.0f", (t - e + e * 2 / 8) * 1048576 }')
gpu_mem=${GPU_MEM:-$((model_bytes / 3))}
prompt=1
for ((i = 1; i < 16; i++)); do prompt+=",$(((i * 7919 + 3) % 32000))"; done
one() { "$moe_run" -m "$model" --tokens "$prompt" -n "$n_gen" --temp 0 -t "$threads" --json "$@" 2>/dev/null; }

printf 'model %.2f GB, %.2f GB read per token; pinned host->GPU %.1f GB/s, GPU read %.0f GB/s\n' \
    "$(awk -v b="$model_bytes" 'BEGIN { print b / 1e9 }')" "$(awk -v b="$active" 'BEGIN { print b / 1e9 }')" \
    "$pinned" "$dev_read"

tps=()
for ((r = 0; r < runs; r++)); do tps+=("$(jstat gen_tps "$(one --gpu-mem 0)")"); done
t_res=$(median "${tps[@]}")
awk -v tps="$t_res" -v a="$active" -v bw="$dev_read" 'BEGIN {
    bound = bw * 1e9 / a
    printf "resident on the GPU: %.1f tok/s, bound %.1f tok/s (bytes/token / GPU read bandwidth): %.0f%%\n",
        tps, bound, 100 * tps / bound }'

printf '%-16s %7s %8s %9s %6s %9s %7s %8s %8s %6s\n' "--gpu-mem $((gpu_mem >> 20))M" tok/s ms/tok \
    "copy MB/t" hit% "copy GB/s" "of pin" "compute" "copy ms" t/max
for pol in $policies; do
    for pf in ${PREFETCH:-auto on off}; do
        t=() cpt=() hit=() gbps=()
        for ((r = 0; r < runs; r++)); do
            j=$(one --gpu-mem "$gpu_mem" --policy "$pol" --prefetch "$pf")
            t+=("$(jstat gen_tps "$j")")
            cpt+=("$(jstat copy_bytes_per_token "$j")")
            hit+=("$(jstat hit_rate "$j")")
            gbps+=("$(jstat copy_gbps "$j")")
        done
        awk -v name="$pol $pf" -v tps="$(median "${t[@]}")" -v cpt="$(median "${cpt[@]}")" \
            -v hit="$(median "${hit[@]}")" -v g="$(median "${gbps[@]}")" -v pin="$pinned" \
            -v tres="$t_res" 'BEGIN {
                ms = 1000 / tps; comp = 1000 / tres; copy = cpt / (pin * 1e6)
                mx = comp > copy ? comp : copy
                printf "%-16s %7.2f %8.1f %9.1f %6.1f %9.2f %6.0f%% %8.1f %8.1f %6.2f\n",
                    name, tps, ms, cpt / 1e6, 100 * hit, g, 100 * g / pin, comp, copy, ms / mx }'
    done
done
