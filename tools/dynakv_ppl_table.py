#!/usr/bin/env python3
"""Runs `dynakv eval ppl --json` over policies x budgets for given artifacts and
prints a markdown table (PPL, ratio to the full cache, retained, true bytes).
Results are appended to a JSON-lines file so a rerun skips finished cells.

Usage:
  python3 tools/dynakv_ppl_table.py --artifacts pca-pre.safetensors [...] \
      --policies uniform,per-layer,energy --budgets 0.47,0.30,0.20,0.12 \
      --ctx 1024 --windows 4 --out results.jsonl

With --snapkv 0.5,0.75 every cell is also run with SnapKV at those ratios (and
SnapKV alone on the full cache); use it with --extra "--score-last N" so the
cache is pruned before the scored tokens (docs/protocol.md). The table then
also shows the retained fraction at the compression point.
"""
import argparse
import json
import os
import subprocess

p = argparse.ArgumentParser()
p.add_argument("--artifacts", nargs="+", default=[])
p.add_argument("--policies", default="uniform,per-layer,energy")
p.add_argument("--budgets", default="0.47,0.30,0.20,0.12")
p.add_argument("--ctx", type=int, default=1024)
p.add_argument("--windows", type=int, default=4)
p.add_argument("--split", default="eval")
p.add_argument("--skip-windows", type=int, default=0)
p.add_argument("--extra", default="", help="extra arguments for dynakv eval ppl")
p.add_argument("--dynakv-extra", default="", help="extra arguments for the DynaKV cells only (e.g. --key-factor 16)")
p.add_argument("--snapkv", default="", help="comma-separated SnapKV ratios")
p.add_argument("--artifact-free", action="store_true", help="only the full cache (+ SnapKV)")
p.add_argument("--bin", default="target/release/dynakv")
p.add_argument("--out", required=True)
a = p.parse_args()

done = {}
if os.path.exists(a.out):
    for line in open(a.out):
        r = json.loads(line)
        done[r["key"]] = r


def run(key, args):
    if key in done:
        return done[key]
    cmd = [a.bin, "eval", "ppl", "--json", "--split", a.split, "--ctx", str(a.ctx),
           "--max-windows", str(a.windows), "--skip-windows", str(a.skip_windows)] + args + a.extra.split()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    r["key"] = key
    r["command"] = " ".join(cmd)
    with open(a.out, "a") as f:
        f.write(json.dumps(r) + "\n")
    done[key] = r
    return r


base = f"ctx={a.ctx} windows={a.windows} split={a.split} skip={a.skip_windows} {a.extra}"
full = run("full " + base, ["--cache", "full"])
print(f"full cache: PPL {full['ppl']:.3f} ({full['tokens']} predicted tokens)\n")
print("| cache | policy | budget | snapkv r | retained at prefill | retained | PPL | ratio | true MB (dense MB) |")
print("|---|---|---|---|---|---|---|---|---|")
snap = [x for x in a.snapkv.split(",") if x]


def row(name, pol, b, r, res):
    at = res.get("retained_prefill")
    at = f"{at:.3f}" if at is not None else "-"
    print(f"| {name} | {pol} | {b} | {r} | {at} | {res['retained']:.3f} | {res['ppl']:.3f} | "
          f"{res['ppl'] / full['ppl']:.3f} | {res['bytes'] / 1e6:.1f} ({res['bytes_full'] / 1e6:.1f}) |",
          flush=True)


row("full", "-", "-", "-", full)
for r in snap:
    row("full", "-", "-", r, run(f"full snapkv {r} {base}", ["--cache", "full", "--snapkv", r]))
for art in ([] if a.artifact_free else a.artifacts):
    name = os.path.basename(art).replace(".safetensors", "")
    for pol in a.policies.split(","):
        for b in a.budgets.split(","):
            args = ["--cache", "dynakv", "--artifact", art, "--policy", pol, "--budget", b] + a.dynakv_extra.split()
            for r in ["-"] + snap:
                tag = f"{name} {pol} {b} {a.dynakv_extra}".strip()
                if r == "-":
                    res = run(f"{tag} {base}", args)
                else:
                    res = run(f"{tag} snapkv {r} {base}", args + ["--snapkv", r])
                row(name, pol, b, r, res)
