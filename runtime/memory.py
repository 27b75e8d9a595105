"""Process memory figures and one shared, memory-mapped copy of the exported weights.

ONNX Runtime would otherwise read every piece's external data into its own buffers, so the window and refresh
sessions of a range (whose graphs point at the same data file) each held a copy. Here every data file is mapped
once (numpy.memmap, read-only, so its pages are the page cache's and are shared with other processes serving the
same folder) and each external tensor becomes one OrtValue on top of the mapping, handed to every session that
uses it. Only numpy (and onnxruntime's OrtValue, passed in) are used: no onnx package on the runtime path, so the
.onnx files are read with the small protobuf reader below.
"""
from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import protobuf
from .config import ModelConfig, ModelError

# ONNX TensorProto.DataType -> numpy dtype of the same item size (bf16 and the float8 types have no numpy dtype:
# their bytes are viewed as unsigned integers and the OrtValue is tagged with the ONNX type instead).
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64, 16: np.uint16,
               17: np.uint8, 18: np.uint8, 19: np.uint8, 20: np.uint8}
NUMPY_NATIVE = {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13}


def _status_bytes(field: str) -> int | None:
    """A size line of /proc/self/status (VmHWM, VmRSS, ...) in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Largest resident set of this process so far (VmHWM), in bytes."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def current_rss_bytes() -> int:
    """This process's resident set now (VmRSS; the peak where that cannot be read)."""
    rss = _status_bytes("VmRSS")
    return peak_rss_bytes() if rss is None else rss


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


# ---- what the machine has, and what a canvas needs -----------------------------------------------------------
GiB = 1 << 30
ACTIVATION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _limit_file(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None   # "max" (cgroup v2): no limit


def machine_memory_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory this process may use at most: physical memory, capped by a cgroup limit (v2 memory.max, v1
    memory.limit_in_bytes) and by the address-space and data rlimits; None where none of them can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for f in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        limit = _limit_file(f)
        if limit:   # cgroup v1 says "no limit" with a huge number: the minimum below ignores it
            limits.append(limit)
    for which in (resource.RLIMIT_AS, getattr(resource, "RLIMIT_DATA", None)):
        if which is not None:
            soft = resource.getrlimit(which)[0]
            if soft != resource.RLIM_INFINITY and soft > 0:
                limits.append(soft)
    return min(limits) if limits else None


def cache_bytes(cfg: ModelConfig, dtype: str, n_ranges: int, n: int) -> int:
    """What every backend keeps for a canvas of n positions: key, value and query of each layer
    ([n_heads, n, head_dim] = n x d_model each) and the hidden states at each range boundary plus the final ones."""
    return (3 * cfg.n_layers + n_ranges + 1) * n * cfg.d_model * ACTIVATION_BYTES[dtype]


def attention_bytes(cfg: ModelConfig, n: int) -> int:
    """The float32 attention probabilities [n_heads, n, n] of one layer that a refresh pass of the exported graphs
    computes (every canvas slot attends to every other)."""
    return cfg.n_heads * n * n * 4


def canvas_bytes(cfg: ModelConfig, dtype: str, n_ranges: int, n: int) -> int:
    """A lower bound on the memory a generation (or the warm-up) at canvas length n needs besides the weights."""
    return cache_bytes(cfg, dtype, n_ranges, n) + attention_bytes(cfg, n)


def gib(n: int) -> str:
    return f"{n / GiB:.3g} GiB"


def require_memory(needed: int, what: str, hint: str = "", available: int | None = None) -> None:
    """One ModelError naming the numbers when `what` needs more memory than this machine has (machine_memory_bytes;
    nothing is refused where that is unknown)."""
    available = machine_memory_bytes() if available is None else available
    if available is not None and needed > available:
        raise ModelError(f"{what} needs at least {gib(needed)} of memory ({needed} bytes), more than the "
                         f"{gib(available)} this machine has{'; ' + hint if hint else ''}")


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

    def release(self, data_file: str | Path) -> None:
        """Drop this process's resident pages of a data file's mapping (MADV_DONTNEED). Only for a read-only mapping
        whose tensors the sessions have pre-packed into copies of their own: a page read again later comes back
        from the file, unchanged."""
        import mmap

        mapping = self.maps.get(Path(data_file).resolve())
        if mapping is not None and self.file_mode == "r" and hasattr(mmap, "MADV_DONTNEED"):
            mapping._mmap.madvise(mmap.MADV_DONTNEED)

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

