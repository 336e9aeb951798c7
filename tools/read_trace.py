#!/usr/bin/env python3
"""Read a foremoe routing trace (model/trace_io.h) with the standard library only.

    python3 tools/read_trace.py trace.safetensors

prints the metadata, the tensor shapes and, per MoE layer, the load of every
expert (token assignments over the whole trace) with its MaxVio
((max - mean) / mean). As a module, read_trace(path) returns a dict with
"metadata" (the parsed JSON), "routes" (a flat array.array of expert ids,
token-major [tokens, n_moe_layers, top_k]), "seq_offsets" and
"micro_step_offsets" (lists; the latter empty when absent).

With numpy and the safetensors package the same file reads as

    import json
    from safetensors import safe_open
    import numpy as np
    with safe_open("trace.safetensors", "np") as f:
        meta = json.loads(f.metadata()["foremoe_trace"])
        routes = f.get_tensor("routes")            # uint8/uint16 [tokens, layers, k]
        seq_offsets = f.get_tensor("seq_offsets")  # int64 [sequences + 1]
    load = np.stack([np.bincount(routes[:, l].ravel(), minlength=meta["n_experts"])
                     for l in range(meta["n_moe_layers"])])  # [layers, experts]

and tokens of sequence s are routes[seq_offsets[s]:seq_offsets[s + 1]].
"""
import array
import json
import struct
import sys

# safetensors dtype -> (array typecode, bytes per element)
_TYPES = {"U8": ("B", 1), "U16": ("H", 2), "I64": ("q", 8)}


def _tensor(buf, data_start, header, name):
    info = header[name]
    code, size = _TYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    arr = array.array(code)
    assert arr.itemsize == size, f"array typecode {code} is not {size} bytes here"
    arr.frombytes(buf[data_start + begin:data_start + end])
    if sys.byteorder == "big":
        arr.byteswap()  # safetensors is little-endian
    return arr


def read_trace(path):
    with open(path, "rb") as f:
        buf = f.read()
    (header_len,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + header_len])
    data_start = 8 + header_len
    meta = json.loads(header["__metadata__"]["foremoe_trace"])
    return {
        "metadata": meta,
        "shapes": {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"},
        "routes": _tensor(buf, data_start, header, "routes"),
        "seq_offsets": list(_tensor(buf, data_start, header, "seq_offsets")),
        "micro_step_offsets": list(_tensor(buf, data_start, header, "micro_step_offsets"))
        if "micro_step_offsets" in header else [],
    }


def expert_loads(trace):
    """[n_moe_layers][n_experts] token assignments over the whole trace."""
    m = trace["metadata"]
    layers, k, experts = m["n_moe_layers"], m["top_k"], m["n_experts"]
    load = [[0] * experts for _ in range(layers)]
    routes = trace["routes"]
    for i, e in enumerate(routes):
        load[(i // k) % layers][e] += 1
    return load


def main(argv):
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    t = read_trace(argv[1])
    print("metadata:", json.dumps(t["metadata"], sort_keys=True))
    for name, (dtype, shape) in sorted(t["shapes"].items()):
        print(f"{name}: {dtype} {shape}")
    print(f"sequences: {len(t['seq_offsets']) - 1}  tokens: {t['seq_offsets'][-1]}")
    for layer, load in enumerate(expert_loads(t)):
        mean = sum(load) / len(load)
        vio = (max(load) - mean) / mean if mean > 0 else 0.0
        print(f"layer {layer} maxvio {vio:.4f} load {' '.join(map(str, load))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
