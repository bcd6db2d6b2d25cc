#!/usr/bin/env bash
# bench-offload.sh: decode a model several times larger than the host budget, weights streamed
# from the model file, against the disk's limit, the fully resident decode, and a plain mmap of
# the file held to the same memory.
#
# 1. makes (once, with moe-synth) a Mixtral-shaped Q8_0 model: vocab 32000, dim 2048, 16 layers,
#    16 heads / 4 KV heads, 8 experts top-2, expert FFN 5632 (about 5.6 GB, 5.3 GB of experts);
# 2. measures the file system's O_DIRECT sequential read bandwidth with fio on that file;
# 3. decodes N_GEN tokens (greedy, a fixed 16-token prompt) RUNS times each way, dropping the
#    page cache before every run:
#      resident   the whole model read into memory (no budget): the compute-bound time;
#      tiers      --host-mem HOST_MEM, per policy;
#      mmap       --mmap, the page cache as the only cache;
#    the tiers and mmap runs inside a memory cgroup of HOST_MEM + SLACK so both get the same
#    memory (skipped, and said, where no cgroup can be made);
# 4. prints medians: decode tok/s, ms/token, bytes read per token, expert hit rate, prediction
#    precision/recall, read bandwidth while reading as a fraction of fio's, and the time per
#    token against max(resident time, bytes per token / fio bandwidth).
#
# usage: tools/bench-offload.sh [DIR]     (needs root for the page cache and the cgroup)
#   MOE_RUN, MOE_SYNTH  binaries (default build/check/tools/...)
#   HOST_MEM (1G)  SLACK (256M)  N_GEN (24)  RUNS (3)  THREADS (2)  POLICIES ("lru lfu predicted")
#   PREFETCH ("auto on off": the --prefetch modes)  MMAP (1; 0 skips the mmap runs)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/build/bench}
moe_run=${MOE_RUN:-$root/build/check/tools/moe-run}
moe_synth=${MOE_SYNTH:-$root/build/check/tools/moe-synth}
host_mem=${HOST_MEM:-1G}
slack=${SLACK:-256M}
n_gen=${N_GEN:-24}
runs=${RUNS:-3}
threads=${THREADS:-2}
policies=${POLICIES:-lru lfu predicted}
prefetch_modes=${PREFETCH:-auto on off}
with_mmap=${MMAP:-1}

