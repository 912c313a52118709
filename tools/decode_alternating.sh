#!/usr/bin/env bash
# Decode from an empty context (128 tokens; DEPTH=D: after D tokens) or,
# with PROMPT=P, prefill of P tokens: llama-bench and `dynakv bench`
# back to back, N pairs: on a shared host whose speed moves by up to 2x from
# minute to minute, a pair run seconds apart sees the same host, so the
# median of the pairs' ratios is the figure to quote, not two medians taken
# minutes apart. Prints each pair and the median ratio; writes nothing.
#
# Usage: tools/decode_alternating.sh [N]   (default 7)
#   THREADS (default 2), MATMUL (f32 or q8, default q8), MODEL (smollm2-135m
#   or gemma3-270m), REPACK (llama-bench's --repack, default 1), FA (its
#   --flash-attn, default 0), DEPTH (decode after that many tokens,
#   default 0), PROMPT (measure a prefill of that many tokens instead of
#   decode) and LLAMACPP_DIR may be set. llama-bench must
#   be built (tools/speed_vs_llamacpp.sh builds it).
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:-7}
threads=${THREADS:-2}
matmul=${MATMUL:-q8}
model_name=${MODEL:-smollm2-135m}
repack=${REPACK:-1}
fa=${FA:-0}
depth=${DEPTH:-0}
prompt=${PROMPT:-}
dir=${LLAMACPP_DIR:-$HOME/.cache/dynakv/llama.cpp-0.3.36}
bench="$dir/build/bin/llama-bench"
[ -x "$bench" ] || { echo "no llama-bench at $bench: run tools/speed_vs_llamacpp.sh once" >&2; exit 1; }

cargo build --release -p dynakv-bench >&2
dynakv=target/release/dynakv
$dynakv fetch --model "$model_name" >&2
model=$(python3 -c "import sys; sys.path.insert(0, 'tools'); from brown_text import model_path; print(model_path('$model_name'))")
export RAYON_NUM_THREADS=$threads

if [ -n "$prompt" ]; then
  # prefill: llama-bench's prompt row; ours the prefill run of that length
  theirs_args=(-p "$prompt" -n 0)
  ours_args=(--prefill "$prompt" --decode-ctx 1 --decode-steps 1)
  what=prefill
else
  theirs_args=(-p 0 -n 128 -d "$depth")
  ours_args=(--prefill 1 --decode-ctx "$((depth > 0 ? depth : 1))" --decode-steps 128)
  what=decode
fi

for i in $(seq "$n"); do
  theirs=$("$bench" -m "$model" -t "$threads" -r 1 --repack "$repack" -fa "$fa" "${theirs_args[@]}" -o jsonl \
    | python3 -c 'import json, sys; print(json.loads(sys.stdin.readline())["avg_ts"])')
  ours=$($dynakv bench --model "$model_name" --matmul "$matmul" --kv-dtype f16 "${ours_args[@]}" \
    --reps 1 --json 2>/dev/null | WHAT=$what MIN_TOKENS=${prompt:-0} python3 -c '
import json, os, sys
for line in sys.stdin:
    line = json.loads(line)
    for r in line if isinstance(line, list) else line.get("runs", []):
        if r["what"] == os.environ["WHAT"] and r["tokens"] >= int(os.environ["MIN_TOKENS"]):
            print(r["tokens_per_s"])')
  echo "$i $ours $theirs"
done | python3 -c '
import statistics, sys
ratios = []
print("| pair | dynakv tok/s | llama.cpp tok/s | ratio |")
print("|---|---|---|---|")
for line in sys.stdin:
    i, ours, theirs = line.split()
    r = float(ours) / float(theirs)
    ratios.append(r)
    print(f"| {i} | {float(ours):.1f} | {float(theirs):.1f} | {r:.2f}x |")
print(f"\nmedian ratio {statistics.median(ratios):.2f}x over {len(ratios)} pairs (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
'
