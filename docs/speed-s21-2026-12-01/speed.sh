#!/bin/bash
# Dense f32 vs the new f16 default (paired decode step), and the Gemma 3
# presets before (dense f32 windowed layers) / after (f16), alternating
# binaries. usage: speed.sh OLD NEW
OLD=$1; NEW=$2
run() { # bin model ctx args...
  B=$1; M=$2; C=$3; shift 3
  RAYON_NUM_THREADS=2 $B bench --model $M --matmul f32 --prefill 1 --decode-ctx $C --decode-steps 64 --reps 1 --paired-base "dense+store:kv=f16" --json "$@" 2>/dev/null | tail -1
}
for M in smollm2-135m gemma3-270m; do
  for C in 1024 4096 8064; do
    echo "{\"what\":\"f32-vs-f16\",\"model\":\"$M\",\"ctx\":$C,\"run\":$(run $NEW $M $C --cache full --kv-dtype f32)}"
  done
done
for C in 4096 8064; do
  for P in bytes-6 bytes-3; do
    for B in $OLD $NEW; do
      echo "{\"what\":\"preset\",\"bin\":\"$B\",\"model\":\"gemma3-270m\",\"preset\":\"$P\",\"ctx\":$C,\"run\":$(run $B gemma3-270m $C --preset $P --artifact /tmp/gemma-pca.safetensors)}"
    done
  done
done
