#!/usr/bin/env python3
"""Markdown table of tools/budget_hold.sh's output: retained fraction for
each text, budget and promise, and PPL as a ratio to the full cache on the
same text.

    python3 tools/budget_hold_table.py OUT.jsonl
"""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]


def presets_table(rows):
    """tools/budget_hold_presets.sh's output: the composed presets."""
    texts = list(dict.fromkeys(r["text"] for r in rows))
    full = {r["text"]: r["ppl"] for r in rows if r["hold"] == "full"}
    print("| text | preset | hold | DynaKV of kept (prefill) | budget | KV bytes / f16 (prefill) | PPL ratio |")
    print("|---|---|---|---|---|---|---|")
    budgets = {"bytes-25": 0.7, "bytes-12": 0.7, "bytes-6": 0.7, "bytes-3": 0.47}
    for t in texts:
        for r in rows:
            if r["text"] != t or r["hold"] == "full":
                continue
            print(f"| {t} | {r['preset']} | {r['hold']} | {r['retained_kept_prefill']:.3f} | "
                  f"{budgets.get(r['preset'], float('nan'))} | "
                  f"{100 * r['kv_fraction_f16_prefill']:.2f}% | ×{r['ppl'] / full[t]:.3f} |")


if rows and "preset" in rows[0]:
    presets_table(rows)
    sys.exit(0)
texts = []
for r in rows:
    if r["text"] not in texts:
        texts.append(r["text"])
full = {r["text"]: r["ppl"] for r in rows if r["hold"] == "full"}
cells = {(r["text"], r["budget"], r["hold"]): r for r in rows if r["hold"] != "full"}
budgets = sorted({b for (_, b, _) in cells})
holds = ["open", "track", "ceiling"]

print("| text | full PPL | budget | " + " | ".join(f"retained {h}" for h in holds)
      + " | " + " | ".join(f"PPL ratio {h}" for h in holds) + " |")
print("|" + "---|" * (3 + 2 * len(holds)))
worst = {h: 0.0 for h in holds}
for t in texts:
    for b in budgets:
        rs, ps = [], []
        for h in holds:
            c = cells.get((t, b, h))
            if c is None:
                rs.append("–")
                ps.append("–")
                continue
            dev = c["retained"] - b
            worst[h] = max(worst[h], abs(dev)) if h != "ceiling" else max(worst[h], dev)
            rs.append(f"{c['retained']:.3f} ({dev:+.3f})")
            ps.append(f"×{c['ppl'] / full[t]:.3f}")
        print(f"| {t} | {full[t]:.2f} | {b} | " + " | ".join(rs) + " | " + " | ".join(ps) + " |")
print()
print("largest |retained - budget|: " + ", ".join(
    f"{h} {worst[h]:.4f}" for h in holds if h != "ceiling")
    + f"; largest excess over the budget under ceiling: {worst['ceiling']:+.4f}")
