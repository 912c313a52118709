#!/bin/bash
# Dense cache f32 vs f16 (PPL, Brown eval) on both models: the evidence for
# the dense default. usage: dense-default.sh BIN
B=$1
for m in smollm2-135m gemma3-270m; do
  for d in f32 f16 q8_0; do
    for ctx in 1024 4096; do
      w=8; [ $ctx = 4096 ] && w=4
      RAYON_NUM_THREADS=2 $B eval ppl --model $m --ctx $ctx --max-windows $w --kv-dtype $d --json 2>/dev/null | tail -1 | sed "s/^/{\"model\":\"$m\",\"dtype\":\"$d\",\"ctx\":$ctx,\"run\":/; s/\$/}/"
    done
  done
done
