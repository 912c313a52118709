#!/usr/bin/env python3
"""Markdown table of `dynakv eval longctx --json` reports.

Each argument is one report (one cache configuration at one or more prompt
lengths). Rows: configurations; columns: every kept task x length cell
(correct/n), then the suite score over the kept cells, its fraction of the
full cache's, and the mean retained fraction. Reports of the same
configuration at different lengths are merged into one row.

    python3 tools/longctx_table.py lc/snap-qa-1024.json lc/snap-qa-2048.json ...
"""

import json
import sys
from collections import OrderedDict


def label(report):
    qa = " (query-aware)" if report["query_aware"] else ""
    return report["cache"] + qa


def main(paths):
    rows = OrderedDict()
    kept_cells = OrderedDict()
    dropped = OrderedDict()
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        row = rows.setdefault(label(r), {"cells": {}, "full": {}, "retained": []})
        for c in r["kept"]:
            key = (c["task"], c["length"])
            kept_cells[key] = True
            row["full"][key] = c
        for c in r["dropped"]:
            dropped[(c["task"], c["length"])] = c
        for c in r["cells"]:
            row["cells"][(c["task"], c["length"])] = c
        row["retained"] += [o["retained"] for o in r["outcomes"]]
    keys = sorted(kept_cells, key=lambda k: (k[1], k[0]))
    head = ["cache"] + [f"{t} {l}" for t, l in keys] + ["score", "of full", "retained"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    full = {}
    for row in rows.values():
        full.update(row["full"])
    print(
        "| full | "
        + " | ".join(f"{full[k]['correct']}/{full[k]['n']}" for k in keys)
        + f" | {sum(full[k]['score'] for k in keys) / len(keys):.3f} | 100% | 1.000 |"
    )
    for name, row in rows.items():
        if name == "full":
            continue
        cells = [row["cells"].get(k) for k in keys]
        have = [(k, c) for k, c in zip(keys, cells) if c is not None]
        score = sum(c["score"] for _, c in have) / max(len(have), 1)
        score_full = sum(full[k]["score"] for k, _ in have) / max(len(have), 1)
        ret = sum(row["retained"]) / max(len(row["retained"]), 1)
        print(
            f"| {name} | "
            + " | ".join("–" if c is None else f"{c['correct']}/{c['n']}" for c in cells)
            + f" | {score:.3f} | {100 * score / score_full:.0f}% | {ret:.3f} |"
        )
    if dropped:
        print()
        print(
            "Dropped (full cache below the threshold): "
            + ", ".join(f"{t} {l} ({c['correct']}/{c['n']})" for (t, l), c in sorted(dropped.items(), key=lambda x: (x[0][1], x[0][0])))
        )


if __name__ == "__main__":
    main(sys.argv[1:])
