#!/usr/bin/env bash
# `make demo`: the main job on the bundled default model (SmolLM2-135M-Instruct, fetched by
# `make fetch`): read its GGUF, compute an entropy-aware ABF recipe for it, and write GGUFs whose
# metadata makes llama.cpp apply the recipe. Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=out/demo
mkdir -p "$out"
src=.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# the dev profile builds dependencies at opt-level 3 (Cargo.toml) and shares them with `make test`
cargo build --bins --quiet
bin=target/debug
step() { printf '\n== %s\n' "$*"; }

step "1. the model: $src"
"$bin/abf-convert" inspect "$src" > "$out/inspect.txt"
head -n 40 "$out/inspect.txt"

step "2. the recipe: entropy-aware ABF to 4 x its 8192-token window (head dim 64)"
"$bin/abf-convert" rope --method eabf --original-context 8192 --head-dim 64 \
  --positions 0,8191,8192,16383,16384,32767

step "3. llama.cpp cannot run the paper's exact log law with exempt layers: abf refuses, loudly"
if "$bin/abf-convert" patch-gguf "$src" -o "$out/refused.gguf" --method eabf --original-context 8192 --force; then
  echo "unexpected: the approximate recipe was accepted" >&2
  exit 1
else
  echo "(refused with exit code $?, as it should be; nothing written: $(ls "$out"/refused.gguf 2>/dev/null || echo none))"
fi

step "4. ABF with the step law (what llama.cpp runs natively): relabel to mistral3, temperature key"
"$bin/abf-convert" patch-gguf "$src" -o "$out/smollm2-abf-step.gguf" --force \
  --method abf --original-context 8192 --scale-law step
"$bin/abf-convert" inspect "$out/smollm2-abf-step.gguf" | grep -E 'architecture|freq_base|context_length|temperature|recipe' || true

step "5. the same with the exact recipe recorded under abf.recipe.* (log law approximated, on request)"
"$bin/abf-convert" patch-gguf "$src" -o "$out/smollm2-eabf-exact.gguf" --force \
  --method eabf --original-context 8192 --runtime exact --allow-approximate
"$bin/abf-convert" inspect "$out/smollm2-eabf-exact.gguf" --json \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in d if k in ("summary", "recipe")}, indent=1))'

step "6. from GGUF to a Hugging Face checkpoint (dequantized, q/k un-permuted, tokenizer rebuilt)"
"$bin/abf-convert" from-gguf "$src" -o "$out/smollm2-hf" --force

step "7. the checkpoint, with ABF + the step law, to an f16 GGUF that llama.cpp runs as trained"
"$bin/abf-convert" to-gguf "$out/smollm2-hf" -o "$out/smollm2-abf-step-f16.gguf" --outtype f16 --force \
  --method abf --original-context 8192 --scale-law step
"$bin/abf-convert" inspect "$out/smollm2-abf-step-f16.gguf" --json \
  | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["summary"], indent=1))'

step "done: outputs in $out/"
ls -la "$out"
