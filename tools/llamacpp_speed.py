#!/usr/bin/env python3
"""llama.cpp's prefill and decode throughput on the default GGUF, measured the
way `dynakv bench` measures ours (same Brown eval tokens, 2 threads, median of
3 runs after a warm-up), through the llama-cpp-python binding, so the two can be
put side by side in docs/results.md. Prints one JSON list.

Usage: python3 -m pip install llama-cpp-python && python3 tools/llamacpp_speed.py
"""
import json
import statistics
import time

from llama_cpp import Llama

from brown_text import model_path, split_docs

REPS = 3
llm = Llama(model_path=model_path(), n_ctx=4096, n_batch=2048, n_ubatch=512, n_threads=2,
            n_threads_batch=2, verbose=False)
sep = llm.tokenize(b"\n\n", add_bos=False, special=False)
ids = []
for i, d in enumerate(split_docs("eval", 8)):
    if i:
        ids += sep
    ids += llm.tokenize(d.encode("utf-8"), add_bos=False, special=False)

out = []
for n in (512, 2048):
    times = []
    for r in range(REPS + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:n])
        if r:
            times.append(time.perf_counter() - t0)
    m = statistics.median(times)
    out.append({"what": "prefill", "tokens": n, "context": 0, "median_s": m, "tokens_per_s": n / m})

ctx, steps = 1024, 32
times = []
for r in range(REPS):
    llm.reset()
    llm.eval(ids[:ctx])
    t0 = time.perf_counter()
    for t in ids[ctx:ctx + steps]:
        llm.eval([t])
    times.append(time.perf_counter() - t0)
m = statistics.median(times)
out.append({"what": "decode", "tokens": steps, "context": ctx, "median_s": m, "tokens_per_s": steps / m})
print(json.dumps(out))
