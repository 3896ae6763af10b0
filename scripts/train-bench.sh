#!/usr/bin/env bash
# `make bench`, training section: abf-tune against PyTorch (transformers + torch) on the same
# model and machine: SmolLM2-135M in f32 (from-gguf of the fetched file), sequences up to 512
# tokens, batch 1, layer recomputation on both sides (abf's default; torch's gradient
# checkpointing), AdamW; tokens/s over the steps after the first (PyTorch on random tokens of the
# lengths abf-tune's steps had), and peak RSS. PyTorch runs when
# `$TORCH_PYTHON -c 'import torch, transformers'` works (default python3; PyPI's torch installs on
# these machines but is large, so it is not part of CI); otherwise only abf's row is written.
# Prints one markdown section.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
py=${TORCH_PYTHON:-python3}
seq=512
echo "## Fine-tuning speed against PyTorch (SmolLM2-135M, f32, up to $seq tokens, batch 1, CPU)"
echo
if [ ! -f "$gguf" ]; then echo "skipped: $gguf is missing (run \`make fetch\`)"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release --quiet --bin abf-convert --bin abf-tune
target/release/abf-convert from-gguf "$gguf" -o "$tmp/smol" --json > /dev/null
target/release/abf-tune --model "$tmp/smol" --data fixtures/conversations/kjv_long.jsonl -o "$tmp/tuned" \
  --method abf --seq-len $seq --samples 8 --batch-size 1 --micro-batch 1 --steps 5 --force --json > /dev/null
abf=$(python3 -c "
import json; L=[json.loads(l) for l in open('$tmp/tuned/training_log.jsonl')][1:]
print('%.1f %.2f' % (sum(l['tokens'] for l in L) / sum(l['seconds'] for l in L), max(l['peak_rss_bytes'] for l in L) / 1e9))")
read -r abf_tps abf_rss <<< "$abf"
# PyTorch trains random tokens of the same lengths, step by step (the first is warm-up on both)
lengths=$(python3 -c "
import json; print(','.join(str(json.loads(l)['tokens']) for l in open('$tmp/tuned/training_log.jsonl')))")
echo "| trainer | tokens/s | peak RSS |"
echo "|---|---|---|"
echo "| abf-tune (release, $(nproc) threads; steps 2-5 of kjv_long.jsonl pieces, 300-512 tokens) | $abf_tps | $abf_rss GB |"
if "$py" -c 'import torch, transformers' 2> /dev/null; then
  t=$("$py" benches/torch_train.py "$tmp/smol" "$lengths" 4 2> /dev/null | tail -n 1)
  read -r torch_tps torch_rss torch_v <<< "$(python3 -c "
import json; d=json.loads('''$t'''); print('%.1f %.2f %s' % (d['tokens_per_s'], d['peak_rss_bytes'] / 1e9, d['torch']))")"
  echo "| PyTorch $torch_v (transformers, gradient checkpointing, AdamW; steps 2-5, random tokens, the same lengths) | $torch_tps | $torch_rss GB |"
  echo
  echo "abf-tune / PyTorch = $(python3 -c "print('%.2f' % ($abf_tps / $torch_tps))") in tokens/s (target >= 1)."
else
  echo
  echo "PyTorch not measured: \`$py -c 'import torch, transformers'\` fails (\`pip install torch transformers\`,"
  echo "or TORCH_PYTHON=path/to/python of an environment that has them)."
fi
