#!/usr/bin/env bash
# The one prepared script for a GPU machine (docs/cuda.md): the CUDA fine-tune checked against
# CPU, then measured on a LLaMA-2-7B-shaped model. Build first, on the CPU machine:
#   scripts/build-cuda.sh            # -> target-cuda/release/{abf-tune, examples/step_bench}
# then carry target-cuda/gpu-bundle.tar.xz (the two binaries it needs, ~15 MB) and run there
# (about 5 minutes on an H200):
#   OUT=<folder> bash scripts/gpu-check.sh
# Writes $OUT/gpu-check.json (every run's report) and $OUT/gpu-check.md (the benchmarks section).
# A smoke run of the script itself on CPU (tiny shape, CPU binaries):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SHAPE=tiny GPU_CHECK_LENGTHS=128,256 GPU_CHECK_FORWARD=512 \
#     GPU_CHECK_MATMUL_N=256 ABF_BIN=target/debug bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${ABF_BIN:-target-cuda/release}
out=${OUT:-out/gpu-check}
dev=${GPU_CHECK_DEVICE:-cuda:0}
shape=${GPU_CHECK_SHAPE:-llama2-7b}
lens=${GPU_CHECK_LENGTHS:-4096,16384}
fwd_len=${GPU_CHECK_FORWARD:-32768}
per_run=${GPU_CHECK_TIMEOUT:-150}
matmul_n=${GPU_CHECK_MATMUL_N:-8192}
tiny=${TINY_MODEL:-fixtures/kjv-tiny}
data=${TINY_DATA:-fixtures/conversations/kjv_demo.jsonl}
mkdir -p "$out"
log() { printf '[gpu-check %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# The binaries link libcudart/libcublas/libcurand 13: on the GPU machines they are PyTorch's wheels.
if [ "$dev" != cpu ]; then
  for d in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) /usr/local/lib/python3*/dist-packages; do
    if [ -d "$d/nvidia/cu13/lib" ]; then export LD_LIBRARY_PATH="$d/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; fi
  done
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
fi
# The carried bundle (scripts/build-cuda.sh) when the binaries themselves were not carried.
bundle=${ABF_BUNDLE:-target-cuda/gpu-bundle.tar.xz}
if [ ! -x "$bin/abf-tune" ] && [ -f "$bundle" ]; then
  bin=$out/bin
  mkdir -p "$bin" && tar -C "$bin" -xJf "$bundle"
fi
step_bench=$bin/examples/step_bench
[ -x "$step_bench" ] || step_bench=$bin/step_bench
for f in "$bin/abf-tune" "$step_bench"; do
  [ -x "$f" ] || { log "missing $f (run scripts/build-cuda.sh and carry target-cuda/release)"; exit 2; }
done
results=$out/runs.jsonl
: > "$results"

# 1. Correctness: the tiny model, 3 steps on the device in f32 and bf16 against CPU f32.
if [ -d "$tiny" ]; then
  for run in "cpu f32" "$dev f32" "$dev bf16"; do
    set -- $run
    name=tune-${1/:/}-$2
    log "tune $name"
    timeout "$per_run" "$bin/abf-tune" --model "$tiny" --data "$data" -o "$out/$name" --force \
      --seq-len 512 --samples 8 --batch-size 4 --steps 3 --lr 1e-3 --device "$1" --dtype "$2" \
      --json > "$out/$name.json" 2> "$out/$name.err" || log "tune $name failed: $(tail -n 3 "$out/$name.err")"
  done
  python3 - "$out" "$dev" >> "$results" <<'EOF'
