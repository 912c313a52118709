#!/usr/bin/env python3
"""Pivots the JSON lines written by tools/dynakv_ppl_table.py into one
markdown table: a row per basis/placement and policy, a column per budget,
each cell `PPL ratio (retained, true MB)`.

Usage: python3 tools/results_table.py t1024.jsonl [--energy-extra "--energy-rule lagrange --key-factor 2"]
"""
import argparse
import json

p = argparse.ArgumentParser()
p.add_argument("jsonl")
p.add_argument("--energy-extra", default="--energy-rule lagrange --key-factor 2",
               help="the extra arguments that mark the default energy policy's cells")
p.add_argument("--budgets", default="0.47,0.30,0.20,0.12")
a = p.parse_args()

rows = [json.loads(l) for l in open(a.jsonl)]
full = {}
cells = {}
for r in rows:
    parts = r["key"].split()
    if parts[0] == "full":
        full[" ".join(parts[1:])] = r
        continue
    art, pol, budget = parts[0], parts[1], parts[2]
    if "snapkv" in parts:
        continue
    extra = " ".join(p for p in parts[3:] if not p.startswith(("ctx=", "windows=", "split=", "skip=")))
    if pol == "energy":
        if extra != a.energy_extra:
            continue
    elif extra:
        continue
    cells[(art, pol, budget)] = r


def full_ppl(r):
    base = " ".join(r["key"].split()[3:])
    return full[base]["ppl"]


budgets = a.budgets.split(",")
arts = []
for (art, _, _) in cells:
    if art not in arts:
        arts.append(art)
print("| basis / placement | policy | " + " | ".join(f"budget {b}" for b in budgets) + " |")
print("|---|---|" + "---|" * len(budgets))
for art in arts:
    basis, _, place = art.rpartition("-")
    for pol in ["uniform", "per-layer", "energy"]:
        out = []
        for b in budgets:
            r = cells.get((art, pol, b))
            if r is None:
                out.append("–")
            else:
                out.append(f"{r['ppl'] / full_ppl(r):.3f} ({r['retained']:.3f}, {r['bytes'] / 1e6:.1f})")
        print(f"| {basis} / {place} | {pol} | " + " | ".join(out) + " |")
