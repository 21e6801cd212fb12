#!/bin/sh
# Installs the guest CUDA library into DIR (default /usr/local/lib/vgpu):
# one file, reached as libcuda.so.1, libcudart.so.13 and libcublas.so.13
# through symlinks, so that the dynamic loader maps it once and the three
# API faces share one state.
# Then run programs with LD_LIBRARY_PATH=DIR (or add DIR to ld.so.conf).
set -e
LIB=${1:?usage: install.sh path/to/libvgpucuda.so [DIR]}
DIR=${2:-/usr/local/lib/vgpu}
mkdir -p "$DIR"
cp "$LIB" "$DIR/libvgpucuda.so"
ln -sf libvgpucuda.so "$DIR/libcuda.so.1"
ln -sf libvgpucuda.so "$DIR/libcudart.so.13"
ln -sf libvgpucuda.so "$DIR/libcublas.so.13"
echo "installed in $DIR"
