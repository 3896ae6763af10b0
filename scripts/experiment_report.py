#!/usr/bin/env python3
"""`make experiment`'s tables and plots: every number as the mean and spread over fine-tune seeds.

    python3 scripts/experiment_report.py OUT --window 128 --seeds "1 2 3" --methods "eabf abf ..." \\
        [--samples "32 100 400"]

Reads OUT/base.{ppl,passkey,entropy}.json (the model as pre-trained) and, per method and seed,
OUT/METHOD-sSEED.{tune,ppl,passkey,entropy}.json (100 samples) or OUT/METHOD-nN-sSEED.* (other
sample counts): the `--json` outputs of abf-tune and abf-eval. Prints Markdown on stdout; writes
OUT/plots/*.svg (plain SVG, no plotting library): error bars span the seeds' minimum to maximum,
the point is their mean.

"Exceeds the spread" is stated only when the ranges (min..max over seeds) of two methods do not
overlap: with 3 seeds that is a sign, not a significance test, and the report says so.
"""
import argparse
import json
import math
import os
import statistics

LABELS = {
    "base": "none (pre-trained at 128)",
    "eabf": "eabf (log law, layers 0-1 exempt)",
    "eabf-step": "eabf, step law (all layers)",
    "abf": "ABF (base 500000)",
    "pi": "PI (linear, s = 4)",
    "yarn": "YaRN (s = 4)",
    "ntk-by-parts": "NTK-by-parts (s = 4)",
}
COLORS = {"base": "#444444", "eabf": "#d62728", "eabf-step": "#e377c2", "abf": "#1f77b4",
          "pi": "#2ca02c", "yarn": "#ff7f0e", "ntk-by-parts": "#9467bd"}


