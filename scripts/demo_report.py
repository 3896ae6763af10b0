#!/usr/bin/env python3
"""The demo's table and plots from its perplexity and training summaries.

    python3 scripts/demo_report.py OUT_DIR WINDOW NAME...

Reads OUT_DIR/NAME.ppl.json (`abf-eval ppl --json`), OUT_DIR/NAME.passkey.json when present
(`abf-eval passkey --json`), for fine-tuned names OUT_DIR/NAME.tune.json
(`abf-tune --json`), OUT_DIR/NAME.verify.json (`abf-verify --report`) and OUT_DIR/NAME.verify.rc
(its exit code, kept by demo.sh); prints a Markdown table (method x evaluation length, verdicts),
a passkey table (method x length, mean over depths), each GGUF's overall verification verdict
with its metadata issues, and writes
OUT_DIR/plots/ppl-by-length.svg and OUT_DIR/plots/ppl-by-band.svg (plain SVG, no plotting library
needed).
"""
import json
import math
import os
import sys

LABELS = {
    "base": "none (the 128-token model as pre-trained)",
    "eabf": "entropy-aware ABF (eabf)",
    "abf": "ABF (base 500000)",
    "pi": "PI (linear, s = 4)",
    "yarn": "YaRN (s = 4)",
}
COLORS = ["#444444", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd"]


def load_ppl(out, name):
    """One model's results from `abf-eval ppl --json` (OUT/NAME.ppl.json), bands as {from, to, ppl}."""
    d = load(out, name, "ppl")
    if d is None:
        return None
    m = d["models"][0]
    results = [dict(r, bands=[{"from": b["start"], "to": b["end"], "ppl": b["ppl"]} for b in r["bands"]])
               for r in m["lengths"]]
    return {"text": d["text"], "results": results}


def verdict(out, name):
    """abf-verify's overall verdict (its `pass`: metadata and every backend), then the metadata
    issues and each backend's fidelity / long-context verdicts; '-' when nothing was verified."""
    v = load(out, name, "verify")
    if v is None:
        rc = read_rc(out, name)
        return "-" if rc is None else f"ERROR (abf-verify exit {rc}, no report)"
    ok = lambda x: "PASS" if x else "FAIL"
    issues = v.get("metadata", [])
    parts = [f"metadata: {len(issues)} issue(s) ({', '.join(i['key'] for i in issues)})" if issues else "metadata: ok"]
    parts += [f'{b["backend"]}: {ok(b["fidelity_pass"])}/{ok(b["long_context_pass"])}' for b in v.get("backends", [])]
    return f'{ok(v["pass"])}: ' + "; ".join(parts)


def read_rc(out, name):
    """abf-verify's exit code as demo.sh kept it (OUT/NAME.verify.rc), or None."""
    path = os.path.join(out, f"{name}.verify.rc")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def verification_summary(out, names):
    """One line per verified GGUF: its overall verdict, then every metadata issue in full."""
    lines = []
    for name in names:
        v = load(out, name, "verify")
        if v is None and read_rc(out, name) is None:
            continue
        lines.append(f"- {name}.gguf: {verdict(out, name)}")
        for i in (v or {}).get("metadata", []):
            lines.append(f"  - metadata {i['key']}: {i['message']}")
    if lines:
        print("\nGGUF verification (abf-verify, overall verdict = metadata and every backend):\n")
        print("\n".join(lines))


def load(out, name, kind):
    path = os.path.join(out, f"{name}.{kind}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def svg_lines(path, title, xlabel, ylabel, series, xticks, log_y=True):
    """series: [(label, color, [(x, y), ...])]; x are tick indices."""
    w, h, ml, mr, mt, mb = 760, 440, 70, 250, 40, 50
    pw, ph = w - ml - mr, h - mt - mb
    ys = [y for _, _, pts in series for _, y in pts if y and y > 0]
    lo, hi = min(ys), max(ys)
    f = math.log if log_y else (lambda v: v)
    flo, fhi = f(lo) - 0.05 * (f(hi) - f(lo) + 1e-9), f(hi) + 0.05 * (f(hi) - f(lo) + 1e-9)
    n = max(len(xticks) - 1, 1)
    X = lambda i: ml + pw * i / n
    Y = lambda v: mt + ph * (1 - (f(v) - flo) / (fhi - flo))
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{ml + pw / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
         f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>',
         f'<text x="{ml + pw / 2}" y="{h - 12}" text-anchor="middle">{xlabel}</text>',
         f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {mt + ph / 2})">{ylabel}</text>']
    for i, t in enumerate(xticks):
        o.append(f'<line x1="{X(i)}" y1="{mt + ph}" x2="{X(i)}" y2="{mt + ph + 5}" stroke="black"/>')
        o.append(f'<text x="{X(i)}" y="{mt + ph + 18}" text-anchor="middle">{t}</text>')
    for k in range(6):
        v = math.exp(flo + (fhi - flo) * k / 5) if log_y else flo + (fhi - flo) * k / 5
        o.append(f'<line x1="{ml - 5}" y1="{Y(v)}" x2="{ml + pw}" y2="{Y(v)}" stroke="#dddddd"/>')
        o.append(f'<text x="{ml - 8}" y="{Y(v) + 4}" text-anchor="end">{v:.1f}</text>')
    for j, (label, color, pts) in enumerate(series):
        d = " ".join(f"{X(i):.1f},{Y(y):.1f}" for i, y in pts)
        o.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        for i, y in pts:
            o.append(f'<circle cx="{X(i):.1f}" cy="{Y(y):.1f}" r="3" fill="{color}"/>')
        ly = mt + 10 + 20 * j
        o.append(f'<line x1="{ml + pw + 12}" y1="{ly}" x2="{ml + pw + 36}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
        o.append(f'<text x="{ml + pw + 42}" y="{ly + 4}">{label}</text>')
    o.append("</svg>")
    with open(path, "w") as fh:
        fh.write("\n".join(o) + "\n")


def tune_line(path):
    with open(path) as f:
        d = json.load(f)
    kept = d["data"]["kept"]
    print("%d steps, loss %.3f -> %.3f, %d samples x %d tokens, %.0f s; %s" % (
        d["steps_done"], d["first_loss"], d["last_loss"], kept, d["data"]["tokens"] // max(kept, 1),
        d["seconds"], d["recipe"]))
    # the demo's premise: 100 samples, each at least 3/4 of the 4 x window (the passkey
    # conversations are 384-512 tokens long: fixtures/conversations/make_passkey.py)
    if kept < 100 or d["data"]["tokens"] < 100 * 384:
        sys.exit(f"{path}: expected 100 samples of 384-512 tokens, got {kept} ({d['data']['tokens']} tokens)")


def passkey_table(out, names, window):
    """Passkey accuracy by length (mean over depths) and, at the longest length, by depth."""
    rows = [(n, load(out, n, "passkey")) for n in names]
    rows = [(n, d["models"][0]["cells"]) for n, d in rows if d]
    if not rows:
        return
    lengths = sorted({c["length"] for c in rows[0][1]})
    acc = lambda cells: 100 * sum(c["correct"] for c in cells) / max(sum(c["trials"] for c in cells), 1)
    trials = sum(c["trials"] for c in rows[0][1] if c["length"] == lengths[0])
    print(f"\nPasskey accuracy (%, abf-eval passkey: {trials} trials a length over the depths):\n")
    print("| method | " + " | ".join(f"{L} ({L // window}x)" for L in lengths) + " |")
    print("|" + "---|" * (len(lengths) + 1))
    for n, cells in rows:
        print(f"| {LABELS.get(n, n)} | " + " | ".join(f'{acc([c for c in cells if c["length"] == L]):.0f}' for L in lengths) + " |")
    for L in lengths[2:]:
        depths = sorted({c["depth"] for c in rows[0][1]})
        print(f"\nAt {L} tokens by depth of the key (0 = first, 1 = last):\n")
        print("| method | " + " | ".join(f"{d:g}" for d in depths) + " |")
        print("|" + "---|" * (len(depths) + 1))
        for n, cells in rows:
            print(f"| {LABELS.get(n, n)} | " + " | ".join(
                f'{acc([c for c in cells if c["length"] == L and c["depth"] == d]):.0f}' for d in depths) + " |")


def main():
    if sys.argv[1] == "--tune":
        tune_line(sys.argv[2])
        return
    out, window, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    rows = []
    for name in names:
        ppl = load_ppl(out, name)
        if ppl is None:
            continue
        rows.append((name, ppl, load(out, name, "tune")))
    lengths = [r["length"] for r in rows[0][1]["results"]]
    head = "| method | " + " | ".join(f"{L} ({L // window}x)" for L in lengths) + " | fine-tune loss | GGUF verified (overall: metadata; backend fidelity/long-context) |"
    print(head)
    print("|" + "---|" * (len(lengths) + 3))
    for name, ppl, tune in rows:
        vals = {r["length"]: r["ppl"] for r in ppl["results"]}
        loss = f'{tune["first_loss"]:.3f} -> {tune["last_loss"]:.3f}' if tune else "-"
        print(f"| {LABELS.get(name, name)} | " + " | ".join(f"{vals[L]:.2f}" for L in lengths) + f" | {loss} | {verdict(out, name) if tune else '-'} |")
    verification_summary(out, [name for name, _, tune in rows if tune])
    passkey_table(out, names, window)
    first = rows[0][1]["results"][0]
    print(f"\nPerplexity of {rows[0][1]['text']} ({first['tokens'] + first['windows']} tokens), cut into "
          f"non-overlapping windows of each length, over every predicted position; the model was "
          f"pre-trained at {window} tokens and fine-tuned at {4 * window}.")
    # by-band detail of the longest length
    L = lengths[-1]
    print(f"\nAt {L} tokens, by position band of the predicted token:\n")
    bands = [(b["from"], b["to"]) for b in next(r for r in rows[0][1]["results"] if r["length"] == L)["bands"]]
    print("| method | " + " | ".join(f"{a}-{b}" for a, b in bands) + " |")
    print("|" + "---|" * (len(bands) + 1))
    for name, ppl, _ in rows:
        res = next(r for r in ppl["results"] if r["length"] == L)
        print(f"| {LABELS.get(name, name)} | " + " | ".join(f'{b["ppl"]:.2f}' for b in res["bands"]) + " |")
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    series = []
    for j, (name, ppl, _) in enumerate(rows):
        vals = {r["length"]: r["ppl"] for r in ppl["results"]}
        series.append((LABELS.get(name, name).split(" (")[0] if name != "base" else "no fine-tune",
                       COLORS[j % len(COLORS)], [(i, vals[x]) for i, x in enumerate(lengths)]))
    svg_lines(os.path.join(out, "plots", "ppl-by-length.svg"),
              f"Held-out perplexity vs evaluation length (window {window}, tuned to {4 * window})",
              "evaluation length (tokens)", "perplexity (log scale)", series, [str(x) for x in lengths])
    series = []
    for j, (name, ppl, _) in enumerate(rows):
        res = next(r for r in ppl["results"] if r["length"] == L)
        series.append((LABELS.get(name, name).split(" (")[0] if name != "base" else "no fine-tune",
                       COLORS[j % len(COLORS)], [(i, b["ppl"]) for i, b in enumerate(res["bands"])]))
    svg_lines(os.path.join(out, "plots", "ppl-by-band.svg"),
              f"Perplexity by position band at {L} tokens", "position band (tokens)",
              "perplexity (log scale)", series, [f"{a}-{b}" for a, b in bands])
    print(f"\nplots: {out}/plots/ppl-by-length.svg, {out}/plots/ppl-by-band.svg")


if __name__ == "__main__":
    main()
