#!/usr/bin/env python3
"""Writes dynakv-models/tests/fixtures/tokenizer.json (or
tokenizer-gemma3.json): texts and the ids that llama.cpp's own tokenizer
(through llama-cpp-python, vocab only) gives for them on a model's GGUF file,
special tokens parsed, no BOS.

Usage: python3 -m pip install llama-cpp-python &&
       python3 tools/make_tokenizer_fixture.py [smollm2-135m|gemma3-270m]
"""
import json
import os
import sys

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

MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
if MODEL == "gemma3-270m":
    # SentencePiece: runs of whitespace (user-defined pieces), tabs, emoji,
    # CJK, characters only byte fallback covers, Gemma's special tokens
    TEXTS = [t for t in TEXTS if "<|im" not in t and "<|endoftext|>" not in t] + [
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
        "<bos>text after bos<eos> and <pad>",
        "spaces:  two,   three,    four,          ten.\n\n\n\nfour newlines",
        "\ttab\t\ttwo tabs\t \t mixed\n\t\n",
        "Emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 🤖🧠 and keycaps 1️⃣",
        "CJK: 汉字、漢字、かな、カナ、한국어 — 中文标点：“引号”！",
        "Rare characters: 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0007 \u0000 \ufeff",
        "   leading spaces and ▁ the escape character itself",
        "[multimodal] is a user-defined token",
    ]

llm = Llama(model_path=model_path(MODEL), vocab_only=True, verbose=False)
cases = [{"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in TEXTS]
# One real paragraph from each split's first document.
for split in ("calib", "eval"):
    t = split_docs(split, 1)[0][:1500]
    cases.append({"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)})

name = "tokenizer.json" if MODEL == "smollm2-135m" else f"tokenizer-{MODEL.split('-')[0]}.json"
path = os.path.join(os.path.dirname(__file__), "..", "dynakv-models", "tests", "fixtures", name)
with open(path + ".tmp", "w") as f:
    json.dump({"source": "llama.cpp via llama-cpp-python, vocab_only", "cases": cases}, f, ensure_ascii=False, indent=0)
os.replace(path + ".tmp", path)
print("wrote", path, len(cases), "cases")
