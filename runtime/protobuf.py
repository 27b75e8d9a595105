"""Just enough of protobuf's wire format to read external-data tables out of .onnx files without importing onnx
(the ONNX Runtime path stays free of onnx and torch). Used by manifest.py (where external data may live) and
memory.py (which tensors to share between sessions)."""
from __future__ import annotations


def varint(buf: memoryview, i: int) -> tuple[int, int]:
    """(value, next index) of the base-128 varint at buf[i]."""
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def fields(buf: memoryview):
    """(field number, wire type, value) of each field of one message: varints as ints, everything else as a
    bounds-checked sub-view. ValueError (or IndexError) on malformed input."""
    i, n = 0, len(buf)
    while i < n:
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
            yield field, wire, value
            continue
        if wire == 2:
            size, i = varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i + size > n:
            raise ValueError("truncated field")
        yield field, wire, buf[i:i + size]
        i += size
