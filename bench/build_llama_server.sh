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

build="$cache/build-$version"
cmake -S "$src/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
cmake --build "$build" --target llama-server -j "$jobs"

mkdir -p "$cache/bin"
cp "$build/bin/llama-server" "$cache/bin/llama-server"
echo "$version" > "$cache/bin/VERSION"
echo "built $cache/bin/llama-server (llama.cpp vendored by llama-cpp-python $version)"
