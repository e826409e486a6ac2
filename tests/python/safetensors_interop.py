"""The other side of the safetensors tests (tests/test_python_models.cpp), written from the published format alone
(github.com/huggingface/safetensors, "Format"): numpy and json, not the library under test nor the safetensors package.

The format: 8 bytes, a little-endian unsigned 64-bit N; N bytes of JSON, an object with an entry per tensor,
{"dtype": ..., "shape": [...], "data_offsets": [begin, end]}, and an optional "__metadata__" of strings to strings,
padded with spaces; then the byte buffer, the offsets counting from its start. The tensors tile the buffer.

  write FILE DTYPES      writes a tensor "<dtype>" of shape [2, 3] per dtype in DTYPES (comma-separated safetensors
                         names) with the values of expected_bytes, an empty F32 "empty" [0, 4] and an F64 scalar
                         "scalar" (2.5), with metadata {"format": "pt", "written_by": "numpy"}; the data laid out as
                         the reference writer lays it out (largest alignment first, then by name), the header's
                         entries in another order (by name, descending), so that a reader must follow the offsets.
  check FILE DTYPES      reads FILE as written by accelerated::save_safetensors with the same tensors and metadata
                         {"format": "pt", "written_by": "accelerated"}; checks every byte, the 8-byte padding of the
                         header, each tensor's alignment and the tiling; exits 1 naming what differs.
"""
import json
import math
import struct
import sys

import numpy as np

SIZES = {"C64": 8, "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
HALVES = [(i - 3) * 0.5 for i in range(6)]  # -1.5 ... 1.0: exact in every floating-point dtype here


def float8(value, mantissa_bits, bias):
    """The bits of an exactly representable value in an 8-bit float with these fields (E4M3 and E5M2)."""
    if value == 0:
        return 0
    sign = 0x80 if value < 0 else 0
    exponent = math.floor(math.log2(abs(value)))
    mantissa = round((abs(value) / 2 ** exponent - 1) * 2 ** mantissa_bits)
    return sign | ((exponent + bias) << mantissa_bits) | mantissa


def expected_bytes(dtype):
    """The little-endian bytes of the [2, 3] tensor of `dtype`: flat index i holds the value below."""
    i = np.arange(6)
    if dtype == "F64":
        return np.array([h + 2.0 ** -40 for h in HALVES], dtype="<f8").tobytes()
    if dtype == "C64":  # (real, imaginary) float32 pairs: (h, -h)
        return np.array([complex(h, -h) for h in HALVES], dtype="<c8").tobytes()
    if dtype == "F32":
        return np.array(HALVES, dtype="<f4").tobytes()
    if dtype == "F16":
        return np.array(HALVES, dtype="<f2").tobytes()
    if dtype == "BF16":  # the upper half of each float32 (exact: the values need few mantissa bits)
        return (np.array(HALVES, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
    if dtype == "F8_E4M3":
        return bytes(float8(h, 3, 7) for h in HALVES)
    if dtype == "F8_E5M2":
        return bytes(float8(h, 2, 15) for h in HALVES)
    if dtype == "BOOL":
        return (i % 2).astype("u1").tobytes()
    start = {"I64": -2 ** 62, "I32": -2 ** 31, "I16": -2 ** 15, "I8": -128, "U8": 250, "U16": 65530,
             "U32": 2 ** 32 - 6, "U64": 2 ** 64 - 6}[dtype]
    kind = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4",
            "U64": "<u8"}[dtype]
    return np.array([start + int(k) for k in i], dtype=object).astype(kind).tobytes()


def tensors(dtypes):
    """name -> (dtype, shape, bytes): the tensors both sides write."""
    out = {d: (d, [2, 3], expected_bytes(d)) for d in dtypes}
    out["empty"] = ("F32", [0, 4], b"")
    out["scalar"] = ("F64", [], np.array(2.5, dtype="<f8").tobytes())
    return out


def write(path, dtypes):
    entries = tensors(dtypes)
    order = sorted(entries, key=lambda name: (-SIZES[entries[name][0]], name))
    offsets, offset = {}, 0
    for name in order:
        offsets[name] = [offset, offset + len(entries[name][2])]
        offset += len(entries[name][2])
    header = {"__metadata__": {"format": "pt", "written_by": "numpy"}}
    for name in sorted(entries, reverse=True):
        dtype, shape, _ = entries[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets[name]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(entries[name][2])


def parse(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    return raw, n, header, raw[8 + n:]


def check(path, dtypes):
    raw, n, header, buffer = parse(path)
    problems = []
    if (8 + n) % 8:
        problems.append(f"the header ends at byte {8 + n}, not a multiple of 8")
    metadata = header.pop("__metadata__", None)
    if metadata != {"format": "pt", "written_by": "accelerated"}:
        problems.append(f"metadata {metadata}")
    want = tensors(dtypes)
    if set(header) != set(want):
        problems.append(f"tensors {sorted(header)}, expected {sorted(want)}")
    spans = []
    for name, info in header.items():
        if name not in want:
            continue
        dtype, shape, data = want[name]
        begin, end = info["data_offsets"]
        spans.append((begin, end))
        if info["dtype"] != dtype or info["shape"] != shape:
            problems.append(f"{name}: {info['dtype']} {info['shape']}, expected {dtype} {shape}")
        if begin % SIZES[dtype]:
            problems.append(f"{name}: starts at {begin}, not a multiple of its element size {SIZES[dtype]}")
        if buffer[begin:end] != data:
            problems.append(f"{name}: bytes {buffer[begin:end].hex()}, expected {data.hex()}")
    at = 0
    for begin, end in sorted(spans):
        if begin != at:
            problems.append(f"a gap or an overlap at {begin} (expected {at})")
        at = end
    if at != len(buffer):
        problems.append(f"the tensors cover {at} of {len(buffer)} bytes")
    for p in problems:
        print("python:", p)
    print(f"python: read {len(header)} tensors of {path}: {'ok' if not problems else 'FAILED'}")
    return 1 if problems else 0


def main():
    mode = sys.argv[1]
    if mode == "write":
        write(sys.argv[2], [d for d in sys.argv[3].split(",") if d])
        return 0
    if mode == "check":
        return check(sys.argv[2], [d for d in sys.argv[3].split(",") if d])
    print("unknown mode", mode)
    return 2


if __name__ == "__main__":
    sys.exit(main())
