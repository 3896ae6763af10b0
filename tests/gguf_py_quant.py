#!/usr/bin/env python3
"""Independent reference for tests/quant.rs: gguf-py's numpy (de)quantizers and GGUF reader.

Usage: gguf_py_quant.py JOBS.json
Each job is one of
  {"op": "quantize",   "type": "Q8_0", "input": F32_FILE, "row_len": N, "output": BIN_FILE}
  {"op": "dequantize", "type": "Q4_K", "input": BIN_FILE, "n": N, "output": F32_FILE}
  {"op": "gguf", "input": GGUF, "output": JSON_FILE, "dump": [NAME, ...], "dump_dir": DIR}
The gguf job lists every tensor (name, type code, element count, absolute data offset, byte
count) with a fingerprint of gguf-py's dequantized f32 bits, sum(bits[i] * (i * 2654435761 + 1))
mod 2^64, and writes the full dequantized f32 values of the tensors named in "dump".
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants


def qtype(name):
    return GGMLQuantizationType[name]


def fingerprint(values):
    bits = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    idx = np.arange(bits.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        w = idx * np.uint64(2654435761) + np.uint64(1)
        return int((bits * w).sum(dtype=np.uint64))


def run(job):
    op = job["op"]
    if op == "quantize":
        x = np.fromfile(job["input"], dtype="<f4").reshape(-1, job["row_len"])
        q = quants.quantize(x, qtype(job["type"]))
        np.ascontiguousarray(q).view(np.uint8).tofile(job["output"])
    elif op == "dequantize":
        t = qtype(job["type"])
        raw = np.fromfile(job["input"], dtype=np.uint8)
        block, size = quants.GGML_QUANT_SIZES[t]
        if t == GGMLQuantizationType.F32:
            y = raw.view("<f4")
        elif t == GGMLQuantizationType.F16:
            y = raw.view("<f2").astype(np.float32)
        else:
            y = quants.dequantize(raw.reshape(1, -1), t)
        y = np.asarray(y, dtype=np.float32).reshape(-1)
        assert y.size == job["n"], (y.size, job["n"])
        y.astype("<f4").tofile(job["output"])
    elif op == "gguf":
        reader = GGUFReader(job["input"])
        dump = set(job.get("dump", []))
        rows = []
        for t in reader.tensors:
            raw = np.asarray(t.data)
            if t.tensor_type == GGMLQuantizationType.F32:
                y = raw.astype(np.float32)
            elif t.tensor_type == GGMLQuantizationType.F16:
                y = raw.astype(np.float32)
            else:
                y = quants.dequantize(raw, t.tensor_type)
            y = np.asarray(y, dtype=np.float32).reshape(-1)
            rows.append({
                "name": t.name,
                "type": int(t.tensor_type),
                "n_elements": int(t.n_elements),
                "offset": int(t.data_offset),
                "n_bytes": int(t.n_bytes),
                "fingerprint": fingerprint(y),
            })
            if t.name in dump:
                y.astype("<f4").tofile(f"{job['dump_dir']}/{t.name}.f32")
        with open(job["output"], "w") as f:
            json.dump(rows, f)
    else:
        raise SystemExit(f"unknown op {op}")


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        run(job)


if __name__ == "__main__":
    main()
