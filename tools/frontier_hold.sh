#!/usr/bin/env bash
# The frontier cells the budget promise moves, re-run with it (`track`, the
# default): DynaKV alone and SnapKV + DynaKV compositions, under the
# protocol of tools/frontier_sweep.sh (Brown eval, ctx 1024, 8 windows, last
# 512 tokens scored after a 512-token prefill). With the fitted point alone
# (`open`, every cell of docs/frontier-ctx1024.jsonl) DynaKV kept 0.74-0.77
# of the dimensions of the tokens SnapKV kept for budgets of 0.47-0.70;
# held, it keeps the budget, so the same spec holds fewer bytes.
#   tools/frontier_hold.sh ARTIFACT OUT.jsonl ; python3 tools/frontier_table.py OUT.jsonl
set -euo pipefail
A=$1
OUT=$2
D=${DYNAKV:-target/release/dynakv}
COMMON="--artifact $A --ctx 1024 --windows 8 --score-last 512 --out $OUT --resume --budget-hold track"
$D eval sweep $COMMON --kv-dtypes f16 --latent-dtypes mixed,int4 --policies energy \
  --budgets 0.85,0.70 --snapkv ""
$D eval sweep $COMMON --kv-dtypes f16 --latent-dtypes mixed,int4 --policies energy \
  --budgets 0.85,0.70,0.47 --snapkv 0.75,0.875 --snapkv-preset recall --snapkv-layer-max \
  --recent-full 32
# the learned router (ROUTER: an artifact from `dynakv train`, at its target)
if [ -n "${ROUTER:-}" ]; then
  $D eval sweep $COMMON --kv-dtypes f16 --latent-dtypes f16,int8,int4,mixed \
    --budgets "" --router "$ROUTER" --snapkv ""
fi