import json, sys, os
out, dev = sys.argv[1], sys.argv[2].replace(":", "")
def steps(name):
    p = os.path.join(out, name, "training_log.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else None
ref = steps("tune-cpu-f32")
for dt, tol in (("f32", 1e-4), ("bf16", 2e-2)):
    got = steps(f"tune-{dev}-{dt}")
    row = {"kind": "correctness", "dtype": dt, "tolerance": tol}
    if ref is None or got is None or len(ref) != len(got):
        row["error"] = "missing training log"
    else:
        rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
        row["loss_rel"] = max(rel(g["loss"], r["loss"]) for g, r in zip(got, ref))
        row["grad_norm_rel"] = max(rel(g["grad_norm"], r["grad_norm"]) for g, r in zip(got, ref))
        row["pass"] = row["loss_rel"] <= tol and row["grad_norm_rel"] <= tol
        row["cpu"] = [(r["loss"], r["grad_norm"]) for r in ref]
        row["device"] = [(g["loss"], g["grad_norm"], g.get("tokens_per_s")) for g in got]
    print(json.dumps(row))
EOF
else
  log "no tiny model at $tiny: correctness runs skipped"
fi

# 2. Speed and memory of a 7B-shaped step (micro-batch 1, recomputation), full and LoRA r=8,
#    then a forward-only logits pass. Each run is its own process: an out-of-memory stays one row.
bench() {
  local name=$1; shift
  log "bench $name"
  local smi=""
  if command -v nvidia-smi > /dev/null && [ "$dev" != cpu ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/$name.smi" 2>/dev/null &
    smi=$!
  fi
  local dt=bf16; [ "$dev" = cpu ] && dt=f32
  timeout "$per_run" "$step_bench" --shape "$shape" --device "$dev" --dtype "$dt" --matmul-n "$matmul_n" "$@" \
    > "$out/$name.json" 2> "$out/$name.err"
  local rc=$?
  [ -n "$smi" ] && kill "$smi" 2>/dev/null
  python3 - "$out" "$name" "$rc" >> "$results" <<'EOF'
import json, sys, os
out, name, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
row = {"kind": "bench", "name": name, "rc": rc}
try:
    row.update(json.load(open(os.path.join(out, name + ".json"))))
except Exception:
    err = open(os.path.join(out, name + ".err")).read().strip().splitlines()
    row["error"] = "timed out" if rc == 124 else (err[-1] if err else f"exit {rc}")
smi = os.path.join(out, name + ".smi")
if os.path.exists(smi):
    vals = [int(l) for l in open(smi) if l.strip().isdigit()]
    row["nvidia_smi_peak_mib"] = max(vals) if vals else None
print(json.dumps(row))
EOF
}
IFS=, read -r -a lengths <<< "$lens"
for t in "${lengths[@]}"; do
  bench "step-$t-full" --seq-len "$t" --steps 3
  # what the memory options above exist for: the whole-layer graph (quadratic) at the same length
  [ "$t" -le 4096 ] && bench "step-$t-full-unblocked" --seq-len "$t" --steps 2 --no-blocked-attention
  bench "step-$t-lora8" --seq-len "$t" --steps 3 --lora 8
done
bench "forward-$fwd_len" --seq-len "$fwd_len" --forward

# 3. The report: JSON and the markdown section for docs/benchmarks.md.
python3 - "$results" "$out" "$shape" "$dev" "$matmul_n" <<'EOF'
import json, sys, os, datetime
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out, shape, dev, mm = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
json.dump(rows, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
gb = lambda b: f"{b / 1e9:.1f}" if b else "-"
md = [f"## CUDA fine-tune on {dev} ({datetime.date.today()}, `scripts/gpu-check.sh`)", ""]
for r in rows:
    if r["kind"] == "correctness":
        md.append(f"- tiny model, 3 steps, {r['dtype']} on the GPU vs f32 on CPU: " + (
            r.get("error") or f"max relative difference loss {r['loss_rel']:.2e}, grad norm "
            f"{r['grad_norm_rel']:.2e} (bound {r['tolerance']}): {'PASS' if r['pass'] else 'FAIL'}"))
md += ["", f"{shape}, micro-batch 1, layer recomputation, bf16 compute, f32 master weights and AdamW state.",
       "MFU = model FLOPs (6 N T + causal attention 6 L d T^2; forward: a third) / time / measured bf16 matmul rate.", "",
       "Attention rebuilt one query block at a time in the backward; `abf-tune --plan`'s prediction beside the measured peak.", "",
       "| run | tokens/s | s/step (best) | MFU | peak GPU GB (sampled) | predicted GB (--plan) | nvidia-smi peak GiB | note |", "|---|---|---|---|---|---|---|---|"]
for r in rows:
    if r["kind"] != "bench":
        continue
    smi = r.get("nvidia_smi_peak_mib")
    smi = f"{smi / 1024:.1f}" if smi else "-"
    if "error" in r:
        md.append(f"| {r['name']} | - | - | - | - | - | {smi} | {r['error'][:120]} |")
        continue
    secs = min(r["step_seconds"][1:] or r["step_seconds"]) if "step_seconds" in r else r["seconds"]
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    md.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {secs:.2f} | {mfu} | {gb(r.get('peak_memory_bytes'))} | {gb(r.get('predicted_peak_bytes'))} | {smi} | |")
rate = next((r.get("matmul_flops") for r in rows if r.get("matmul_flops")), None)
if rate:
    md += ["", f"Measured dense matmul rate ({mm}^3, candle; cuBLAS on CUDA): {rate / 1e12:.0f} TFLOP/s."]
open(os.path.join(out, "gpu-check.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
