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
rounds=${TRAIN_BENCH_ROUNDS:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release --quiet --bin abf-convert --bin abf-tune
target/release/abf-convert from-gguf "$gguf" -o "$tmp/smol" --json > /dev/null
have_torch=0
if "$py" -c 'import torch, transformers' 2> /dev/null; then have_torch=1; fi
# Rounds alternate abf-tune and PyTorch: this machine's speed drifts by 10-20% over minutes, so a
# round's ratio compares neighbours; the medians of $rounds rounds are reported.
for r in $(seq "$rounds"); do
  target/release/abf-tune --model "$tmp/smol" --data fixtures/conversations/kjv_long.jsonl -o "$tmp/tuned" \
    --method abf --seq-len $seq --samples 8 --batch-size 1 --micro-batch 1 --steps 5 --force --json > /dev/null
  python3 -c "
import json; L=[json.loads(l) for l in open('$tmp/tuned/training_log.jsonl')]
print(json.dumps({'tps': sum(l['tokens'] for l in L[1:]) / sum(l['seconds'] for l in L[1:]),
  'rss': max(l['peak_rss_bytes'] for l in L[1:]), 'lengths': [l['tokens'] for l in L]}))" >> "$tmp/abf.jsonl"
  if [ $have_torch = 1 ]; then
    # PyTorch trains random tokens of the same lengths, step by step (the first is warm-up on both)
    lengths=$(python3 -c "import json; print(','.join(map(str, json.loads(open('$tmp/abf.jsonl').readlines()[-1])['lengths'])))")
    "$py" benches/torch_train.py "$tmp/smol" "$lengths" 4 2> /dev/null | tail -n 1 >> "$tmp/torch.jsonl"
  fi
done
python3 - "$tmp" "$have_torch" "$(nproc)" "$rounds" <<'PY'
import json, statistics as st, sys
tmp, have_torch, nproc, rounds = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
abf = [json.loads(l) for l in open(f"{tmp}/abf.jsonl")]
a = [x["tps"] for x in abf]
def cell(v): return "%.1f (%.1f-%.1f)" % (st.median(v), min(v), max(v))
print(f"| trainer | tokens/s, median of {rounds} (range) | peak RSS |")
print("|---|---|---|")
print(f"| abf-tune (release, {nproc} threads; steps 2-5 of kjv_long.jsonl pieces, 300-512 tokens) "
      f"| {cell(a)} | {max(x['rss'] for x in abf) / 1e9:.2f} GB |")
if have_torch:
    torch = [json.loads(l) for l in open(f"{tmp}/torch.jsonl")]
    t = [x["tokens_per_s"] for x in torch]
    print(f"| PyTorch {torch[0]['torch']} (transformers, gradient checkpointing, AdamW; steps 2-5, "
          f"random tokens, the same lengths) | {cell(t)} | {max(x['peak_rss_bytes'] for x in torch) / 1e9:.2f} GB |")
    ratios = [x / y for x, y in zip(a, t)]
    print()
    print("abf-tune / PyTorch = %.2f in tokens/s, the median of the rounds' ratios (%s; target >= 1)."
          % (st.median(ratios), ", ".join("%.2f" % r for r in ratios)))
else:
    print()
    print(f"PyTorch not measured: `python -c 'import torch, transformers'` fails (`pip install torch transformers`,")
    print("or TORCH_PYTHON=path/to/python of an environment that has them).")
PY
