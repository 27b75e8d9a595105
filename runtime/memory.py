"""Process memory figures and one shared, memory-mapped copy of the exported weights.

ONNX Runtime would otherwise read every piece's external data into its own buffers, so the window and refresh
sessions of a range (whose graphs point at the same data file) each held a copy. Here every data file is mapped
once (numpy.memmap, read-only, so its pages are the page cache's and are shared with other processes serving the
same folder) and each external tensor becomes one OrtValue on top of the mapping, handed to every session that
uses it. Only numpy (and onnxruntime's OrtValue, passed in) are used: no onnx package on the runtime path, so the
.onnx files are read with the small protobuf reader below.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import protobuf

# ONNX TensorProto.DataType -> numpy dtype of the same item size (bf16 and the float8 types have no numpy dtype:
# their bytes are viewed as unsigned integers and the OrtValue is tagged with the ONNX type instead).
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64, 16: np.uint16,
               17: np.uint8, 18: np.uint8, 19: np.uint8, 20: np.uint8}
NUMPY_NATIVE = {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13}


def peak_rss_bytes() -> int:
    """Largest resident set of this process so far (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """Rss, Pss, Shared_Clean, Private_Dirty, ... of a process in bytes (Linux; {} elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


# ---- reading the external-initializer table of an .onnx file (protobuf wire format) ---------------------------
@dataclass(frozen=True)
class ExternalTensor:
    name: str
    data_type: int          # ONNX TensorProto.DataType
    dims: tuple[int, ...]
    location: str           # data file, relative to the .onnx file
    offset: int
    length: int


def _tensor(buf: memoryview) -> ExternalTensor | None:
    name, data_type, dims, external, location = "", 0, [], {}, 0
    for field, wire, value in protobuf.fields(buf):
        if field == 1:      # dims: repeated int64, packed or not
            if wire == 2:
                j = 0
                while j < len(value):
                    d, j = protobuf.varint(value, j)
                    dims.append(d)
            else:
                dims.append(value)
        elif field == 2:
            data_type = value
        elif field == 8:
            name = bytes(value).decode()
        elif field == 13:   # StringStringEntryProto {key = 1, value = 2}
            entry = {f: bytes(v).decode() for f, _, v in protobuf.fields(value)}
            external[entry.get(1, "")] = entry.get(2, "")
        elif field == 14:
            location = value
    if location != 1 or "location" not in external:
        return None
    return ExternalTensor(name, data_type, tuple(dims), external["location"], int(external.get("offset", 0)),
                          int(external["length"]))


def external_initializers(onnx_path: str | Path) -> list[ExternalTensor]:
    """The main graph's initializers stored in external data files (ModelProto.graph = 7, initializer = 5)."""
    buf = memoryview(Path(onnx_path).read_bytes())
    out = []
    for field, _, graph in protobuf.fields(buf):
        if field == 7:
            for f, _, t in protobuf.fields(graph):
                if f == 5 and (tensor := _tensor(t)) is not None:
                    out.append(tensor)
    return out


# ---- one mapping per data file, one OrtValue per tensor -------------------------------------------------------
class SharedWeights:
    """Maps each data file once and hands out one OrtValue per distinct tensor (same file, offset, length)."""

    file_mode = "r"   # numpy.memmap mode; a test maps copy-on-write ("c") to see that sessions read these pages

    def __init__(self, ort_value_type):
        self.OrtValue = ort_value_type
        self.maps: dict[Path, np.memmap] = {}
        self.values: dict[tuple, object] = {}
        self.arrays: dict[tuple, np.ndarray] = {}   # keep the views alive: OrtValues do not own their memory

    def initializers(self, onnx_path: str | Path) -> tuple[list[str], list[object]]:
        """Names and shared OrtValues for the external tensors of one graph (those with a numpy-sized dtype)."""
        onnx_path = Path(onnx_path)
        names, values = [], []
        for t in external_initializers(onnx_path):
            value = self._value(onnx_path.parent / t.location, t)
            if value is not None:
                names.append(t.name)
                values.append(value)
        return names, values

    def _value(self, file: Path, t: ExternalTensor):
        dtype = ONNX_DTYPES.get(t.data_type)
        count = int(np.prod(t.dims, dtype=np.int64))
        if dtype is None or count * np.dtype(dtype).itemsize != t.length:
            return None   # e.g. 4-bit types (two per byte): left to ONNX Runtime's own loading
        key = (file.resolve(), t.offset, t.length, t.data_type, t.dims)
        if key not in self.values:
            if key[0] not in self.maps:
                self.maps[key[0]] = np.memmap(key[0], dtype=np.uint8, mode=self.file_mode)
            data = self.maps[key[0]][t.offset:t.offset + t.length]
            array = data.view(dtype).reshape(t.dims)
            self.arrays[key] = array
            if t.data_type in NUMPY_NATIVE:
                self.values[key] = self.OrtValue.ortvalue_from_numpy(array)
            else:
                self.values[key] = self.OrtValue.ortvalue_from_numpy_with_onnx_type(array, t.data_type)
        return self.values[key]

