#!/bin/bash
# Prefill 512 / 2,048 tokens with the dense cache in f32 and f16 (the new
# default), alternating, 3 rounds. usage: prefill.sh BIN
B=$1
for round in 1 2 3; do
  for M in smollm2-135m gemma3-270m; do
    for d in f32 f16; do
      r=$(RAYON_NUM_THREADS=2 $B bench --model $M --matmul f32 --kv-dtype $d --prefill 512,2048 --decode-ctx 1 --decode-steps 1 --reps 1 --json 2>/dev/null)
      echo "{\"round\":$round,\"model\":\"$M\",\"kv\":\"$d\",\"run\":$r}"
    done
  done
done
