#!/usr/bin/env python3
"""Markdown tables of the bytes frontier from `dynakv eval sweep` JSON lines:
every cell (KV bytes per token as a fraction of an f16 dense cache, PPL ratio
to the f32 full cache), the Pareto set (no other cell has both fewer bytes
and a lower PPL ratio), and the best cell at or under each byte level, with the best one that uses no
DynaKV (quantisation and SnapKV only).

Bytes are taken at the compression point (`kv_fraction_f16_prefill`) when a
cell reports it (runs with --score-last), else at the end of the window.

Usage: python3 tools/frontier_table.py frontier.jsonl [--levels 0.25,0.12,0.06,0.03]
"""
import json
import sys


def main():
    args = sys.argv[1:]
    levels = [0.25, 0.12, 0.06, 0.03]
    if "--levels" in args:
        i = args.index("--levels")
        levels = [float(x) for x in args[i + 1].split(",")]
        del args[i:i + 2]
    cells = [json.loads(line) for path in args for line in open(path) if line.strip()]
    full = next(c["ppl"] for c in cells if c["label"] == "full")
    rows = []
    for c in cells:
        x = c.get("kv_fraction_f16_prefill")
        if x is None:
            x = c["kv_fraction_f16"]
        rows.append((x, c["ppl"] / full, c["label"], c["cache"]))
    rows.sort()
    print("| cell | KV bytes / f16 dense | PPL ratio | Pareto |")
    print("|---|---|---|---|")
    pareto = set()
    best = float("inf")
    for x, r, label, _ in rows:
        if r < best:
            best = r
            pareto.add(label)
    for x, r, label, cache in rows:
        mark = "yes" if label in pareto else ""
        print(f"| `{cache}` | {100 * x:.2f}% | {r:.3f} | {mark} |")
    print()
    print("| at or under | best cell | bytes | PPL ratio | best without DynaKV | bytes | PPL ratio |")
    print("|---|---|---|---|---|---|---|")
    for lv in levels:
        under = [row for row in rows if row[0] <= lv]
        if not under:
            print(f"| {100 * lv:g}% | – | | | | | |")
            continue
        b = min(under, key=lambda row: row[1])
        dk = [row for row in under if "dynakv" not in row[3]]
        d = min(dk, key=lambda row: row[1]) if dk else None
        dcell = f"`{d[3]}` | {100 * d[0]:.2f}% | {d[1]:.3f}" if d else "– | | "
        print(f"| {100 * lv:g}% | `{b[3]}` | {100 * b[0]:.2f}% | {b[1]:.3f} | {dcell} |")


main()
