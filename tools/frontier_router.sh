#!/usr/bin/env bash
# The learned router in the frontier (issue 15, item 4), budget held, under
# the protocol of tools/frontier_sweep.sh (Brown eval, ctx 1024, 8 windows,
# the last 512 tokens scored after a 512-token prefill): the router alone
# with f16 / int8 / int4 / mixed latents, and under SnapKV recall 0.75 /
# 0.875 (layer-max votes, the last 32 tokens whole) with mixed / int4.
#   tools/frontier_router.sh CALIBRATION_ARTIFACT ROUTER_ARTIFACT OUT.jsonl [--snapkv-too]
# ROUTER_ARTIFACT: from `dynakv train` (then `--stage e2e`), at its target.
set -euo pipefail
A=$1
R=$2
OUT=$3
D=${DYNAKV:-target/release/dynakv}
COMMON="--artifact $A --ctx 1024 --windows 8 --score-last 512 --out $OUT --resume --budget-hold ${HOLD:-track}"
$D eval sweep $COMMON --kv-dtypes f16 --latent-dtypes f16,int8,int4,mixed --budgets "" --router "$R" --snapkv ""
if [ "${4:-}" = "--snapkv-too" ]; then
  $D eval sweep $COMMON --kv-dtypes f16 --latent-dtypes mixed,int4 --budgets "" --router "$R" \
    --snapkv 0.75,0.875 --snapkv-preset recall --snapkv-layer-max --recent-full 32
fi
