#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the external CPU anchor of bench/serve.py, arm "llama.cpp") into a cache folder,
# never into the repository. The source is the llama.cpp that the llama-cpp-python sdist vendors (PyPI reaches this
# machine, GitHub may not). About 12 minutes on 2 cores; run it once.
#
#   bench/build_llama_server.sh                  # -> ~/.cache/cai/llama.cpp/bin/llama-server
#   CAI_LLAMA_CPP=/somewhere bench/build_llama_server.sh
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 bench/build_llama_server.sh   # the sdist version (default: the pinned one)
#
# bench/serve.py finds the binary at $CAI_LLAMA_CPP/bin/llama-server (or --llama-server PATH).
set -euo pipefail

cache="${CAI_LLAMA_CPP:-$HOME/.cache/cai/llama.cpp}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
jobs="${JOBS:-$(nproc)}"

mkdir -p "$cache/src"
sdist="$cache/src/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    "$python" -m pip download --no-binary :all: --no-deps --no-build-isolation "llama-cpp-python==$version" \
        -d "$cache/src" >/dev/null 2>&1 || "$python" -m pip download --no-binary :all: --no-deps \
        "llama-cpp-python==$version" -d "$cache/src"
fi
src="$cache/src/llama_cpp_python-$version"
if [ ! -d "$src/vendor/llama.cpp" ]; then
    tar xzf "$sdist" -C "$cache/src"
fi

# The CPU's features as ggml's own options, instead of -march=native, so that AMX stays off: on this project's
# machines (Xeon with AMX, in a VM) a native build died of SIGILL in ggml's AMX Q4_1 kernel (tinygemm_kernel_amx,
# at `tilezero`) on its first matrix product, although the kernel grants the tile state to a plain C program.
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
features=(-DGGML_NATIVE=OFF -DGGML_SSE42="$(has sse4_2)" -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)"
    -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)"
    -DGGML_AVX512="$(has avx512bw)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
    -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
echo "ggml CPU features: ${features[*]}"

build="$cache/build-$version"
cmake -S "$src/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF "${features[@]}"
cmake --build "$build" --target llama-server -j "$jobs"

mkdir -p "$cache/bin"
cp "$build/bin/llama-server" "$cache/bin/llama-server"
echo "$version" > "$cache/bin/VERSION"
echo "built $cache/bin/llama-server (llama.cpp vendored by llama-cpp-python $version)"
