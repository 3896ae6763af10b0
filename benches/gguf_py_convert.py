#!/usr/bin/env python3
"""The Python side of benches/convert.rs: the write path of llama.cpp's convert_hf_to_gguf.py
(gguf-py's GGUFWriter with its numpy f16 cast and Q8_0 quantizer) on the same f32 safetensors.

convert_hf_to_gguf.py itself imports torch and transformers, which these machines cannot install
from PyPI without ~3 GB of CUDA wheels; this script keeps exactly the part that costs time (reading
every tensor, converting or quantizing it with gguf-py, writing the file) and skips tokenizer and
metadata work, which is negligible. Norms stay f32, as the converter keeps 1-D tensors.

Usage: gguf_py_convert.py MODEL.safetensors OUT.gguf f16|q8_0   -> prints seconds on stdout
"""
import json
import struct
import sys
import time

import numpy as np
import gguf
from gguf import quants, GGMLQuantizationType


def tensors(path):
    """(name, f32 ndarray view) from a safetensors file, memory-mapped like the converter's lazy loader."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{name}: {info['dtype']} (this bench wants an f32 checkpoint)"
        a, b = info["data_offsets"]
        yield name, data[a:b].view("<f4").reshape(info["shape"])


def main():
    src, out, outtype = sys.argv[1:4]
    t0 = time.perf_counter()
    w = gguf.GGUFWriter(out, "llama")
    for name, x in tensors(src):
        if x.ndim == 1:
            w.add_tensor(name, np.asarray(x, dtype=np.float32))
        elif outtype == "f16":
            w.add_tensor(name, x.astype(np.float16))
        elif outtype == "q8_0":
            q = quants.quantize(np.asarray(x), GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            raise SystemExit(f"unsupported outtype {outtype}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{time.perf_counter() - t0:.4f}")


if __name__ == "__main__":
    main()
