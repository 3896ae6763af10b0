#!/usr/bin/env bash
# Build abf with candle's CUDA backend on a machine without a GPU (see docs/cuda.md).
#
# Installs the CUDA 13.0 compiler, headers and libraries from PyPI wheels (never newer: nvcc 13.1+
# writes PTX that the GPU machines' driver 580 cannot load), lays them out as a CUDA_HOME, links
# against a stub libcuda (the real one comes from the driver on the GPU machine), and builds the
# release binaries into target-cuda/ for sm_90 (H100/H200).
#
# Usage: scripts/build-cuda.sh [extra cargo args]      (env: CUDA_COMPUTE_CAP, default 90)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
wheels=$root/.cache/cuda-wheels
home=$root/.cache/cuda-home

if [ ! -x "$wheels/nvidia/cu13/bin/nvcc" ]; then
  echo "build-cuda: installing CUDA 13.0 wheels into $wheels"
  python3 -m pip install --quiet --no-deps --target "$wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
    nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
fi
cu=$wheels/nvidia/cu13

# A CUDA_HOME: bin/include/nvvm from the wheels, a real lib64/ of unversioned symlinks + stub libcuda.
mkdir -p "$home/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$cu/$d" "$home/$d"; done
for lib in "$cu"/lib/lib*.so.*; do
  base=$(basename "$lib")
  ln -sfn "$lib" "$home/lib64/$base"
  ln -sfn "$lib" "$home/lib64/${base%%.so.*}.so"
done

if [ ! -f "$home/lib64/stubs/libcuda.so" ]; then
  # Stub driver: every cu* entry point cudarc's bindings declare, so the link succeeds; at run time
  # the driver's real libcuda.so.1 is loaded instead (same soname).
  cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -n 1)
  grep -oh 'pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc_src/src/driver/sys/mod.rs" \
    | awk '{print $4}' | sort -u \
    | awk '{printf "int %s(void) { return 999; }\n", $1}' > "$home/lib64/stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib64/stubs/libcuda.so" "$home/lib64/stubs/cuda_stub.c"
  ln -sfn stubs/libcuda.so "$home/lib64/libcuda.so"
fi

export CUDA_HOME=$home CUDA_PATH=$home
export PATH=$home/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$home/lib64:$home/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L $home/lib64 -L $home/lib64/stubs"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-cuda}
nvcc --version | tail -n 2
cargo build --release --features cuda --bins --example step_bench "$@"
# What a GPU machine needs, small enough to carry (a run carries at most 64 MiB; the binaries are
# ~55 MB each, mostly embedded kernels, and compress 7x).
bundle=$CARGO_TARGET_DIR/gpu-bundle.tar.xz
tar -C "$CARGO_TARGET_DIR/release" -cJf "$bundle.tmp" abf-tune examples/step_bench && mv "$bundle.tmp" "$bundle"
echo "build-cuda: $(du -h "$bundle" | cut -f1) bundle for scripts/gpu-check.sh: $bundle"
echo "build-cuda: binaries in $CARGO_TARGET_DIR/release (and examples/step_bench); on the GPU machine scripts/gpu-check.sh sets LD_LIBRARY_PATH to the torch wheels' nvidia/cu13/lib"
