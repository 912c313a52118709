"""Copies a GGUF file with every tensor dequantized to F32 (same metadata, same
weight values), using the `gguf` PyPI package. llama.cpp multiplies quantized
weights with activations quantized to 8 bits; on F32 weights it computes in
f32, so this copy isolates the model's arithmetic from that quantization."""
import os
import sys

import numpy as np
import gguf
from gguf.quants import dequantize


def dequantize_file(src, dst):
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst + ".tmp", arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        data = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".tmp", dst)


if __name__ == "__main__":
    dequantize_file(sys.argv[1], sys.argv[2])