bytes_of() { numfmt --from=iec "$1"; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
jstat() { sed -n "s/.*\"$1\":\([0-9.eE+-]*\).*/\1/p" <<<"$2"; }

mkdir -p "$dir"
model=$dir/mixtral-d2048-l16-e8x5632-q8_0.gguf
if [[ ! -f $model ]]; then
    echo "bench-offload: generating $model ..." >&2
    "$moe_synth" -o "$model" --type q8_0 --vocab 32000 --embd 2048 --layers 16 --heads 16 \
        --kv-heads 4 --experts 8 --experts-used 2 --ff 5632 --seed 11 -t "$threads" >&2
fi
model_bytes=$(stat -c %s "$model")

drop_caches() {
    sync
    if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        [[ -n ${warned_cache:-} ]] || echo "bench-offload: cannot drop the page cache (not root?)" >&2
        warned_cache=1
    fi
}

# fio: O_DIRECT sequential reads of the model file, queue depth 64, 1 MiB blocks, plain and with
# the registered buffers and file the NVMe tier uses; the faster is the disk's limit here
command -v fio >/dev/null || { echo "bench-offload: fio is needed (apt-get install fio)" >&2; exit 1; }
fio_gb() {
    local kib=()
    for ((r = 0; r < runs; r++)); do
        drop_caches
        kib+=("$(fio --name=seq --filename="$model" --readonly --rw=read --direct=1 --bs=1M \
            --iodepth=64 --ioengine=io_uring --size=4G --minimal "$@" | cut -d';' -f7)")
    done
    awk -v k="$(median "${kib[@]}")" 'BEGIN { printf "%.3f", k * 1024 / 1e9 }'
}
fio_plain=$(fio_gb)
fio_fixed=$(fio_gb --fixedbufs --registerfiles)
fio_gbps=$(awk -v a="$fio_plain" -v b="$fio_fixed" 'BEGIN { print (a > b ? a : b) }')

# a memory cgroup (v1 or v2) of HOST_MEM + SLACK for the budgeted runs
limit=$(($(bytes_of "$host_mem") + $(bytes_of "$slack")))
cg=""
if [[ -d /sys/fs/cgroup/memory ]] && mkdir "/sys/fs/cgroup/memory/moerun-bench-$$" 2>/dev/null; then
    cg=/sys/fs/cgroup/memory/moerun-bench-$$
    echo "$limit" >"$cg/memory.limit_in_bytes"
elif [[ -f /sys/fs/cgroup/cgroup.controllers ]] && mkdir "/sys/fs/cgroup/moerun-bench-$$" 2>/dev/null; then
    cg=/sys/fs/cgroup/moerun-bench-$$
    echo "$limit" >"$cg/memory.max"
else
    echo "bench-offload: no memory cgroup: the budgeted runs are not held to $host_mem + $slack" >&2
fi
trap '[[ -n $cg ]] && rmdir "$cg" 2>/dev/null || true' EXIT

prompt=1
for ((i = 1; i < 16; i++)); do prompt+=",$(((i * 7919 + 3) % 32000))"; done

# one run: prints the --json line
one() {
    local in_cg=$1
    shift
    drop_caches
    if [[ $in_cg == 1 && -n $cg ]]; then
        sh -c 'echo $$ >"$0/cgroup.procs" && shift && exec "$@"' "$cg" x "$moe_run" -m "$model" \
            --tokens "$prompt" -n "$n_gen" --temp 0 -t "$threads" --json "$@" 2>/dev/null
    else
        "$moe_run" -m "$model" --tokens "$prompt" -n "$n_gen" --temp 0 -t "$threads" --json \
            "$@" 2>/dev/null
    fi
}

printf 'model %.2f GB (Q8_0), host budget %s (+%s in the cgroup)\n' \
    "$(awk -v b="$model_bytes" 'BEGIN { print b / 1e9 }')" "$host_mem" "$slack"
printf 'fio O_DIRECT sequential read: %.2f GB/s plain, %.2f GB/s with fixed buffers and file\n' \
    "$fio_plain" "$fio_fixed"

res_tps=()
for ((r = 0; r < runs; r++)); do
    res_tps+=("$(jstat gen_tps "$(one 0)")")
done
t_res=$(awk -v t="$(median "${res_tps[@]}")" 'BEGIN { printf "%.2f", 1000 / t }')
printf '%-18s %8s %9s %10s %7s %6s %6s %8s %7s %8s %7s\n' mode tok/s ms/tok MB/tok hit% prec% rec% "read" "of fio" bound "t/bnd"
printf '%-18s %8.2f %9.1f %10s %7s %6s %6s %8s %7s %8s %7s\n' resident "$(median "${res_tps[@]}")" \
    "$t_res" - - - - - - - -

for pol in $policies; do
    for pf in $prefetch_modes; do
        tps=() bpt=() hit=() prec=() rec=() gbps=()
        for ((r = 0; r < runs; r++)); do
            j=$(one 1 --host-mem "$host_mem" --policy "$pol" --prefetch "$pf")
            tps+=("$(jstat gen_tps "$j")")
            bpt+=("$(jstat bytes_per_token "$j")")
            hit+=("$(jstat hit_rate "$j")")
            prec+=("$(jstat prediction_precision "$j")")
            rec+=("$(jstat prediction_recall "$j")")
            gbps+=("$(jstat read_gbps "$j")")
        done
        m_tps=$(median "${tps[@]}") m_bpt=$(median "${bpt[@]}")
        awk -v name="tiers $pol $pf" -v tps="$m_tps" -v bpt="$m_bpt" \
            -v hit="$(median "${hit[@]}")" -v prec="$(median "${prec[@]}")" \
            -v rec="$(median "${rec[@]}")" -v gbps="$(median "${gbps[@]}")" -v fio="$fio_gbps" \
            -v tres="$t_res" 'BEGIN {
                ms = 1000 / tps; io = bpt / (fio * 1e6); bound = io > tres ? io : tres
                printf "%-18s %8.2f %9.1f %10.1f %7.1f %6.1f %6.1f %8.2f %6.0f%% %8.1f %7.2f\n",
                    name, tps, ms, bpt / 1e6, 100 * hit, 100 * prec, 100 * rec, gbps,
                    100 * gbps / fio, bound, ms / bound }'
    done
done

mm_tps=()
for ((r = 0; r < runs * with_mmap; r++)); do
    mm_tps+=("$(jstat gen_tps "$(one 1 --mmap)")")
done
if ((with_mmap)); then
    printf '%-18s %8.2f %9.1f %10s %7s %6s %6s %8s %7s %8s %7s\n' "mmap (same memory)" \
        "$(median "${mm_tps[@]}")" "$(awk -v t="$(median "${mm_tps[@]}")" 'BEGIN { printf "%.1f", (t > 0 ? 1000 / t : 0) }')" \
        - - - - - - - -
fi
echo "(medians of $runs runs; $n_gen tokens decoded after a 16-token prompt; -t $threads; read = bytes / time with reads in flight, GB/s; bound = max(resident ms/token, bytes per token / fio), ms)"
