#!/usr/bin/env bash
# The bytes frontier of docs/results.md ("The bytes frontier"): every cell
# under one protocol (Brown eval, ctx 1024, 8 windows, the last 512 tokens
# scored after a 512-token prefill, so SnapKV compresses a prompt), all into
# one JSON-lines file (--resume skips cells already there), then the tables:
#   python3 tools/frontier_table.py OUT
# Usage: tools/frontier_sweep.sh ARTIFACT OUT   (ARTIFACT from `dynakv calibrate`)
set -euo pipefail
A=$1
OUT=$2
D=${DYNAKV:-target/release/dynakv}
COMMON="--artifact $A --ctx 1024 --windows 8 --score-last 512 --out $OUT --resume"
# dense dtypes; DynaKV energy x latent dtypes
$D eval sweep $COMMON --kv-dtypes f16,q8_0,q4_0,q8_0/q4_0 --latent-dtypes f16,int8,int4 \
  --policies energy --budgets 0.47,0.30,0.20 --snapkv ""
# SnapKV recall alone x dense dtypes
$D eval sweep $COMMON --kv-dtypes f16,q8_0,q4_0 --budgets "" --snapkv 0.5,0.75,0.875,0.9375 \
  --snapkv-preset recall
# SnapKV recall (layer-max) + DynaKV energy, recent 32, int8 / int4 latents
$D eval sweep $COMMON --kv-dtypes f16 --latent-dtypes int8,int4 --policies energy --budgets 0.47,0.30 \
  --snapkv 0.75,0.875 --snapkv-preset recall --snapkv-layer-max --recent-full 32
# higher budgets, mixed latents, KIVI 2-bit
$D eval sweep $COMMON --kv-dtypes f16,kivi2,q8_0/kivi2 --latent-dtypes int4,mixed --policies energy \
  --budgets 0.85,0.70,0.47,0.30 --snapkv ""
$D eval sweep $COMMON --kv-dtypes kivi2 --budgets "" --snapkv 0.75,0.875 --snapkv-preset recall
# per-coordinate (channel) latent scales
$D eval sweep $COMMON --kv-dtypes f16 --latent-dtypes int8,int4 --latent-scales channel \
  --policies energy --budgets 0.47,0.30 --snapkv ""
# compositions with mixed latents, and the plot of every cell
$D eval sweep $COMMON --kv-dtypes f16 --latent-dtypes mixed --policies energy --budgets 0.70,0.47 \
  --snapkv 0.75,0.875 --snapkv-preset recall --snapkv-layer-max --recent-full 32 \
  --plot "${OUT%.jsonl}.svg"
