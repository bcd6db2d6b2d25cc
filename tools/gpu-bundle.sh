#!/usr/bin/env bash
# gpu-bundle.sh: build the GPU tests, benchmarks and tools here, for one CUDA architecture, into a
# bundle that runs on a GPU machine without the -dev packages or a network (the binaries, the
# shared libraries they need beyond glibc, the golden cases the GPU tests compare against, and
# bundle/run.sh). Copy or carry build/gpu-bundle/bundle there and run bundle/run.sh.
#
# usage: tools/gpu-bundle.sh            (CUDA_ARCH=90 by default: H100, H200)
#   CUDA_ARCH     the architecture to build for (e.g. 90, 89, 80)
#   GOLDEN_CASES  the golden cases to take (default: the F32, F16 and small quantized ones,
#                 about 45 MB: with the binaries and the repository, what travels to a
#                 lent GPU machine must stay under 64 MiB)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
arch=${CUDA_ARCH:-90}
build=$root/build/gpu-bundle
out=$build/bundle
shared=${MOERUN_SHARED_DIR:-$root/../shared}
cases=${GOLDEN_CASES:-mixtral-f32 mixtral-f16 qwen2moe-f32 olmoe-f32 mixtral-q4_k}
targets=(test_cuda test_cuda_ops test_cuda_backend test_cuda_streams test_forward test_gpu_tiers
         bench_gpu moe-run moe-synth)

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOERUN_CUDA=ON -DMOERUN_WERROR=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" >/dev/null
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/golden"
for t in "${targets[@]}"; do
    f=$(find "$build" -name "$t" -type f -perm -u+x | head -1)
    cp "$f" "$out/bin/"
done
strip --strip-unneeded "$out"/bin/* 2>/dev/null || true
# the shared libraries beyond the C library (liburing, hwloc, cmocka, jemalloc, ...)
for b in "$out"/bin/*; do
    ldd "$b" | awk '/=> \// { print $3 }'
done | sort -u | while read -r lib; do
    case $(basename "$lib") in
    libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux*) ;;
    libstdc++.so.* | libgcc_s.so.*) ;;
    *) cp -L "$lib" "$out/lib/" ;;
    esac
done
if [[ -f $shared/golden/MANIFEST.tsv ]]; then
    head -1 "$shared/golden/MANIFEST.tsv" >"$out/golden/MANIFEST.tsv"
    for c in $cases; do
        grep -P "^$c\t" "$shared/golden/MANIFEST.tsv" >>"$out/golden/MANIFEST.tsv"
        cp "$shared/golden/$c".* "$out/golden/"
    done
else
    echo "gpu-bundle: no $shared/golden: the golden cases will be skipped there" >&2
fi
cp "$root/tools/gpu-run.sh" "$out/run.sh"
cp "$root/tools/bench-gpu.sh" "$out/"
echo "gpu-bundle: $(du -sh "$out" | cut -f1) in $out (sm_$arch); there: bash $out/run.sh all"
