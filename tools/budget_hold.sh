#!/usr/bin/env bash
# Retained fraction against the requested budget on Brown eval and three
# held-out texts of other kinds (mail, code, mixed), for the energy policy
# with each budget promise (open = the calibration fit alone, track,
# ceiling), and the full cache's PPL on each text for the ratio.
#
#   tools/budget_hold.sh ARTIFACT OUT.jsonl [WINDOWS] [CTX] [POLICY] [BUDGETS]
#
# POLICY: energy (default) or router (ARTIFACT from `dynakv train`, BUDGETS
# its target); BUDGETS: space-separated, default "0.3 0.47 0.7".
#
# One JSON object per line: `dynakv eval ppl --json`'s report plus text,
# budget and hold. Summarise with tools/budget_hold_table.py OUT.jsonl.
set -euo pipefail
art=${1:?artifact}
out=${2:?out.jsonl}
windows=${3:-4}
ctx=${4:-1024}
policy=${5:-energy}
budgets=${6:-0.3 0.47 0.7}
bin=${DYNAKV_BIN:-target/release/dynakv}
: > "$out"
tag() { python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r.update(json.loads(sys.argv[1])); print(json.dumps(r))' "$1"; }
for text in brown mail code mixed; do
  "$bin" eval ppl --corpus "$text" --ctx "$ctx" --max-windows "$windows" --json \
    | tag "{\"text\":\"$text\",\"budget\":1.0,\"hold\":\"full\"}" >> "$out"
  for budget in $budgets; do
    for hold in open track ceiling; do
      "$bin" eval ppl --corpus "$text" --ctx "$ctx" --max-windows "$windows" --json \
        --cache dynakv --artifact "$art" --policy "$policy" --budget "$budget" --budget-hold "$hold" \
        | tag "{\"text\":\"$text\",\"budget\":$budget,\"hold\":\"$hold\",\"policy\":\"$policy\"}" >> "$out"
    done
  done
done
