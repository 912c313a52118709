#!/usr/bin/env python3
"""Ratio tables from criterion's saved estimates (`cargo bench` output).

Reads `target/criterion/<group>/**/new/{benchmark,estimates}.json` and prints
one markdown table per group: a row per benchmark function, a column per
parameter (e.g. cached tokens T), each cell the median time and, in brackets,
baseline time / this time (above 1 = faster than the baseline, which is the
function named by --baseline, measured in the same run).

    python3 tools/criterion_table.py decode_attention append_one_token \
        --baseline dense [--root target/criterion]
"""

import argparse
import json
import os
from collections import OrderedDict


def fmt(ns):
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.0f} µs"
    return f"{ns:.0f} ns"


def load(root, group):
    """{function: {parameter: median ns}} for one group."""
    out = OrderedDict()
    base = os.path.join(root, group)
    for dirpath, _, files in sorted(os.walk(base)):
        if not dirpath.endswith(os.sep + "new") or "benchmark.json" not in files:
            continue
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)
        func = bench.get("function_id") or bench["full_id"]
        param = bench.get("value_str") or ""
        out.setdefault(func, {})[param] = est["median"]["point_estimate"]
    return out


def table(group, data, baseline):
    params = sorted({p for v in data.values() for p in v}, key=lambda p: (len(p), p))
    base = data.get(baseline, {})
    print(f"### {group}\n")
    print("| bench | " + " | ".join(params) + " |")
    print("|---|" + "---|" * len(params))
    for func, cells in data.items():
        row = []
        for p in params:
            t = cells.get(p)
            if t is None:
                row.append("–")
            elif func != baseline and p in base:
                row.append(f"{fmt(t)} ({base[p] / t:.2f})")
            else:
                row.append(fmt(t))
        print(f"| {func} | " + " | ".join(row) + " |")
    print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("groups", nargs="+")
    ap.add_argument("--baseline", default="dense")
    ap.add_argument("--root", default="target/criterion")
    a = ap.parse_args()
    for g in a.groups:
        data = load(a.root, g)
        if not data:
            raise SystemExit(f"no criterion results for group {g} under {a.root}")
        table(g, data, a.baseline)


if __name__ == "__main__":
    main()
