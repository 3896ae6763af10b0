#!/usr/bin/env bash
# The one prerequisite step of `make test`, `make demo`, `make lint` and .ci/run: the system
# tools the build needs (llama.cpp through llama-cpp-sys-2 needs cmake, a C/C++ compiler and
# libclang for bindgen; the fetch needs Python 3 with pip). Installs what is missing with apt when
# it can (root, or passwordless sudo); otherwise stops at once with the exact command to run.
set -euo pipefail

missing_apt=()
command -v cmake >/dev/null 2>&1 || missing_apt+=(cmake)
command -v clang >/dev/null 2>&1 || missing_apt+=(clang)
command -v c++ >/dev/null 2>&1 || missing_apt+=(g++)
# bindgen loads libclang.so at build time (LIBCLANG_PATH may point elsewhere)
if ! { [ -n "${LIBCLANG_PATH:-}" ] && ls "$LIBCLANG_PATH"/libclang*.so* >/dev/null 2>&1; } &&
   ! ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
  missing_apt+=(libclang-dev)
fi
command -v python3 >/dev/null 2>&1 || missing_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing_apt+=(python3-pip)

if [ ${#missing_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  cmd="${sudo:+$sudo }apt-get update && ${sudo:+$sudo }apt-get install -y ${missing_apt[*]}"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
    echo "prereqs: installing ${missing_apt[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing_apt[@]}" >/dev/null
  else
    echo "prereqs: missing ${missing_apt[*]}; install them first:" >&2
    echo "  $cmd" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "prereqs: no Rust toolchain (cargo); install one first (rustup, then `rustup default stable`)" >&2
  exit 1
fi
echo "prereqs: ok (cmake $(cmake --version | head -n1 | awk '{print $3}'), clang $(clang --version | head -n1 | sed 's/.*version \([0-9.]*\).*/\1/'), $(cargo --version))"
