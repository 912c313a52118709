#!/usr/bin/env python3
"""The speed table of tools/speed_vs_llamacpp.sh: llama-bench and dynakv bench
side by side (tokens/s, ratio dynakv / llama.cpp), then the paired decode-step
ratios of the packed dense caches, DynaKV and the presets against the dense
f16 cache.

Usage: python3 tools/speed_table.py OUT_DIR
"""
import json
import os
import sys

out = sys.argv[1]


def jsonl(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# llama-bench: one object per test (n_prompt, n_gen, n_depth, avg_ts, and
# its settings); where a row ran with several settings (flash attention on
# and off), llama.cpp's faster one is compared
llama, setting = {}, {}
for r in jsonl("llama-bench.jsonl"):
    if r.get("n_gen", 0) > 0:
        key = ("decode", r.get("n_depth", 0))
    else:
        key = ("prefill", r["n_prompt"])
    if r["avg_ts"] > llama.get(key, 0):
        llama[key] = r["avg_ts"]
        setting[key] = f"fa {int(bool(r.get('flash_attn', 0)))}, repack {int(bool(r.get('repack', r.get('use_extra_bufts', 1))))}"

ours = {}
for line in jsonl("dynakv.jsonl"):
    for r in line if isinstance(line, list) else line.get("runs", []):
        if r["what"] == "prefill" and r["tokens"] > 1:
            ours[("prefill", r["tokens"])] = r["tokens_per_s"]
        elif r["what"] == "decode":
            depth = 0 if r["context"] <= 1 else r["context"]
            ours[("decode", depth)] = r["tokens_per_s"]

print("| measurement | dynakv tok/s | llama.cpp tok/s | ratio | llama.cpp setting |")
print("|---|---|---|---|---|")
for key in sorted(set(llama) | set(ours), key=lambda k: (k[0] != "prefill", k[1])):
    what, n = key
    label = f"prefill {n:,}" if what == "prefill" else f"decode at depth {n:,}"
    a, b = ours.get(key), llama.get(key)
    ratio = f"{a / b:.2f}x" if a and b else "-"
    fa = f"{a:.1f}" if a else "-"
    fb = f"{b:.1f}" if b else "-"
    print(f"| {label} | {fa} | {fb} | {ratio} | {setting.get(key, '-')} |")

paired = jsonl("paired.jsonl")
if paired:
    print()
    print("| decode step at depth | cache | speed ratio (dense f16 step time / its step time; above 1: faster than dense f16) |")
    print("|---|---|---|")
    head = None
    for r in paired:
        if "policy" in r:
            head = r
            continue
        p = r.get("paired", {})
        print(f"| {head['depth']:,} | {head['policy']} | {p['speed_ratio']:.3f} |")
