#!/usr/bin/env bash
# Long-context suite at 1k and 2k for the presets and the baselines at the same bytes.
set -uo pipefail
cd "$(dirname "$0")/.."
D=target/release/dynakv
A=${1:?usage: tools/longctx_presets.sh ARTIFACT [FULL_RESULTS_JSON]}
C="eval longctx --lengths 1024,2048 --query-aware --full-results ${2:-longctx-full-1k2k.json} --json"
run() { echo "== $*"; date; $D $C "$@" 2>/dev/null | tail -1; }
run
run --preset bytes-25 --artifact $A
run --preset bytes-12 --artifact $A
run --preset bytes-6 --artifact $A
run --preset bytes-3 --artifact $A
run --snapkv 0.875 --snapkv-preset recall --kv-dtype q8_0
run --snapkv 0.875 --snapkv-preset recall --kv-dtype q4_0
run --kv-dtype q4_0
echo DONE; date
