#!/bin/bash
# Paired whole-model decode steps against the dense f16 cache (its step
# time over the other cache's), session 22: before / after binaries
# alternating in each round. usage: paired.sh OLD_BIN NEW_BIN SMOL_ARTIFACT GEMMA_ARTIFACT
# (artifacts from `dynakv calibrate`; one line per run: round model cache ctx bin base_ms other_ms ratio)
old=$1; new=$2; smol=$3; gemma=$4
run() { # BIN MODEL ARTIFACT CTX CACHE-ARGS...
  local b=$1 m=$2 a=$3 c=$4; shift 4
  RAYON_NUM_THREADS=2 $b bench --model $m --matmul f32 --artifact $a "$@" --prefill 1 \
    --decode-ctx $c --decode-steps 64 --reps 1 --paired-base "dense+store:kv=f16" --json 2>/dev/null |
    python3 -c '
import json,sys
for l in sys.stdin:
    p=json.loads(l)["paired"]; print(round(p["base_median_s"]*1e3,2), round(p["other_median_s"]*1e3,2), round(p["speed_ratio"],3))'
}
for round in 1 2; do
  for m in smollm2-135m gemma3-270m; do
    a=$smol; [ $m = gemma3-270m ] && a=$gemma
    for c in 8064 4096; do
      for cache in int8 bytes-6 bytes-3; do
        [ $c = 4096 ] && [ $cache != int8 ] && continue
        case $cache in
          int8) args="--cache dynakv --policy energy --budget 0.30" ;;
          *) args="--preset $cache" ;;
        esac
        for b in $old $new; do
          echo "$round $m $cache $c $(basename $b) $(run $b $m $a $c $args)"
        done
      done
    done
  done
done
