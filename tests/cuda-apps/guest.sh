#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The CUDA programs of tests/cuda-apps in a real guest on the GPU machine:
# QEMU (TCG) boots the Debian guest kernel with virtio_vgpu.ko; each program,
# built here by nvcc with -cudart shared, runs in the guest through the guest
# CUDA library over /dev/vgpu0 (VGPU_IOC_SUBMIT) -> virtio -> vhost-user ->
# the daemon with the CUDA executor -> the VM's CUDA worker -> the GPU. The
# same binaries run natively on the host first; the outputs are compared.
#
# Run from the folder tests/cuda-apps/guest-pack.sh made (it holds the
# binaries: the GPU machine has no network, apt or cargo):
#
#   cd carry/guest && OUT=$OUT ./guest.sh
#
# Results in $OUT: summary.txt (SAME/DIFF per program) and details.tar.gz
# (NAME.native.out, NAME.guest.out: stdout then rc=N, NAME.guest.err,
# build logs, serial.log, qemu.log, daemon.log).
# Without nvcc (a machine with no CUDA) only cuda-probe runs, against the CPU
# executor: a check of the packing, the boot and the device path.
#
# Environment: OUT, CUDA_HOME (/usr/local/cuda), GUEST_MEM (1G),
# GUEST_TIMEOUT_S (300: the whole guest run; each program
# gets 120 s in it).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE/out}
SRC=${SRC:-$HERE/src}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
GUEST_MEM=${GUEST_MEM:-1G}
GUEST_TIMEOUT_S=${GUEST_TIMEOUT_S:-300}
export PATH=$CUDA_HOME/bin:$PATH
mkdir -p "$OUT"
W=$(mktemp -d)
A=$W/a
R=$W/details
mkdir -p "$R"
DAEMON=
cleanup() {
	[[ -n $DAEMON ]] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
	tar -C "$W" -czf "$OUT/details.tar.gz" details
	rm -rf "$W"
}
trap cleanup EXIT
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
t0=$(date +%s)
stamp() { echo "[guest.sh +$(($(date +%s) - t0))s] $*" >&2; }

mkdir -p "$A"
tar -C "$A" -xJf "$HERE/assets.tar.xz" 2>/dev/null ||
	python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
		"$HERE/assets.tar.xz" "$A" || { say "FAIL unpack"; exit 1; }
stamp "unpacked"

# --- the programs, as run.sh builds them --------------------------------------
mkdir -p "$W/apps" "$W/lib"
ln -s "$A/libvgpucuda.so" "$W/lib/libcudart.so.13"
ln -s "$A/libvgpucuda.so" "$W/lib/libcuda.so.1"
ln -s "$A/libvgpucuda.so" "$W/lib/libcublas.so.13"
: >"$W/apps/list"
if command -v nvcc >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
	EXECUTOR=cuda
	cd "$W/apps" || exit 1
	apps="vadd matmul streams atomics memset devprops launches"
	for p in $apps; do # in parallel: the GPU machine has the cores
		nvcc -cudart shared -arch=sm_90 -I"$SRC" -o $p "$SRC/$p.cu" >"$R/build-$p.log" 2>&1 &
	done
	for p in cublas_sgemm sgemm_bench; do # -lcublas: the library is cuBLAS too
		nvcc -cudart shared -arch=sm_90 -I"$SRC" -o $p "$SRC/$p.cu" -lcublas >"$R/build-$p.log" 2>&1 &
	done
	wait
	apps="$apps cublas_sgemm sgemm_bench"
	for p in $apps; do
		if [[ -x $p ]]; then echo "$p" >>list; else say "BUILD FAILED $p"; fi
	done
	if nvcc -ptx -arch=sm_90 -o saxpy.ptx "$SRC/saxpy.cu" &&
	   nvcc -cubin -arch=sm_90 -o saxpy.cubin "$SRC/saxpy.cu" &&
	   gcc -I"$CUDA_HOME/include" -o driver_api "$SRC/driver_api.c" \
		-L"$CUDA_HOME/lib64/stubs" -lcuda >"$R/build-driver_api.log" 2>&1; then
		echo "driver_api saxpy.ptx saxpy.cubin" >>list
	else
		say "BUILD FAILED driver_api"
	fi
	# Against NVIDIA's runtime and driver, as any program is built.
	gcc -O2 -o cuda-probe "$SRC/cuda-probe.c" -L"$CUDA_HOME/lib64" -L"$CUDA_HOME/lib64/stubs" \
		-Wl,--no-as-needed -lcudart -lcuda >"$R/build-cuda-probe.log" 2>&1 &&
		echo cuda-probe >>list
else
	EXECUTOR=cpu
	cd "$W/apps" || exit 1
	gcc -O2 -o cuda-probe "$SRC/cuda-probe.c" -L"$W/lib" \
		-Wl,--no-as-needed -l:libcudart.so.13 -l:libcuda.so.1 >"$R/build-cuda-probe.log" 2>&1 &&
		echo cuda-probe >>list
