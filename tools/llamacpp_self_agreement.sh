#!/usr/bin/env bash
# How often llama.cpp's top-1 token agrees with itself on the same Q4_1 file
# and text when only its batch size (or repacking) changes: the scale for
# issue 13's parity target (our q8 numerics against a llama.cpp run). Runs
# llama-perplexity once with 1,024-token batches (no repacking: on the
# 2026-11-30 VM kind repacked batches trap), saving its log-probabilities,
# then again per setting with --kl-divergence against them; prints llama.cpp's
# own "Same top p" (top-1 agreement), mean KLD and PPL ratio per setting.
#
# Usage: tools/llamacpp_self_agreement.sh
#   CHUNKS (default 2 windows of 1,024 tokens), THREADS (default 2),
#   LLAMACPP_DIR, LLAMACPP_BUILD (default LLAMACPP_DIR/build). Needs
#   llama-perplexity built beside llama-bench (cmake --build BUILD --target
#   llama-perplexity); a second build configured with -DGGML_LLAMAFILE=OFF
#   (llamafile's tiled products off) tells which path a batch takes that
#   one token does not.
# Text: the first 8 Brown `eval` documents, joined by blank lines.
set -euo pipefail
cd "$(dirname "$0")/.."

chunks=${CHUNKS:-2}
threads=${THREADS:-2}
dir=${LLAMACPP_DIR:-$HOME/.cache/dynakv/llama.cpp-0.3.36}
ppl="${LLAMACPP_BUILD:-$dir/build}/bin/llama-perplexity"
[ -x "$ppl" ] || { echo "no llama-perplexity at $ppl" >&2; exit 1; }
model=$(python3 -c "import sys; sys.path.insert(0, 'tools'); from brown_text import model_path; print(model_path('smollm2-135m'))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -c "
import sys; sys.path.insert(0, 'tools')
from brown_text import split_docs
open('$work/eval.txt', 'w').write('\n\n'.join(split_docs('eval', 8)))
"
# as the parity fixture: f32 KV cache, no flash attention
common=(-m "$model" -f "$work/eval.txt" -c 1024 -b 1024 --chunks "$chunks" -t "$threads" -fa off -ctk f32 -ctv f32)
"$ppl" "${common[@]}" -ub 1024 -nr --kl-divergence-base "$work/base.kld" 2>&1 | grep "Final estimate"
echo "| against -ub 1024 --no-repack | same top-1 | mean KLD | PPL ratio |"
echo "|---|---|---|---|"
for setting in "-ub 2 -nr" "-ub 256 -nr" "-ub 1 -nr" "-ub 1"; do
  # shellcheck disable=SC2086
  out=$("$ppl" "${common[@]}" $setting --kl-divergence --kl-divergence-base "$work/base.kld" 2>&1)
  same=$(echo "$out" | grep "^Same top p" | sed 's/.*: *//')
  kld=$(echo "$out" | grep "Mean    KLD" | sed 's/.*: *//')
  ratio=$(echo "$out" | grep "Mean PPL(Q)/PPL(base)" | sed 's/.*: *//')
  echo "| $setting | $same | $kld | $ratio |"
done
