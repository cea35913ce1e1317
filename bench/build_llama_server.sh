#!/usr/bin/env bash
# Builds llama.cpp's own llama-server (and its RPC server, ggml-rpc-server, beside it
# in the same bin/) from the llama.cpp sources vendored in the llama-cpp-python sdist
# kiln already pins, so the bench compares kiln with the very same llama.cpp revision
# and tests/upstream can split a model over RPC servers (U17). Everything goes to a
# cache outside the repo (never commit a binary or an sdist); a second run finds the
# binaries and does nothing.
#
#   bench/build_llama_server.sh            # prints the path of llama-server
#   KILN_BENCH_CACHE=/tmp/kb bench/build_llama_server.sh
#
# Needs pip (to fetch the sdist from PyPI), CMake and a C/C++ compiler. About 5-10
# minutes on two cores the first time.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${KILN_BENCH_CACHE:-$HOME/.cache/kiln-bench}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
SRC="$CACHE/llama_cpp_python-$VERSION"  # the sdist's top directory
BUILD="$CACHE/build-llama-server-$VERSION"
BIN="$BUILD/bin/llama-server"
RPC="$BUILD/bin/ggml-rpc-server"

if [[ -x "$BIN" && -x "$RPC" ]]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE/sdist"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    # --no-binary: the sdist carries vendor/llama.cpp; a wheel would not.
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$CACHE/sdist" >&2
    tar -xzf "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi

# GGML_NATIVE: the same -march=native as the llama-cpp-python wheel pip built here,
# so both sides use the same SIMD kernels. This llama.cpp no longer uses libcurl
# (LLAMA_CURL is a deprecated no-op); LLAMA_OPENSSL=OFF drops the HTTPS client it
# would use to download models, which the bench never does. GGML_RPC adds the RPC
# backend (llama-server --rpc) and the RPC server; a model not split over RPC runs as
# without it. Only these two targets.
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DGGML_CCACHE=OFF \
    -DGGML_RPC=ON \
    -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$BUILD" --target llama-server ggml-rpc-server -j "$JOBS" >&2
echo "$BIN"
