#!/usr/bin/env python3
"""Writes dynakv-models/tests/fixtures/tokenizer.json: texts and the ids that
llama.cpp's own tokenizer (through llama-cpp-python, vocab only) gives for them
on the default GGUF file, special tokens parsed.

Usage: python3 -m pip install llama-cpp-python && python3 tools/make_tokenizer_fixture.py
"""
import json
import os

from llama_cpp import Llama

from brown_text import model_path, split_docs

TEXTS = [
    "Hello, world!",
    "The year 2026 had 365 days; pi is 3.14159 and 1,000,000 is a million.",
    "a  b   c    d\t\te\n\nf\n \n  g   ",
    "   leading and trailing   ",
    "Punctuation... (really?) [yes!] {ok}; \"quotes\" 'single' -- dash - hyphen/slash",
    "Non-ASCII: café, naïve, Straße, Ελληνικά, русский, 日本語, 😀🚀, ½ ∑ √",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end<|im_end|>",
    "don't I'll we've they're it's O'Neil's",
    "x=1;y=22;z=333\r\nCRLF line\r\n",
    "",
]

llm = Llama(model_path=model_path(), vocab_only=True, verbose=False)
cases = [{"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in TEXTS]
# One real paragraph from each split's first document.
for split in ("calib", "eval"):
    t = split_docs(split, 1)[0][:1500]
    cases.append({"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)})

path = os.path.join(os.path.dirname(__file__), "..", "dynakv-models", "tests", "fixtures", "tokenizer.json")
with open(path + ".tmp", "w") as f:
    json.dump({"source": "llama.cpp via llama-cpp-python, vocab_only", "cases": cases}, f, ensure_ascii=False, indent=0)
os.replace(path + ".tmp", path)
print("wrote", path, len(cases), "cases")
