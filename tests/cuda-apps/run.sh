#!/bin/bash
# GPU check of the guest CUDA library (issue 10). Run from the repository
# root on the GPU machine, with the built binaries in carry/:
#   carry/vgpu-vhost-user carry/vgpu-cuda-worker carry/libvgpucuda.so
# Compiles every program here with nvcc, runs each natively and through the
# library over the user-space vhost-user transport (VGPU_SOCKET) against the
# daemon with the CUDA executor, and compares their standard output.
# Results go to $OUT (default ./cuda-apps-out).
set -u
ROOT=$(pwd)
SRC=${SRC:-$ROOT/tests/cuda-apps}
OUT=${OUT:-$ROOT/cuda-apps-out}
CARRY=${CARRY:-$ROOT/carry}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH=$CUDA_HOME/bin:$PATH
W=$(mktemp -d)
mkdir -p "$OUT" "$W/lib" "$W/bin"
cp "$CARRY/libvgpucuda.so" "$W/lib/"
ln -s libvgpucuda.so "$W/lib/libcuda.so.1"
ln -s libvgpucuda.so "$W/lib/libcudart.so.13"
ln -s libvgpucuda.so "$W/lib/libcublas.so.13"

RUNTIME_APPS="vadd matmul streams atomics memset devprops launches"
CUBLAS_APPS="cublas_sgemm sgemm_bench"   # linked with -lcublas
cd "$W/bin"
for p in $RUNTIME_APPS; do
    nvcc -cudart shared -arch=sm_90 -I"$SRC" -o $p "$SRC/$p.cu" >"$OUT/build-$p.log" 2>&1 || echo "BUILD FAILED $p" | tee -a "$OUT/summary.txt"
done
nvcc -ptx -arch=sm_90 -o saxpy.ptx "$SRC/saxpy.cu" && nvcc -cubin -arch=sm_90 -o saxpy.cubin "$SRC/saxpy.cu"
for p in $CUBLAS_APPS; do
    nvcc -cudart shared -arch=sm_90 -I"$SRC" -o $p "$SRC/$p.cu" -lcublas >"$OUT/build-$p.log" 2>&1 || echo "BUILD FAILED $p" | tee -a "$OUT/summary.txt"
done
gcc -I"$CUDA_HOME/include" -o driver_api "$SRC/driver_api.c" -L"$CUDA_HOME/lib64/stubs" -lcuda >"$OUT/build-driver_api.log" 2>&1 || echo "BUILD FAILED driver_api" | tee -a "$OUT/summary.txt"
readelf --dyn-syms -W vadd | grep UND > "$OUT/vadd-symbols.txt"
# What a -lcublas program asks of libcublas.so.13 (symbol versions), and
# what NVIDIA's library defines.
{ readelf -V -W cublas_sgemm; readelf --dyn-syms -W cublas_sgemm | grep UND; } > "$OUT/cublas_sgemm-symbols.txt" 2>&1
CUBLAS_REAL=$(ls "$CUDA_HOME"/lib64/libcublas.so.13* 2>/dev/null | head -1)
{ echo "$CUBLAS_REAL"; readelf -V -W "$CUBLAS_REAL" | grep -A6 "Version definition"; objdump -T "$CUBLAS_REAL" | grep -E " cublas(Sgemm_v2|GemmEx|Create_v2)$"; } > "$OUT/libcublas-versions.txt" 2>&1

SOCK=$W/vm1.sock
VGPU_CUDA_WORKER=$CARRY/vgpu-cuda-worker RUST_LOG=info "$CARRY/vgpu-vhost-user" --executor cuda \
    --vm id=1,pool=A,priority=high,socket=$SOCK >"$OUT/daemon.log" 2>&1 &
DAEMON=$!
for i in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done

run_both() {  # name, command...
    local name=$1; shift
    (timeout 60 "$@" >"$OUT/$name.native.out" 2>"$OUT/$name.native.err"; echo "rc=$?" >>"$OUT/$name.native.out")
    (VGPU_SOCKET=$SOCK LD_LIBRARY_PATH=$W/lib timeout 120 "$@" >"$OUT/$name.vgpu.out" 2>"$OUT/$name.vgpu.err"; echo "rc=$?" >>"$OUT/$name.vgpu.out")
    if diff "$OUT/$name.native.out" "$OUT/$name.vgpu.out" >"$OUT/$name.diff"; then
        echo "SAME $name: $(head -c 300 "$OUT/$name.vgpu.out" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
    else
        echo "DIFF $name" | tee -a "$OUT/summary.txt"; cat "$OUT/$name.diff" | head -20
    fi
}
for p in $RUNTIME_APPS $CUBLAS_APPS; do [ -x "$p" ] && run_both $p ./$p; done
[ -x driver_api ] && run_both driver_api ./driver_api saxpy.ptx saxpy.cubin
for b in launches sgemm_bench; do
    for side in native vgpu; do
        echo "$side: $(grep -h TIME "$OUT/$b.$side.err")" | tee -a "$OUT/summary.txt"
    done
done
kill $DAEMON; wait $DAEMON 2>/dev/null
tail -20 "$OUT/daemon.log"
rm -rf "$W"
