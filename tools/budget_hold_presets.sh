#!/usr/bin/env bash
# The budget promise under SnapKV: the composed presets with the fitted point
# alone (open) and held (track, the default), on Brown eval and the three
# held-out texts, at the compression point (ctx 1024, last 512 tokens
# scored). `retained_kept_prefill` is DynaKV's own fraction of the tokens
# SnapKV kept; the full cache with the same protocol gives the PPL ratio.
#
#   tools/budget_hold_presets.sh ARTIFACT OUT.jsonl [WINDOWS]
#
# Summarise with tools/budget_hold_table.py OUT.jsonl.
set -euo pipefail
art=${1:?artifact}
out=${2:?out.jsonl}
windows=${3:-4}
bin=${DYNAKV_BIN:-target/release/dynakv}
: > "$out"
tag() { python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r.update(json.loads(sys.argv[1])); print(json.dumps(r))' "$1"; }
common=(--ctx 1024 --score-last 512 --max-windows "$windows" --json)
for text in brown mail code mixed; do
  "$bin" eval ppl --corpus "$text" "${common[@]}" \
    | tag "{\"text\":\"$text\",\"preset\":\"full\",\"hold\":\"full\"}" >> "$out"
  for preset in bytes-12 bytes-3; do
    for hold in open track; do
      "$bin" eval ppl --corpus "$text" "${common[@]}" --preset "$preset" \
        --artifact "$art" --budget-hold "$hold" \
        | tag "{\"text\":\"$text\",\"preset\":\"$preset\",\"hold\":\"$hold\"}" >> "$out"
    done
  done
done
