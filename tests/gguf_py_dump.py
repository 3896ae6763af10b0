#!/usr/bin/env python3
"""Dump a GGUF file as llama.cpp's gguf-py reads it, as JSON, for tests/gguf_cli.rs.

keys: name, type code, value (scalars), or for arrays: element type code, length, first items
and an FNV-1a 64 hash of the elements (strings as u64-LE length + bytes, numbers as their
little-endian bytes). tensors: name, ggml type code, shape (GGUF order), absolute data offset,
size in bytes.
Usage: python3 tests/gguf_py_dump.py FILE
"""
import json
import sys

from gguf import GGUFReader, GGUFValueType

FIRST = 8


def fnv1a64(chunks):
    h = 0xCBF29CE484222325
    for chunk in chunks:
        for b in chunk:
            h ^= b
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def main(path):
    r = GGUFReader(path, "r")
    keys = []
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue  # gguf-py's own header pseudo-fields
        main_type = field.types[0]
        entry = {"name": name, "type": int(main_type)}
        if main_type == GGUFValueType.ARRAY:
            sub = field.types[-1] if len(field.types) > 1 else None
            parts = [field.parts[i] for i in field.data]
            if sub == GGUFValueType.STRING:
                chunks = []
                for p in parts:
                    b = p.tobytes()
                    chunks.append(len(b).to_bytes(8, "little"))
                    chunks.append(b)
                first = [p.tobytes().decode("utf-8", "replace") for p in parts[:FIRST]]
            else:
                chunks = [p.astype(p.dtype.newbyteorder("<")).tobytes() for p in parts]
                first = [x for p in parts[:FIRST] for x in p.tolist()]
            # an empty array has no element type part in older gguf-py versions
            entry["elem_type"] = int(sub) if sub is not None else None
            entry["len"] = len(parts)
            entry["first"] = first
            entry["fnv1a64"] = fnv1a64(chunks)
        elif main_type == GGUFValueType.STRING:
            entry["value"] = field.parts[-1].tobytes().decode("utf-8", "replace")
        else:
            entry["value"] = field.parts[-1].tolist()[0]
        keys.append(entry)
    tensors = [
        {
            "name": t.name,
            "type": int(t.tensor_type),
            "shape": [int(x) for x in t.shape.tolist()],
            "offset": int(t.data_offset),
            "n_bytes": int(t.n_bytes),
        }
        for t in r.tensors
    ]
    json.dump({"keys": keys, "tensors": tensors}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
