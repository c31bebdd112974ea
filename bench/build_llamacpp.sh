#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-quantize, llama-perplexity and llama-server from the
# source that llama-cpp-python's sdist carries (PyPI is reachable where a model hub is not),
# into OUT (default /work/llamacpp-bin), for bench/compare_llamacpp.py.
#
#   bash bench/build_llamacpp.sh [OUT]
#
# The CPU backend is built for this machine's instruction sets, spelled out rather than
# -march=native: native turns on AMX where the CPU reports it, and where the kernel or the
# sandbox does not grant AMX state (as on this project's machines) its first tile instruction
# kills llama-bench. Everything else llama.cpp has for the CPU (AVX-512 VNNI/BF16, its
# repacked Q4_0/IQ4_NL/Q4_K paths, llamafile's sgemm) stays on.
set -euo pipefail
OUT=${1:-/work/llamacpp-bin}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
WORK=${WORK_DIR:-/work/llsrc}
mkdir -p "$WORK" "$OUT"
cd "$WORK"
pip install -q scikit-build-core cmake
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  pip download -q --no-deps --no-build-isolation --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d .
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
cd "llama_cpp_python-$VERSION/vendor/llama.cpp"
flags=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
has() { grep -qw "$1" /proc/cpuinfo; }
has avx && flags+=(-DGGML_AVX=ON)
has avx2 && flags+=(-DGGML_AVX2=ON)
has fma && flags+=(-DGGML_FMA=ON)
has f16c && flags+=(-DGGML_F16C=ON)
has bmi2 && flags+=(-DGGML_BMI2=ON)
has avx_vnni && flags+=(-DGGML_AVX_VNNI=ON)
has avx512f && flags+=(-DGGML_AVX512=ON)
has avx512vbmi && flags+=(-DGGML_AVX512_VBMI=ON)
has avx512_vnni && flags+=(-DGGML_AVX512_VNNI=ON)
has avx512_bf16 && flags+=(-DGGML_AVX512_BF16=ON)
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF "${flags[@]}"
cmake --build build -j"$(nproc)" --target llama-bench llama-quantize llama-perplexity llama-server
cp build/bin/* "$OUT"/
echo "llama.cpp tools in $OUT"
