#!/usr/bin/env bash
# `make bench`: run every benchmark (release build) and write docs/benchmarks.md.
# Each bench prints a markdown section; this script stitches them together with the machine and date.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/benchmarks.md
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
benches=$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' <(awk '/^\[\[bench\]\]/{f=1;next} f&&/^name/{print;f=0}' Cargo.toml))
for b in $benches; do
  echo "bench: $b"
  ABF_BENCH_OUT="$tmp/$b.md" cargo bench --features "${FEATURES:-}" --bench "$b"
done
echo "bench: training against PyTorch"
bash scripts/train-bench.sh > "$tmp/train.md"
{
  echo "# Benchmarks"
  echo
  echo "Produced by \`make bench\` (scripts/bench.sh) on $(date -u +%Y-%m-%d): $(nproc) cores,"
  echo "$(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo) memory, $(uname -m), $(rustc --version)."
  echo "Each section names the command that produced it. Timings are wall-clock, best of the runs shown."
  for b in $benches; do
    echo
    cat "$tmp/$b.md"
  done
  echo
  cat "$tmp/train.md"
  cat scripts/bench-notes.md
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "bench: wrote $out"
