#!/usr/bin/env python3
"""Long-context score (fraction of the full cache's) against KV bytes per
token as a fraction of an f16 dense cache (log x), one series per suite.

usage: tools/longctx_bytes_plot.py OUT.svg BYTES.csv NAME=RUNS.jsonl [NAME=RUNS.jsonl ...]

RUNS.jsonl: one `dynakv eval longctx --json` line per configuration (its
`cache` label and `relative` score). BYTES.csv: for each cache label, the
frontier file and cell whose `kv_fraction_f16_prefill` is its bytes (the PPL
protocol's figure for the same configuration), or `=` and a literal fraction
for a configuration the frontier does not hold (SnapKV alone in f16 holds
exactly 1 - r). Writes a plain SVG (no plotting library needed).
"""
import json
import math
import sys


def frontier_bytes(path, label):
    for line in open(path):
        r = json.loads(line)
        if r["label"] == label:
            return r.get("kv_fraction_f16_prefill") or r["kv_fraction_f16"]
    raise SystemExit(f"{path}: no cell `{label}`")


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    out, csv = sys.argv[1], sys.argv[2]
    bytes_of = {}
    for line in open(csv):
        if line.startswith("#") or not line.strip():
            continue
        cache, src, cell = line.rstrip("\n").split(",", 2)
        bytes_of[cache] = float(cell) if src == "=" else frontier_bytes(src, cell)
    series = []
    for arg in sys.argv[3:]:
        name, path = arg.split("=", 1)
        pts = []
        for line in open(path):
            r = json.loads(line)
            if r["cache"] not in bytes_of:
                raise SystemExit(f"{path}: no bytes for `{r['cache']}` in {csv}")
            pts.append((bytes_of[r["cache"]], r["relative"], r["cache"]))
        series.append((name, sorted(pts)))
    w, h, ml, mr, mt, mb = 900, 560, 70, 30, 40, 60
    xs = [p[0] for _, pts in series for p in pts]
    ys = [p[1] for _, pts in series for p in pts]
    x0, x1 = math.log10(min(xs) * 0.8), math.log10(max(xs) * 1.25)
    y0, y1 = 0.0, max(1.2, max(ys) * 1.05)
    X = lambda v: ml + (math.log10(v) - x0) / (x1 - x0) * (w - ml - mr)
    Y = lambda v: h - mb - (v - y0) / (y1 - y0) * (h - mt - mb)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w/2}" y="22" text-anchor="middle" font-size="15">Long-context retrieval against KV bytes (SmolLM2-135M, query-aware)</text>']
    for t in [0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0]:
        if x0 <= math.log10(t) <= x1:
            s.append(f'<line x1="{X(t):.1f}" y1="{mt}" x2="{X(t):.1f}" y2="{h-mb}" stroke="#ddd"/>')
            s.append(f'<text x="{X(t):.1f}" y="{h-mb+16}" text-anchor="middle">{t*100:g}%</text>')
    for k in range(0, int(y1 * 10) + 1, 2):
        t = k / 10
        s.append(f'<line x1="{ml}" y1="{Y(t):.1f}" x2="{w-mr}" y2="{Y(t):.1f}" stroke="{"#999" if t == 1 else "#eee"}"/>')
        s.append(f'<text x="{ml-8}" y="{Y(t)+4:.1f}" text-anchor="end">{t:g}</text>')
    s.append(f'<text x="{w/2}" y="{h-18}" text-anchor="middle">KV bytes per token, fraction of an f16 dense cache (log; PPL protocol at the compression point)</text>')
    s.append(f'<text x="18" y="{h/2}" text-anchor="middle" transform="rotate(-90 18 {h/2})">score / full cache score</text>')
    for i, (name, pts) in enumerate(series):
        c = colors[i % len(colors)]
        s.append(f'<text x="{w-mr-10}" y="{mt+18+16*i}" text-anchor="end" fill="{c}">● {name}</text>')
        for x, y, label in pts:
            s.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="5" fill="{c}" fill-opacity="0.7"><title>{label}: {x*100:.2f}%, {y:.3f}</title></circle>')
            short = label.replace("full+snapkv/recall/", "snapkv ").replace("+store:kv=", " ").replace("preset/", "")
            s.append(f'<text x="{X(x)+7:.1f}" y="{Y(y)-6-8*i:.1f}" fill="{c}" font-size="10">{short}</text>')
    s.append("</svg>")
    open(out, "w").write("\n".join(s))
    print(f"wrote {out}: {sum(len(p) for _, p in series)} points")


if __name__ == "__main__":
    main()