def load(out, name, kind):
    path = os.path.join(out, f"{name}.{kind}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def metrics(out, name):
    """Every scalar of one run, keyed by a short name; None when the run is missing."""
    ppl, pk, ent = (load(out, name, k) for k in ("ppl", "passkey", "entropy"))
    if ppl is None or pk is None or ent is None:
        return None
    m = {}
    for r in ppl["models"][0]["lengths"]:
        m[("ppl", r["length"])] = r["ppl"]
        for b in r["bands"]:
            m[("band", r["length"], b["start"], b["end"])] = b["ppl"]
    cells = pk["models"][0]["cells"]
    for L in sorted({c["length"] for c in cells}):
        row = [c for c in cells if c["length"] == L]
        m[("pk", L)] = 100 * sum(c["correct"] for c in row) / sum(c["trials"] for c in row)
        for c in row:
            m[("pkd", L, c["depth"])] = 100 * c["accuracy"]
    e = ent["entropy"]
    for li, layer in enumerate(e["layers"]):
        for p, h in zip(e["positions"], layer):
            m[("ent", li, p)] = h
    m["uniform"] = dict(zip(e["positions"], e["uniform"]))
    tune = load(out, name, "tune")
    if tune:
        m[("loss0",)] = tune["first_loss"]
        m[("loss1",)] = tune["last_loss"]
        m[("secs",)] = tune["seconds"]
    return m


class Stat:
    """Mean, sample standard deviation and range of one number over seeds."""

    def __init__(self, xs):
        self.xs = xs
        self.n = len(xs)
        self.mean = statistics.fmean(xs)
        self.sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        self.lo, self.hi = min(xs), max(xs)

    def fmt(self, digits=2):
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def stat(runs, key):
    xs = [r[key] for r in runs if key in r]
    return Stat(xs) if xs else None


def table(head, rows):
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


# ---- SVG (a small line plot with min..max error bars, optionally log y, several panels) ----

def svg_panel(o, x0, y0, w, h, title, xs, series, xlabels=None, log_y=False, ylabel="", ylim=None):
    """series: [(label, color, [(x, mean, lo, hi) or None], dashed)]; draws into list `o`."""
    vals = [v for _, _, pts, _ in series for p in pts if p for v in p[1:]]
    lo, hi = ylim or (min(vals), max(vals))
    f = (lambda v: math.log(max(v, 1e-9))) if log_y else (lambda v: v)
    flo, fhi = f(lo), f(hi)
    pad = 0.06 * (fhi - flo + 1e-9)
    flo, fhi = flo - pad, fhi + pad
    xmin, xmax = min(xs), max(xs)
    X = lambda x: x0 + w * (x - xmin) / (xmax - xmin or 1)
    Y = lambda v: y0 + h * (1 - (f(v) - flo) / (fhi - flo))
    o.append(f'<text x="{x0 + w / 2}" y="{y0 - 8}" text-anchor="middle" font-size="13">{title}</text>')
    o.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="black"/>')
    for k in range(5):
        fv = flo + (fhi - flo) * k / 4
        v = math.exp(fv) if log_y else fv
        o.append(f'<line x1="{x0}" y1="{Y(v):.1f}" x2="{x0 + w}" y2="{Y(v):.1f}" stroke="#e0e0e0"/>')
        o.append(f'<text x="{x0 - 5}" y="{Y(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.3g}</text>')
    for i, x in enumerate(xs):
        lab = xlabels[i] if xlabels else f"{x:g}"
        o.append(f'<text x="{X(x):.1f}" y="{y0 + h + 14}" text-anchor="middle" font-size="10">{lab}</text>')
    if ylabel:
        o.append(f'<text x="{x0 - 40}" y="{y0 + h / 2}" text-anchor="middle" font-size="11" '
                 f'transform="rotate(-90 {x0 - 40} {y0 + h / 2})">{ylabel}</text>')
    for label, color, pts, dashed in series:
        pts = [p for p in pts if p]
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        d = " ".join(f"{X(x):.1f},{Y(m):.1f}" for x, m, _, _ in pts)
        o.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>')
        for x, m, l, u in pts:
            if u > l:
                o.append(f'<line x1="{X(x):.1f}" y1="{Y(l):.1f}" x2="{X(x):.1f}" y2="{Y(u):.1f}" stroke="{color}"/>')
                for yy in (l, u):
                    o.append(f'<line x1="{X(x) - 3:.1f}" y1="{Y(yy):.1f}" x2="{X(x) + 3:.1f}" y2="{Y(yy):.1f}" stroke="{color}"/>')
            o.append(f'<circle cx="{X(x):.1f}" cy="{Y(m):.1f}" r="2.5" fill="{color}"/>')


def svg_write(path, w, h, title, body, legend):
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="15">{title}</text>']
    o += body
    for j, (label, color, dashed) in enumerate(legend):
        ly = 50 + 18 * j
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        o.append(f'<line x1="{w - 230}" y1="{ly}" x2="{w - 205}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>')
        o.append(f'<text x="{w - 200}" y="{ly + 4}">{label}</text>')
    o.append("</svg>")
    with open(path, "w") as fh:
        fh.write("\n".join(o) + "\n")


def point(x, s):
    return (x, s.mean, s.lo, s.hi) if s else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--seeds", default="1 2 3")
    ap.add_argument("--methods", default="eabf abf eabf-step yarn pi ntk-by-parts")
    ap.add_argument("--samples", default="100")
    a = ap.parse_args()
    out, c = a.out, a.window
    seeds, methods = a.seeds.split(), a.methods.split()
    base = metrics(out, "base")
    runs = {"base": [base]}
    for m in methods:
        rs = [metrics(out, f"{m}-s{s}") for s in seeds]
        runs[m] = [r for r in rs if r]
    names = [n for n in ["base"] + methods if runs[n]]
    lengths = sorted(k[1] for k in base if k[0] == "ppl")
    L = lengths[-1]
    bands = sorted({(k[2], k[3]) for k in base if k[0] == "band" and k[1] == L})
    depths = sorted({k[2] for k in base if k[0] == "pkd" and k[1] == L})
    n_seeds = {n: len(runs[n]) for n in names}
    print(f"# Experiment: fixtures/kjv-passkey (window {c}) fine-tuned to {4 * c}\n")
    print("Every fine-tuned entry: mean ± sample standard deviation over the fine-tune seeds "
          f"({', '.join(f'{n}: {n_seeds[n]}' for n in methods if n in n_seeds)} seeds); the base "
          "model is one fixed model.\n")

    print(f"## Perplexity on the held-out Gospel of John by evaluation length (lower is better)\n")
    table(["method"] + [f"{x} ({x // c}x)" for x in lengths] + ["fine-tune loss"],
          [[LABELS.get(n, n)] + [stat(runs[n], ("ppl", x)).fmt() for x in lengths]
           + ([f'{stat(runs[n], ("loss0",)).mean:.3f} -> {stat(runs[n], ("loss1",)).fmt(3)}'] if n != "base" else ["-"])
           for n in names])
    print(f"## Perplexity at {L} tokens by position band of the predicted token\n")
    table(["method"] + [f"{s}-{e}" for s, e in bands],
          [[LABELS.get(n, n)] + [stat(runs[n], ("band", L, s, e)).fmt() for s, e in bands] for n in names])
    print("## Passkey accuracy (%) by prompt length, mean over depths (6 keys x 5 depths a length)\n")
    table(["method"] + [f"{x} ({x // c}x)" for x in lengths],
          [[LABELS.get(n, n)] + [stat(runs[n], ("pk", x)).fmt(1) for x in lengths] for n in names])
    for x in lengths[2:]:
        print(f"### Passkey accuracy (%) at {x} tokens by depth of the key (0 = first, 1 = last)\n")
        table(["method"] + [f"{d:g}" for d in depths],
              [[LABELS.get(n, n)] + [stat(runs[n], ("pkd", x, d)).fmt(1) for d in depths] for n in names])

    uniform = base["uniform"]
    positions = sorted(uniform)
    layers = sorted({k[1] for k in base if k[0] == "ent"})
    p_last = positions[-1]
    print(f"## Attention entropy (nats) by layer at query position {p_last} (n = {p_last + 1}, "
          f"uniform ln n = {uniform[p_last]:.2f}); mean over 4 windows of 1024 held-out tokens\n")
    table(["method"] + [f"layer {li}" for li in layers],
          [[LABELS.get(n, n)] + [stat(runs[n], ("ent", li, p_last)).fmt() for li in layers] for n in names])

    # which differences exceed the spread (ranges over seeds that do not overlap)
    print("## Which differences exceed the spread\n")
    print("A difference is stated below only when the two methods' ranges over the seeds (min..max) "
          "do not overlap; with 3 seeds that is a sign of a real difference, not a significance test. "
          "Pairs not listed are within the spread.\n")
    keys = [(("ppl", x), f"perplexity at {x}", False) for x in lengths[1:]] + \
           [(("band", L, s, e), f"perplexity at {L}, band {s}-{e}", False) for s, e in bands[-2:]] + \
           [(("pk", x), f"passkey accuracy at {x}", True) for x in lengths[1:]]
    # a spread needs at least two seeds
    fine = [n for n in methods if len(runs.get(n, [])) >= 2]
    short = [n for n in methods if 0 < len(runs.get(n, [])) < 2]
    if short:
        print(f"(Left out, fewer than 2 seeds: {', '.join(short)}.)\n")
    for key, what, higher in keys:
        lines = []
        for i, p in enumerate(fine):
            for q in fine[i + 1:]:
                sp, sq = stat(runs[p], key), stat(runs[q], key)
                if sp.hi < sq.lo or sq.hi < sp.lo:
                    better, worse = (p, q) if (sp.mean > sq.mean) == higher else (q, p)
                    sb, sw = stat(runs[better], key), stat(runs[worse], key)
                    lines.append(f"{better} ({sb.fmt(1 if higher else 2)}) better than {worse} ({sw.fmt(1 if higher else 2)})")
        sb = stat(runs["base"], key).mean
        beats = [n for n in fine if (stat(runs[n], key).lo > sb if higher else stat(runs[n], key).hi < sb)]
        print(f"- **{what}**: " + ("; ".join(lines) if lines else "no pair of methods differs beyond the spread")
              + f". Better than the base ({sb:.2f}) at every seed: {', '.join(beats) or 'none'}.")
    print()

    # data efficiency
    counts = [int(x) for x in a.samples.split()]
    if len(counts) > 1:
        print("## Data efficiency (the paper's Table 5 in miniature): 2 epochs each\n")
        ppl_at = [lengths[0]] + lengths[2:]  # within the window, then the tuned and doubled lengths
        head = ["method", "samples", "steps"] + [f"ppl {x}" for x in ppl_at] + [f"passkey {x}" for x in lengths]
        rows = []
        for m in ("eabf", "abf"):
            for n in counts:
                rs = [metrics(out, f"{m}-s{s}" if n == 100 else f"{m}-n{n}-s{s}") for s in seeds]
                rs = [r for r in rs if r]
                if not rs:
                    continue
                # the optimizer steps the runs made (abf-tune's report), not a formula of the batch
                done = {load(out, f"{m}-s{s}" if n == 100 else f"{m}-n{n}-s{s}", "tune").get("steps_done")
                        for s in seeds
                        if load(out, f"{m}-s{s}" if n == 100 else f"{m}-n{n}-s{s}", "tune")}
                steps = "/".join(str(x) for x in sorted(d for d in done if d is not None)) or "?"
                rows.append([LABELS[m], str(n), str(steps)] + [stat(rs, ("ppl", x)).fmt() for x in ppl_at]
                            + [stat(rs, ("pk", x)).fmt(1) for x in lengths])
        table(head, rows)

    # plots
    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    legend = [(LABELS.get(n, n), COLORS.get(n, "#000"), n == "base") for n in names]
    xs = list(range(len(lengths)))
    for fname, title, key, log_y, ylab, ylim in [
        ("ppl-by-length.svg", f"Held-out perplexity vs length (window {c}, tuned to {4 * c}); bars: min..max over seeds",
         lambda x: ("ppl", x), True, "perplexity (log)", None),
        ("passkey-by-length.svg", "Passkey accuracy vs prompt length; bars: min..max over seeds",
         lambda x: ("pk", x), False, "accuracy (%)", (0, 100)),
    ]:
        body = []
        series = [(n, COLORS.get(n, "#000"), [point(i, stat(runs[n], key(x))) for i, x in enumerate(lengths)], n == "base")
                  for n in names]
        svg_panel(body, 70, 50, 520, 330, "", xs, series, [str(x) for x in lengths], log_y, ylab, ylim)
        svg_write(os.path.join(pdir, fname), 860, 420, title, body, legend)
    body = []
    series = [(n, COLORS.get(n, "#000"), [point(i, stat(runs[n], ("band", L, s, e))) for i, (s, e) in enumerate(bands)], n == "base")
              for n in names]
    svg_panel(body, 70, 50, 520, 330, "", list(range(len(bands))), series, [f"{s}-{e}" for s, e in bands], True, "perplexity (log)")
    svg_write(os.path.join(pdir, "ppl-by-band.svg"), 860, 420, f"Perplexity by position band at {L} tokens; bars: min..max over seeds", body, legend)
    # figure 1: entropy by layer against ln n, one panel a layer, the uniform ln n dashed
    body = []
    lnn = [math.log(p + 1) for p in positions]
    cols = 3
    pw, ph = 230, 170
    for j, li in enumerate(layers):
        x0, y0 = 60 + (j % cols) * (pw + 70), 60 + (j // cols) * (ph + 60)
        series = [(n, COLORS.get(n, "#000"), [point(lnn[i], stat(runs[n], ("ent", li, p))) for i, p in enumerate(positions)], n == "base")
                  for n in names]
        series.append(("uniform", "#999999", [(lnn[i], uniform[p], uniform[p], uniform[p]) for i, p in enumerate(positions)], True))
        allv = [0.0] + [uniform[p] for p in positions]
        svg_panel(body, x0, y0, pw, ph, f"layer {li}", lnn, series, [f"{v:.1f}" for v in lnn], False,
                  "entropy (nats)" if j % cols == 0 else "", (min(allv), max(allv)))
    rows = math.ceil(len(layers) / cols)
    svg_write(os.path.join(pdir, "entropy-by-layer.svg"), 60 + cols * (pw + 70) + 240, 80 + rows * (ph + 60),
              "Attention entropy against ln n (x axis), by layer; dashed: uniform attention", body,
              legend + [("uniform (ln n)", "#999999", True)])
    print(f"Plots: {pdir}/ppl-by-length.svg, ppl-by-band.svg, passkey-by-length.svg, entropy-by-layer.svg "
          "(points: mean over seeds; bars: min..max).")


if __name__ == "__main__":
    main()