fi
stamp "built: $(tr '\n' ' ' <list| sed 's/ saxpy[^ ]*//g')"

# --- native runs ------------------------------------------------------------------
if [[ $EXECUTOR == cuda ]]; then
	while read -r name args; do
		# shellcheck disable=SC2086 # args are words
		timeout 60 ./$name $args </dev/null >"$R/$name.native.out" 2>"$R/$name.native.err"
		echo "rc=$?" >>"$R/$name.native.out"
	done <list
	stamp "native runs done"
fi

# --- initramfs: busybox, modules, the library, the programs and their libraries --
files=(/init="$HERE/guest-init.sh" /apps/list="$W/apps/list"
	/opt/vgpu/libvgpucuda.so="$A/libvgpucuda.so"
	/opt/vgpu/libcudart.so.13=@libvgpucuda.so /opt/vgpu/libcuda.so.1=@libvgpucuda.so
	/opt/vgpu/libcublas.so.13=@libvgpucuda.so)
while read -r name args; do
	files+=("/apps/$name=$W/apps/$name")
	for a in $args; do files+=("/apps/$a=$W/apps/$a"); done
done <list
"$HERE/e2e/mkinitramfs.sh" "$W/initrd.gz" "$A/busybox" "$A/modules" \
	"$A/virtio_vgpu.ko" "$A/vgpu-client" "${files[@]}" || { say "FAIL initramfs"; exit 1; }
stamp "initramfs $(du -h "$W/initrd.gz" | cut -f1)"

# --- the daemon and the guest ---------------------------------------------------
SOCK=$W/vm1.sock
VGPU_CUDA_WORKER=$A/vgpu-cuda-worker RUST_LOG=info "$A/vgpu-vhost-user" --executor "$EXECUTOR" \
	--vm "id=1,pool=A,priority=high,socket=$SOCK" >"$R/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 200); do [[ -S $SOCK ]] && break; sleep 0.1; done
[[ -S $SOCK ]] || { say "FAIL daemon: no socket"; tail "$R/daemon.log"; exit 1; }

ACCEL=(-accel tcg,thread=multi -cpu max)
grep -Eqw 'vmx|svm' /proc/cpuinfo && [[ -w /dev/kvm ]] && ACCEL=(-accel kvm -cpu host)
stamp "booting the guest (${ACCEL[*]}, $GUEST_MEM, executor $EXECUTOR)"
LD_LIBRARY_PATH=$A/qemu-lib timeout "$GUEST_TIMEOUT_S" "$A/qemu-system-x86_64" \
	"${ACCEL[@]}" -m "$GUEST_MEM" -smp 2 \
	-object "memory-backend-memfd,id=mem,size=$GUEST_MEM,share=on" \
	-machine q35,memory-backend=mem \
	-chardev "socket,id=vgpu0,path=$SOCK" -device vhost-user-vgpu-pci,id=vgpu0,chardev=vgpu0 \
	-nic none -display none -vga none -monitor none -no-reboot \
	-serial "file:$R/serial.log" -L "$A/firmware" \
	-kernel "$A/vmlinuz" -initrd "$W/initrd.gz" \
	-append "console=ttyS0 panic=-1 quiet" >"$R/qemu.log" 2>&1
qrc=$?
stamp "guest exited (rc $qrc)"
((qrc == 0)) || tail -5 "$R/qemu.log" | tee -a "$OUT/summary.txt"
tr -d '\r' <"$R/serial.log" >"$W/serial"
grep -q '^ALL-DONE' "$W/serial" || say "FAIL guest did not finish (qemu rc=$qrc; see serial.log, qemu.log)"
grep -E '^(GUEST|INFO|STATS|KMSG|INSMOD-FAIL)' "$W/serial" | tee -a "$OUT/summary.txt"

# --- compare --------------------------------------------------------------------
while read -r name _; do
	sed -n "s/^OUT $name //p" "$W/serial" >"$R/$name.guest.out"
	sed -n "s/^ERR $name //p" "$W/serial" >"$R/$name.guest.err"
	if [[ $EXECUTOR == cpu ]]; then
		say "GUEST $name: $(tr '\n' ' ' <"$R/$name.guest.out")"
	elif [[ -s $R/$name.guest.out ]] && diff "$R/$name.native.out" "$R/$name.guest.out" >"$R/$name.diff"; then
		say "SAME $name: $(head -c 300 "$R/$name.guest.out" | tr '\n' ' ')"
	else
		say "DIFF $name"
		head -20 "$R/$name.diff" | tee -a "$OUT/summary.txt"
		head -5 "$R/$name.guest.err" | tee -a "$OUT/summary.txt"
	fi
done <"$W/apps/list"
grep -H TIME "$R"/launches.*.err "$R"/sgemm_bench.*.err 2>/dev/null | sed "s|^$R/||" | tee -a "$OUT/summary.txt"
grep -iE ' (error|warn)' "$R/daemon.log" | tail -10 | tee -a "$OUT/summary.txt"
stamp "done"
