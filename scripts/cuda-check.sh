#!/usr/bin/env bash
# Builds and links the worker with `--features cuda` on a machine without a GPU or a system CUDA.
#
#   scripts/cuda-check.sh            install the toolkit if needed, build, link the NCCL tests
#   CUDA_CHECK_TESTS=0 scripts/...   skip step 4
#   CUDA_CHECK_CLIPPY=1 scripts/...  also run clippy on the CUDA build with -D warnings (it
#                                    re-checks every dependency: ~10 minutes on 2 cores)
#
# What it does, each step skipped when its result is already there:
#  1. Installs the CUDA 13.0 toolkit from NVIDIA's PyPI wheels into a venv under
#     .cuda-toolchain/ (git-ignored; override with HELIOS_CUDA_TOOLCHAIN). The wheels merge into
#     site-packages/nvidia/cu13, a complete toolkit (nvcc, cicc, headers, cudart, cuBLAS, cuRAND,
#     NVRTC); NCCL lands in site-packages/nvidia/nccl. Versions and hashes are pinned below.
#     The series is 13.0 on purpose: the GPU machines run driver 580 (CUDA 13.0), which rejects
#     PTX made by a newer toolkit, and candle embeds its kernels as PTX.
#  2. Builds a link-only folder, .cuda-toolchain/link: unversioned .so links to the wheels'
#     libraries, and a stub libcuda.so (soname libcuda.so.1) exporting every function that the
#     13.0 cuda.h declares. libcuda belongs to the driver, which no wheel ships.
#  3. cargo build -p helios-worker --features cuda --bins, in its own target directory
#     (target/cuda; override with HELIOS_CUDA_TARGET_DIR, not CARGO_TARGET_DIR, which may name
#     the CPU build's) so that the CPU build's artefacts stay as they are. CUDA_COMPUTE_CAP=90 (H100/H200; override it in the environment).
#  4. Builds the worker's lib tests with the same features and runs the NCCL ones that need no
#     GPU (the id round trip) against the stub libcuda. The worker binary does not call the NCCL
#     communicator yet, so the linker drops libnccl from it; the test binary does call it, which
#     proves that it links.
#
# Why link-time libraries at all: candle-core 0.11.1 makes cudarc link libcuda, libnccl, cuBLAS,
# cuRAND and NVRTC at build time ("dynamic-linking"); cudarc rejects run-time loading beside it.
# candle-kernels links libcudart too.
# The binary this builds therefore needs, on the GPU machine, the driver's libcuda.so.1 and the
# runtime libraries (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10,
# libnvrtc.so.13, libnccl.so.2) on the loader's path, e.g. the same wheels with LD_LIBRARY_PATH
# pointing at their lib folders. Only step 4's tests ever load the stub libcuda.
#
# Needs: bash, Python 3 with venv and pip, gcc/g++ (nvcc's host compiler), cargo, and access to
# PyPI and crates.io. x86_64 Linux only (the hashes pin the x86_64 wheels).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TC=${HELIOS_CUDA_TOOLCHAIN:-$ROOT/.cuda-toolchain}
export CARGO_TARGET_DIR=${HELIOS_CUDA_TARGET_DIR:-$ROOT/target/cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

T0=$SECONDS
PHASE_START=$SECONDS
TIMINGS=()
phase_done() { # name
    TIMINGS+=("$(printf '%-10s %5ds' "$1" $((SECONDS - PHASE_START)))")
    PHASE_START=$SECONDS
}
die() {
    echo "cuda check: FAILED: $*" >&2
    exit 1
}
say() { echo "cuda check: $*"; }

# --- prerequisites ---------------------------------------------------------------------------
[[ $(uname -s) == Linux && $(uname -m) == x86_64 ]] ||
    die "needs x86_64 Linux (the pinned wheels are x86_64), this is $(uname -s) $(uname -m)"
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || die "no $PYTHON (Debian: apt-get install python3 python3-venv)"
command -v gcc >/dev/null || die "no gcc (Debian: apt-get install build-essential)"
command -v g++ >/dev/null || die "no g++, nvcc's host compiler (Debian: apt-get install g++)"
command -v cargo >/dev/null || die "no cargo"

# --- 1. the toolkit ----------------------------------------------------------------------------
# The 13.0 series; NCCL 2.30 matches the API that cudarc's "nccl" feature binds.
REQUIREMENTS='
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
nvidia-cuda-nvrtc==13.0.88 --hash=sha256:ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
nvidia-cublas==13.0.2.14 --hash=sha256:0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c
nvidia-curand==10.4.0.35 --hash=sha256:1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc
nvidia-nccl-cu13==2.30.7 --hash=sha256:cefa7fdb9710efd0f39c5f1be1d61ff6fc9a996c451265bd7fbdcf9455ed4b50
'
STAMP=$TC/.installed
WANT=$(printf '%s' "$REQUIREMENTS" | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" && -x $TC/cuda/bin/nvcc ]]; then
    say "toolkit already in ${TC#"$ROOT"/} (delete it to reinstall)"
else
    say "installing the CUDA 13.0 toolkit wheels into ${TC#"$ROOT"/} ..."
    rm -rf "$TC"
    mkdir -p "$TC"
    "$PYTHON" -m venv "$TC/venv" ||
        die "could not make a venv with $PYTHON (Debian: apt-get install python3-venv)"
    printf '%s' "$REQUIREMENTS" >"$TC/requirements.txt"
    # --no-cache-dir: the wheels are ~900 MB and the venv is the cache. Their download and
    # unpacking go in $TC/tmp, not in /tmp, which may be a small tmpfs.
    mkdir -p "$TC/tmp"
    TMPDIR=$TC/tmp "$TC/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
        --no-deps --only-binary=:all: --require-hashes -r "$TC/requirements.txt" ||
        die "pip could not install the toolkit wheels (is PyPI reachable?)"
    SITE=$("$TC/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [[ -x $SITE/nvidia/cu13/bin/nvcc ]] || die "the wheels left no nvcc in $SITE/nvidia/cu13/bin"
    [[ -f $SITE/nvidia/nccl/include/nccl.h ]] || die "the NCCL wheel left no nccl.h"
    # Stable names, relative so that the folder can move.
    ln -sfn "${SITE#"$TC"/}/nvidia/cu13" "$TC/cuda"
    ln -sfn "${SITE#"$TC"/}/nvidia/nccl" "$TC/nccl"
    rm -rf "$TC/tmp"
    echo "$WANT" >"$STAMP"
fi
CUDA=$TC/cuda
NCCL=$TC/nccl
export PATH=$CUDA/bin:$PATH
export CUDA_HOME=$CUDA
unset CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB NVCC
# cudarc reads `nvcc --version` (cuda-version-from-build-system) and must see 13.0.
NVCC_VERSION=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[[ $NVCC_VERSION == 13.0 ]] || die "nvcc reports CUDA '$NVCC_VERSION', expected 13.0"
phase_done install

# --- 2. the link-only folder and the libcuda stub ---------------------------------------------
LINK=$TC/link
if [[ ! -f $LINK/.done ]]; then
    say "making the link folder and the libcuda stub ..."
    rm -rf "$LINK"
    mkdir -p "$LINK"
    # Each library under its unversioned name (what -l asks for) and its soname (what the
    # libraries that need it ask for, resolved through -rpath-link).
    for lib in cuda/lib/lib{cudart.so.13,cublas.so.13,cublasLt.so.13,curand.so.10,nvrtc.so.13} \
        nccl/lib/libnccl.so.2; do
        [[ -f $TC/$lib ]] || die "missing $TC/$lib"
        name=$(basename "$lib")
        ln -s "../$lib" "$LINK/$name"
        ln -s "../$lib" "$LINK/${name%.so.*}.so"
    done
    # The stub: every cu* function that the 13.0 driver API header declares (after macros such
    # as cuMemAlloc -> cuMemAlloc_v2), as a do-nothing function. Only its symbol table matters.
    echo '#include <cuda.h>' | gcc -E -P -I"$CUDA/include" - |
        grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u |
        sed 's/.*/void &(void) {}/' >"$LINK/cuda-stub.c"
    n=$(wc -l <"$LINK/cuda-stub.c")
    ((n > 300)) || die "found only $n driver functions in cuda.h"
    gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so.1" "$LINK/cuda-stub.c" ||
        die "could not build the libcuda stub"
    ln -s libcuda.so.1 "$LINK/libcuda.so"
    touch "$LINK/.done"
    say "libcuda stub: $n functions"
fi
phase_done stub

# --- 3. the build --------------------------------------------------------------------------------
# -L: where cudarc's and candle-kernels' -l flags find the libraries. -rpath-link: where the
# linker finds the libraries those libraries need. Neither ends up in the binary.
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$LINK -C link-arg=-Wl,-rpath-link,$LINK"
# candle-kernels compiles ~30 .cu files with nvcc; by default it uses half the cores.
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
say "cargo build -p helios-worker --features cuda --bins (target ${CARGO_TARGET_DIR#"$ROOT"/}, sm_$CUDA_COMPUTE_CAP) ..."
cargo build -p helios-worker --features cuda --bins ||
    die "cargo build -p helios-worker --features cuda failed (see above)"
BIN=$CARGO_TARGET_DIR/debug/helios-worker
[[ -x $BIN ]] || die "no $BIN after the build"
needed=$(readelf -d "$BIN" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ' || true)
say "built ${BIN#"$ROOT"/}; it needs: ${needed:-?}"
[[ -z $needed || " $needed " == *" libcuda.so.1 "* ]] || die "$BIN does not link libcuda.so.1"
phase_done compile

if [[ ${CUDA_CHECK_TESTS:-1} == 1 ]]; then
    say "cargo test -p helios-worker --features cuda --lib comm::nccl (no GPU) ..."
    # The stub stands in for libcuda at run time; nothing in these tests calls it.
    LD_LIBRARY_PATH=$LINK${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
        cargo test -p helios-worker --features cuda --lib comm::nccl ||
        die "the worker's NCCL lib tests failed to build or run"
    phase_done tests
fi

if [[ ${CUDA_CHECK_CLIPPY:-0} == 1 ]]; then
    say "cargo clippy -p helios-worker --features cuda -- -D warnings ..."
    cargo clippy -p helios-worker --features cuda -- -D warnings || die "clippy found problems"
    phase_done clippy
fi

echo "cuda check: timings"
for t in "${TIMINGS[@]}"; do echo "  $t"; done
printf '  %-10s %5ds\n' total $((SECONDS - T0))
echo "cuda check: OK"
