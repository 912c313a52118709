#!/bin/bash
# paired whole-model decode steps, old (session 19, a7085b3) and new (3ae07df) release binaries alternating, copied to /tmp/dynakv-s19e and /tmp/dynakv-s20c
S=pca-pre.safetensors; G=gemma3-pca-pre.safetensors  # from `dynakv calibrate [--model gemma3-270m]`
OUT=paired.jsonl
run() { # bin model artifact ctx label args...
  B=$1; M=$2; A=$3; C=$4; L=$5; shift 5
  echo "{\"binary\": \"$(basename $B)\", \"model\": \"$M\", \"config\": \"$L\", \"depth\": $C}" >> $OUT
  RAYON_NUM_THREADS=2 $B bench --model $M --matmul f32 --artifact $A --prefill 1 --decode-ctx $C --decode-steps 64 --reps 1 --paired-base "dense+store:kv=f16" --json "$@" 2>/dev/null | grep paired >> $OUT
}
for C in 8064 4096; do
 for cfg in "smollm2-135m $S energy-0.30-f32 --cache dynakv --policy energy --budget 0.30" \
            "smollm2-135m $S energy-0.30-int8 --cache dynakv --policy energy --budget 0.30 --latent-dtype int8" \
            "smollm2-135m $S bytes-3 --preset bytes-3" "smollm2-135m $S bytes-6 --preset bytes-6" "smollm2-135m $S bytes-12 --preset bytes-12" \
            "gemma3-270m $G energy-0.30-int8 --cache dynakv --policy energy --budget 0.30 --latent-dtype int8" \
            "gemma3-270m $G bytes-3 --preset bytes-3" "gemma3-270m $G bytes-6 --preset bytes-6" "gemma3-270m $G bytes-12 --preset bytes-12"; do
   set -- $cfg; M=$1; A=$2; L=$3; shift 3
   for B in /tmp/dynakv-s19e /tmp/dynakv-s20c; do run $B $M $A $C $L "$@"; done
 done
done

