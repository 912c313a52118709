#!/bin/bash
# The presets at 4,096 paired against the dense f16 step, before / after
# alternating, one round. usage: presets4k.sh OLD_BIN NEW_BIN SMOL_ARTIFACT GEMMA_ARTIFACT
old=$1; new=$2; smol=$3; gemma=$4
for m in smollm2-135m gemma3-270m; do
  a=$smol; [ $m = gemma3-270m ] && a=$gemma
  for p in bytes-6 bytes-3; do
    for b in $old $new; do
      r=$(RAYON_NUM_THREADS=2 $b bench --model $m --matmul f32 --artifact $a --preset $p --prefill 1 \
        --decode-ctx 4096 --decode-steps 64 --reps 1 --paired-base "dense+store:kv=f16" --json 2>/dev/null |
        python3 -c '
import json,sys
for l in sys.stdin:
    p=json.loads(l)["paired"]; print(round(p["base_median_s"]*1e3,2), round(p["other_median_s"]*1e3,2), round(p["speed_ratio"],3))')
      echo "1 $m $p 4096 $(basename $b) $r"
    done
  done
done
