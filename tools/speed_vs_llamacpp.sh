#!/usr/bin/env bash
# Speed side by side on one machine: llama.cpp's `llama-bench` (built here from
# the llama.cpp vendored in PyPI llama-cpp-python) against `dynakv bench`, same
# GGUF file, same thread count. Then the whole-model decode step at 4k and 8k
# against the dense f16 cache as paired ratios (`dynakv bench --paired-base`):
# the q8_0 / q4_0 dense caches, and with an artifact DynaKV at 0.30 (energy,
# and a trained router if given) and the bytes-6 / bytes-3 presets.
#
# Usage: tools/speed_vs_llamacpp.sh OUT_DIR [ARTIFACT [ROUTER_ARTIFACT]]
#   THREADS (default 2), REPS (default 3), MATMUL (f32 or q8, default f32),
#   MODEL (smollm2-135m, the default, or gemma3-270m),
#   LLAMACPP_DIR (default ~/.cache/dynakv/llama.cpp-0.3.36), REPACK
#   (llama-bench's --repack, default 1 as llama-bench's own default),
#   PREFILL_REPACK (--repack of the prefill rows, default REPACK), UBATCH
#   (llama-bench's -ub for the decode rows, default its own), FA (its
#   --flash-attn values, default "0,1": the table keeps llama.cpp's faster
#   setting per row and names it) and DECODE_FA (the decode rows' values,
#   default FA; with UBATCH=1 flash attention fills a deep context one
#   token at a time very slowly here, so DECODE_FA=0 saves many minutes)
#   may be set.
#   Where llama.cpp's repacked (AMX) weights trap: on the 2026-11-30 VM kind
#   the CPU reports AMX but its tile instructions raise "invalid opcode", so
#   every prompt batch of more than one token crashes with repacking while
#   one-token batches (AVX512-VNNI) run. There, PREFILL_REPACK=0 UBATCH=1
#   measures decode with repacked weights (the depth is filled one token at
#   a time, which is slow) and prefill without.
# Needs python3 with pip (cmake and ninja are installed from PyPI into a
# virtual environment beside the build) and a C++ compiler.
# Writes OUT_DIR/llama-bench.jsonl, OUT_DIR/dynakv.jsonl, OUT_DIR/paired.jsonl
# and prints the table (tools/speed_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: tools/speed_vs_llamacpp.sh OUT_DIR [ARTIFACT [ROUTER_ARTIFACT]]}
artifact=${2:-}
router=${3:-}
threads=${THREADS:-2}
reps=${REPS:-3}
matmul=${MATMUL:-f32}
model_name=${MODEL:-smollm2-135m}
ver=0.3.36
dir=${LLAMACPP_DIR:-$HOME/.cache/dynakv/llama.cpp-$ver}
bench="$dir/build/bin/llama-bench"
mkdir -p "$out"

if [ ! -x "$bench" ]; then
  echo "building llama-bench from llama-cpp-python $ver's llama.cpp in $dir" >&2
  mkdir -p "$dir"
  [ -x "$dir/venv/bin/cmake" ] || {
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/python" -m pip install -q cmake ninja
  }
  if [ ! -d "$dir/src" ]; then
    tmp=$(mktemp -d)
    "$dir/venv/bin/python" -m pip download -q --no-binary llama-cpp-python --no-deps \
      "llama-cpp-python==$ver" -d "$tmp"
    tar -xzf "$tmp/llama_cpp_python-$ver.tar.gz" -C "$tmp"
    mv "$tmp/llama_cpp_python-$ver/vendor/llama.cpp" "$dir/src.partial"
    mv "$dir/src.partial" "$dir/src"
    rm -rf "$tmp"
  fi
  PATH="$dir/venv/bin:$PATH" cmake -S "$dir/src" -B "$dir/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  PATH="$dir/venv/bin:$PATH" cmake --build "$dir/build" --target llama-bench -j "$threads" >&2
fi

cargo build --release -p dynakv-bench >&2
dynakv=target/release/dynakv
$dynakv fetch --model "$model_name" >&2
model=$(python3 -c "import sys; sys.path.insert(0, 'tools'); from brown_text import model_path; print(model_path('$model_name'))")
# depths: SmolLM2's context is 8,192 tokens, so "8k" is 8,064 (+128 decoded);
# dynakv's depth 0 is one prompt token (its decode measurement needs a context)
depths=(0 1024 4096 8064)

# llama.cpp: prefill 512 / 2,048 from empty, decode 128 tokens at each depth
: > "$out/llama-bench.jsonl"
repack=${REPACK:-1}
prefill_repack=${PREFILL_REPACK:-$repack}
fa=${FA:-0,1}
ubatch=()
[ -n "${UBATCH:-}" ] && ubatch=(-ub "$UBATCH")
"$bench" -m "$model" -t "$threads" -r "$reps" --repack "$prefill_repack" -fa "$fa" -p 512,2048 -n 0 \
  -o jsonl >> "$out/llama-bench.jsonl"
"$bench" -m "$model" -t "$threads" -r "$reps" --repack "$repack" -fa "${DECODE_FA:-$fa}" "${ubatch[@]}" -p 0 -n 128 \
  -d "$(IFS=,; echo "${depths[*]}")" -o jsonl >> "$out/llama-bench.jsonl"

# dynakv: the same sizes (prefill 512 / 2,048 with the first depth)
: > "$out/dynakv.jsonl"
export RAYON_NUM_THREADS=$threads
for d in "${depths[@]}"; do
  prefill=(--prefill 1)
  [ "$d" = 0 ] && prefill=(--prefill 512,2048)
  $dynakv bench --model "$model_name" --matmul "$matmul" --kv-dtype f16 "${prefill[@]}" --decode-ctx "$((d > 0 ? d : 1))" \
    --decode-steps 128 --reps "$reps" --json >> "$out/dynakv.jsonl"
done

# whole-model decode step against the dense f16 cache, step for step: the
# packed dense caches (llama.cpp's q8_0 / q4_0), DynaKV at 0.30 (int8
# latents, the default) and the SnapKV + DynaKV presets
: > "$out/paired.jsonl"
configs=("q8_0|--kv-dtype q8_0" "q4_0|--kv-dtype q4_0")
if [ -n "$artifact" ]; then
  configs+=("DynaKV energy 0.30|--cache dynakv --artifact $artifact --policy energy --budget 0.30")
  [ -n "$router" ] && configs+=("DynaKV router 0.30|--cache dynakv --artifact $router --policy router --budget 0.30")
  configs+=("bytes-6|--preset bytes-6 --artifact $artifact" "bytes-3|--preset bytes-3 --artifact $artifact")
fi
for d in 4096 8064; do
  for c in "${configs[@]}"; do
    label=${c%%|*}
    read -r -a flags <<< "${c#*|}"
    echo "{\"policy\": \"$label\", \"depth\": $d}" >> "$out/paired.jsonl"
    $dynakv bench --model "$model_name" --matmul "$matmul" "${flags[@]}" \
      --prefill 1 --decode-ctx "$d" --decode-steps 64 --reps 1 \
      --paired-base "dense+store:kv=f16" --json >> "$out/paired.jsonl"
  done
done
python3 tools/speed_table.py "$out"
