#!/usr/bin/env bash
# Long-context suite at 4k (passkey and codeword, the cells the full cache
# keeps there; depths 0.1..0.9) for the small presets and the baselines at
# <= the same bytes: the ">= 94% at <= 4% of f16 bytes" target of issue 15.
# usage: tools/longctx_4k.sh ARTIFACT [FULL_RESULTS_JSON] > log
set -uo pipefail
cd "$(dirname "$0")/.."
D=target/release/dynakv
A=${1:?usage: tools/longctx_4k.sh ARTIFACT [FULL_RESULTS_JSON]}
C="eval longctx --lengths 4096 --tasks passkey,codeword --depths 0.1,0.3,0.5,0.7,0.9 --query-aware --full-results ${2:-longctx-full-4k.json} --json"
run() { echo "== $*"; date; $D $C "$@" 2>/dev/null | tail -1; }
run
run --preset bytes-6 --artifact "$A"
run --preset bytes-3 --artifact "$A"
run --snapkv 0.875 --snapkv-preset recall --kv-dtype q4_0
run --snapkv 0.9375 --snapkv-preset recall --kv-dtype q8_0
run --snapkv 0.96875 --snapkv-preset recall --kv-dtype f16
run --preset bytes-12 --artifact "$A"
echo DONE; date
