#!/usr/bin/env python3
"""The fixture model's text: the King James Bible (public domain) from Debian's `bible-kjv`
package, one verse a line as `N text`, a blank line between chapters, the reference prefix
(`Ge1:1`) dropped. The Gospel of John is held out of pre-training (and of the fine-tuning data)
for the demo's perplexity evaluation.

    python3 scripts/fixture_text.py OUT_DIR   # writes OUT_DIR/train.txt and OUT_DIR/heldout.txt
"""
import os
import re
import subprocess
import sys

HELD_OUT = "John"
REF = re.compile(r"^([0-9]?[A-Za-z]+)([0-9]+):([0-9]+)$")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True,
                          capture_output=True, text=True).stdout
    parts = {"train": [], "heldout": []}
    last = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        ref, _, verse = line.partition(" ")
        m = REF.match(ref)
        if not m:
            raise SystemExit(f"unexpected reference {ref!r}")
        book, chap, num = m.groups()
        dest = parts["heldout" if book == HELD_OUT else "train"]
        if (book, chap) != last and dest:
            dest.append("")
        last = (book, chap)
        dest.append(f"{num} {verse}")
    for name, lines in parts.items():
        with open(os.path.join(out, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
