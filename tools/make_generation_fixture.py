#!/usr/bin/env python3
"""Writes dynakv-models/tests/fixtures/generation.json: llama.cpp's greedy
continuation of one prompt on the project's default model (SmolLM2 Q4_1), as
llama.cpp generates: the prompt evaluated as one batch, then one token at a
time, each the argmax of the last logits (no sampler), with llama.cpp's
default f16 KV cache and no flash attention.

The llama.cpp reference decoder's greedy continuation is held to it
(`cargo test -p dynakv-models --test model_real greedy`).

Usage: LLAMA_CPP_LIB_PATH=<llama.cpp build>/bin python3 tools/make_generation_fixture.py [--tokens 64]
"""
import argparse
import json
import os

import numpy as np
from llama_cpp import Llama

from brown_text import model_path

PROMPT = ("The committee said that the city's purchasing department was well "
          "operated, and that the new system of")
args = argparse.ArgumentParser()
args.add_argument("--tokens", type=int, default=64)
args = args.parse_args()
if not 1 <= args.tokens <= 512:
    raise SystemExit("--tokens must be in 1..512")
llm = Llama(model_path=model_path(), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2,
            type_k=1, type_v=1, flash_attn=False, logits_all=True, verbose=False)
prompt = llm.tokenize(PROMPT.encode("utf-8"), add_bos=False, special=False)
llm.reset()
llm.eval(prompt)
out = []
for _ in range(args.tokens):
    logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    t = int(np.argmax(logits))
    out.append(t)
    llm.eval([t])
path = os.path.join(os.path.dirname(__file__), "..", "dynakv-models", "tests", "fixtures", "generation.json")
fixture = {"source": "llama.cpp via llama-cpp-python " + __import__("llama_cpp").__version__,
           "prompt": PROMPT, "prompt_ids": prompt, "kv": "f16", "n_ubatch": 512,
           "greedy": out, "text": llm.detokenize(out).decode("utf-8", "replace")}
with open(path + ".tmp", "w") as f:
    json.dump(fixture, f)
os.replace(path + ".tmp", path)
print(f"wrote {path}: {len(prompt)} prompt tokens, {len(out)} greedy tokens: {fixture['text']!r}")
