"""manifest.json: the contract between the exporter and every backend (and any C++ service). See docs/CONTRACT.md.

This module is the one place that names tensors: the exporter builds graphs with these names, backends bind by
them, and tests compare them with the ONNX files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import memory, protobuf
from .calibration import check_calibration
from .config import MAX_SIZE, ModelConfig, ModelError, config_from_manifest, is_int, read_json
from .paths import inside

FORMAT = "dllm-trt-manifest"
FORMAT_VERSION = 2                  # 1: a window and a refresh graph per range, batch 1
READ_BY_NAME = ("tokenizer.json", "tokenizer_config.json")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANT_SCHEMES = ("int8", "int4")   # weight-only, MatMulNBits; older manifests without "quantization" are float


@dataclass
class TensorSpec:
    name: str
    dtype: str                 # float32 | bfloat16 | float16 | int64 | bool
    shape: list                # ints and dimension names (see Manifest.dims)
    meaning: str = ""


@dataclass
class PieceSpec:
    name: str
    kind: str                  # embed | layers | head
    layers: list[int]          # [first, last) for a layer range, [] otherwise
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    file: str = ""
    sha256: str = ""
    data_file: str = ""
    data_size: int = 0
    data_sha256: str = ""


@dataclass
class Manifest:
    config: ModelConfig
    dtype: str                               # fp32 | bf16 | fp16 (activation dtype of the graphs)
    layer_ranges: list[list[int]]
    dims: dict[str, dict[str, int]]
    pieces: list[PieceSpec]
    tokenizer_files: list[str] = field(default_factory=list)
    export: dict = field(default_factory=dict)
    directory: Path | None = None
    # weight-only quantization of the layer-range and head graphs ({} = float weights): scheme (int8 | int4),
    # bits, block_size, symmetric, accuracy_level, op, tool and tool versions
    quantization: dict = field(default_factory=dict)
    # the drift thresholds `dllm-trt calibrate` measured ({} = not calibrated): runtime/calibration.py
    calibration: dict = field(default_factory=dict)
    # the shapes each mode of a layer-range piece runs at: {mode: {dim: {"min", "max"}}} (narrowing dims)
    profiles: dict = field(default_factory=dict)

    def piece(self, name: str) -> PieceSpec:
        for p in self.pieces:
            if p.name == name:
                return p
        raise ModelError(f"manifest has no piece named {name!r}")

    @property
    def max_active(self) -> int:
        """The most query rows of a window pass."""
        return self.profiles["window"]["rows"]["max"]

    def range_piece(self, r: int) -> PieceSpec:
        return self.piece(range_name(*self.layer_ranges[r]))

    def weight_bytes(self) -> int:
        """Bytes of the data files."""
        return sum({p.data_file: p.data_size for p in self.pieces if p.data_file}.values())

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": self.config.to_dict(), "dtype": self.dtype, "layer_ranges": self.layer_ranges,
            "dims": self.dims, "profiles": self.profiles, "tokenizer_files": self.tokenizer_files,
            "export": self.export, "pieces": [asdict(p) for p in self.pieces],
        } | ({"quantization": self.quantization} if self.quantization else {}) \
          | ({"calibration": self.calibration} if self.calibration else {})

    def save(self, directory: Path) -> None:
        (Path(directory) / "manifest.json").write_text(json.dumps(self.to_json(), indent=2))


# ---- tensor names and shapes ----------------------------------------------------------------------------------
def range_name(first: int, last: int) -> str:
    return f"layers_{first:02d}_{last:02d}"


@dataclass(frozen=True)
class LayerNames:
    """Names of one layer's tensors in a layer-range piece (inputs, then outputs)."""
    past_key: str
    past_value: str
    track_queries: str
    new_key: str
    new_value: str
    new_queries: str
    drift: str
    colsum: str


def layer_names(layer: int) -> LayerNames:
    return LayerNames(f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", f"track_queries.{layer}",
                      f"new_key_values.{layer}.key", f"new_key_values.{layer}.value", f"new_queries.{layer}",
                      f"drift.{layer}", f"attn_colsum.{layer}")


# inputs of a layer-range piece before the per-layer caches, in order
RANGE_INPUTS = ("hidden_states", "position_ids", "canvas_lengths", "key_is_mask", "track_rows", "window_rows")
MODES = ("window", "refresh")   # the two profiles of a layer-range piece


def piece_specs(cfg: ModelConfig, ranges: list[tuple[int, int]], dtype: str) -> list[PieceSpec]:
    act = DTYPES[dtype]
    H, hd, D = cfg.n_heads, cfg.head_dim, cfg.d_model
    pieces = [PieceSpec("embed", "embed", [],
                        [TensorSpec("input_ids", "int64", ["batch", "n_tokens"], "token ids to embed (pad with any "
                                    "id below embedding_size)")],
                        [TensorSpec("hidden_states", act, ["batch", "n_tokens", D], "embeddings of input_ids")])]
    for a, b in ranges:
        ins = [
            TensorSpec("hidden_states", act, ["batch", "rows", D], f"input of layer {a} for the query rows"),
            TensorSpec("position_ids", "int64", ["batch", "rows"], "canvas slot of each query row, distinct within "
                       "a sequence; -1 = padding row"),
            TensorSpec("canvas_lengths", "int64", ["batch"], "slots of each sequence's canvas; the slots beyond "
                       "are padding (never attended)"),
            TensorSpec("key_is_mask", "bool", ["batch", "seq_len"], "true where the canvas slot still holds MASK"),
            TensorSpec("track_rows", "int64", ["batch", "track_len"], "rows (into the query rows) of the tracked "
                       "tokens; -1 = padding"),
            TensorSpec("window_rows", "int64", ["batch", "window_len"], "rows (into the query rows) of the decoding "
                       "window; -1 = padding"),
        ]
        outs = [TensorSpec("hidden_states_out", act, ["batch", "rows", D], f"output of layer {b - 1} for the query "
                           f"rows")]
        for L in range(a, b):
            n = layer_names(L)
            ins += [
                TensorSpec(n.past_key, act, ["batch", H, "seq_len", hd], "post-RoPE key cache before this step "
                           "(read at slots that are not query rows)"),
                TensorSpec(n.past_value, act, ["batch", H, "seq_len", hd], "value cache before this step"),
                TensorSpec(n.track_queries, act, ["batch", H, "track_len", hd], "cached post-RoPE queries of the "
                           "tracked tokens"),
            ]
            outs += [
                TensorSpec(n.new_key, act, ["batch", H, "rows", hd], "write to the key cache at position_ids"),
                TensorSpec(n.new_value, act, ["batch", H, "rows", hd], "write to the value cache at position_ids"),
                TensorSpec(n.new_queries, act, ["batch", H, "rows", hd], "write to the query cache at position_ids"),
                TensorSpec(n.drift, "float32", ["batch", 2], "similarity of the tracked tokens' old and new "
                           "attention: [0] cosine across heads (reference code), [1] cosine across keys (paper); "
                           "mean over tracked rows (window mode; meaningless in refresh mode)"),
                TensorSpec(n.colsum, "float32", ["batch", "seq_len"], "attention of the window rows received by "
                           "each canvas slot, summed over heads and rows; 0 for MASK and padding slots"),
            ]
        pieces.append(PieceSpec(range_name(a, b), "layers", [a, b], ins, outs))
    pieces.append(PieceSpec("head", "head", [],
                            [TensorSpec("hidden_states", act, ["batch", "n_hidden", D], "output of the last layer"),
                             TensorSpec("rows", "int64", ["batch", "n_rows"], "rows of hidden_states to decode; "
                                        "-1 = padding")],
                            [TensorSpec("tokens", "int64", ["batch", "n_rows"], "argmax token (never MASK)"),
                             TensorSpec("probs", "float32", ["batch", "n_rows"], "its softmax probability")]))
    return pieces


DEFAULT_MAX_BATCH = 8   # sequences one piece call may take, unless export --max-batch says otherwise
MAX_BATCH_LIMIT = 1024  # the most sequences any setting may ask for (export/build --max-batch, serve, bench)


def dims_for(max_len: int, max_active: int, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, dict[str, int]]:
    return {
        "batch": {"min": 1, "max": max_batch},          # sequences decoded together
        "seq_len": {"min": 2, "max": max_len},          # canvas length: prompt + gen length (longest in a batch)
        "rows": {"min": 1, "max": max_len},             # query rows: few in window mode, seq_len in refresh mode
        "track_len": {"min": 1, "max": max_active},
        "window_len": {"min": 1, "max": max_active},
        "n_tokens": {"min": 1, "max": max_len},
        "n_hidden": {"min": 1, "max": max_len},
        "n_rows": {"min": 1, "max": max_active},
    }


def profiles_for(max_len: int, max_active: int) -> dict[str, dict[str, dict[str, int]]]:
    """The two modes of a layer-range piece as shape profiles: window mode runs up to max_active query rows,
    refresh mode one query row per canvas slot (rows = seq_len)."""
    return {"window": {"rows": {"min": 1, "max": max_active}},
            "refresh": {"rows": {"min": 2, "max": max_len}}}


# ---- loading -------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(directory: str | Path, verify_data: bool = False) -> Manifest:
    """Read and validate manifest.json; check every graph file's sha256 and that its external data stays among
    the manifest's data files, and every data file's size and sha256 (hashed once per file version, see
    verified_cache_path; `verify_data` hashes them always)."""
    d = Path(directory)
    path = d / "manifest.json"
    raw = read_json(path, f"export a model first: dllm-trt export --model DIR --out {d}")
    if raw.get("format") != FORMAT:
        raise ModelError(f"{path}: not a dllm-trt manifest")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        source = raw.get("export", {}).get("source") if isinstance(raw.get("export"), dict) else None
        again = (f"dllm-trt export --model {source if isinstance(source, str) and source else 'CHECKPOINT'} "
                 f"--out {d}")
        if version == 1:
            raise ModelError(f"{path}: exported by an older dllm-trt (manifest format 1: a window and a refresh "
                             f"graph per layer range, batch 1); this runtime reads format {FORMAT_VERSION}: "
                             f"re-export it ({again})")
        shown = version if is_int(version) and abs(version) < 10 ** 12 else repr(str(version)[:40])
        raise ModelError(f"{path}: manifest format version {shown} is not supported by this "
                         f"runtime (it reads version {FORMAT_VERSION}); re-export with this version of dllm-trt "
                         f"({again})")
    m = _parse(raw, path, d)
    check_memory(m, path)
    for p in m.pieces:
        inside(d, p.file, f"graph file of piece {p.name}")
        if p.data_file:
            inside(d, p.data_file, f"data file of piece {p.name}")
    for name in m.tokenizer_files:
        if not inside(d, name, "tokenizer file").is_file():
            raise ModelError(f"{d / name}: missing (listed in manifest.json as a tokenizer file)")
    for name in READ_BY_NAME:  # the tokenizer loader opens these whether listed or not
        if (d / name).is_symlink():
            inside(d, name, "tokenizer file")
    data_files = {os.path.normpath(p.data_file) for p in m.pieces if p.data_file}
    for p in m.pieces:
        f = d / p.file
        if not f.is_file():
            raise ModelError(f"{f}: missing (listed in manifest.json for piece {p.name})")
        graph = f.read_bytes()
        if hashlib.sha256(graph).hexdigest() != p.sha256:
            raise ModelError(f"{f}: sha256 does not match manifest.json (the file was edited or replaced); "
                             f"re-export")
        check_graph_io(graph, f, p)
        for location in onnx_external_locations(graph, f):
            inside(d, location, f"external data of {p.file}")
            if os.path.normpath(location) not in data_files:
                raise ModelError(f"{f}: its weights are read from '{location}', which manifest.json does not list "
                                 f"as a data file")
    with VerifiedFiles(always=verify_data) as verified:
        for p in m.pieces:
            if p.data_file:
                df = d / p.data_file
                if not df.is_file():
                    raise ModelError(f"{df}: missing (external weights of piece {p.name})")
                verified.check(df, p.data_size, p.data_sha256)
    return m


# ---- structure -----------------------------------------------------------------------------------------------
def _parse(raw: dict, path: Path, d: Path) -> Manifest:
    """The manifest as objects, refused with one line unless it has exactly the pieces and tensors that
    piece_specs gives for its model, dtype and layer ranges."""
    def bad(what: str):
        return ModelError(f"{path}: malformed manifest ({what})")

    cfg = config_from_manifest(raw.get("model"), path)
    dtype = raw.get("dtype")
    if dtype not in DTYPES:
        raise bad(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ranges = raw.get("layer_ranges")
    if not _is_ranges(ranges, cfg.n_layers):
        raise bad(f"layer_ranges must split 0..{cfg.n_layers} into consecutive [first, last) pairs, got {ranges!r}")
    dims = _dims(raw.get("dims"), set(dims_for(2, 1)), "dims", bad)
    profiles = raw.get("profiles")
    if not isinstance(profiles, dict) or set(profiles) != set(MODES):
        raise bad(f"profiles must name exactly {', '.join(MODES)}")
    profiles = {mode: _dims(p, set(dims), f"profiles.{mode}", bad, subset=True) for mode, p in profiles.items()}
    for mode, p in profiles.items():
        for name, r in p.items():
            if not dims[name]["min"] <= r["min"] <= r["max"] <= dims[name]["max"]:
                raise bad(f"profiles.{mode}.{name} must lie inside dims.{name}")
    pieces = raw.get("pieces")
    if not isinstance(pieces, list) or not pieces:
        raise bad("pieces must be a non-empty list")
    pieces = [_piece(p, i, bad) for i, p in enumerate(pieces)]
    expected = piece_specs(cfg, [tuple(r) for r in ranges], dtype)
    if [_signature(p) for p in pieces] != [_signature(p) for p in expected]:
        got = next((p.name for p, e in zip(pieces, expected) if _signature(p) != _signature(e)),
                   f"{len(pieces)} pieces, {len(expected)} expected")
        raise bad(f"pieces do not match the model and layer ranges (first difference: {got})")
    tokenizer_files = raw.get("tokenizer_files", [])
    if not isinstance(tokenizer_files, list) or not all(isinstance(t, str) for t in tokenizer_files):
        raise bad("tokenizer_files must be a list of file names")
    export = raw.get("export", {})
    if not isinstance(export, dict):
        raise bad("export must be an object")
    quantization = raw.get("quantization", {})
    if not (isinstance(quantization, dict) and (not quantization or (
            quantization.get("scheme") in QUANT_SCHEMES and is_int(quantization.get("block_size"))))):
        raise bad(f"quantization must be {{}} or name a scheme ({', '.join(QUANT_SCHEMES)}) and a block_size")
    calibration = check_calibration(raw["calibration"], bad) if "calibration" in raw else {}
    return Manifest(cfg, dtype, [list(r) for r in ranges], dims, pieces, tokenizer_files, export, d, quantization,
                    calibration, profiles)


def _dims(raw, names: set[str], where: str, bad, subset: bool = False) -> dict[str, dict[str, int]]:
    """{name: {"min": m, "max": n}} with 1 <= m <= n <= MAX_SIZE, naming exactly `names` (some of them: subset)."""
    if not isinstance(raw, dict) or (set(raw) - names if subset else set(raw) != names):
        raise bad(f"{where} must name {'some' if subset else 'exactly'} of {', '.join(sorted(names))}")
    for name, r in raw.items():
        if not (isinstance(r, dict) and is_int(r.get("min")) and is_int(r.get("max"))
                and 1 <= r["min"] <= r["max"] <= MAX_SIZE):
            raise bad(f"{where}.{name} must be {{\"min\": m, \"max\": n}} with 1 <= m <= n <= {MAX_SIZE}, "
                      f"got {repr(r)[:80]}")
    return raw


def _is_ranges(ranges, n_layers: int) -> bool:
    if not isinstance(ranges, list) or not ranges:
        return False
    start = 0
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2 and all(is_int(x) for x in r) and r[0] == start < r[1]):
            return False
        start = r[1]
    return start == n_layers


_PIECE_TYPES = {"name": str, "kind": str, "layers": list, "inputs": list, "outputs": list, "file": str,
                "sha256": str, "data_file": str, "data_size": int, "data_sha256": str}


def _piece(p, i: int, bad) -> PieceSpec:
    if not isinstance(p, dict):
        raise bad(f"pieces[{i}] must be an object")
    for key, typ in _PIECE_TYPES.items():
        if key not in p and key in ("name", "kind", "layers", "inputs", "outputs", "file", "sha256"):
            raise bad(f"pieces[{i}] has no '{key}'")
        if key in p and (not isinstance(p[key], typ) or isinstance(p[key], bool)):
            raise bad(f"pieces[{i}].{key} must be {typ.__name__}, got {p[key]!r}")
    tensors = {}
    for side in ("inputs", "outputs"):
        tensors[side] = [_tensor(t, f"pieces[{i}].{side}[{j}]", bad) for j, t in enumerate(p[side])]
    spec = PieceSpec(**{k: p[k] for k in _PIECE_TYPES if k in p and k not in ("inputs", "outputs")},
                     inputs=tensors["inputs"], outputs=tensors["outputs"])
    if spec.data_size < 0:
        raise bad(f"pieces[{i}].data_size must not be negative")
    return spec


def _tensor(t, where: str, bad) -> TensorSpec:
    if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)
            and isinstance(t.get("shape"), list) and isinstance(t.get("meaning", ""), str)):
        raise bad(f"{where} needs a name, a dtype and a shape")
    return TensorSpec(t["name"], t["dtype"], t["shape"], t.get("meaning", ""))


def _signature(p: PieceSpec):
    return (p.name, p.kind, p.layers, [(t.name, t.dtype, t.shape) for t in p.inputs],
            [(t.name, t.dtype, t.shape) for t in p.outputs])


def max_positions(m: Manifest) -> int:
    """The longest canvas the engine runs (and the server warms up at)."""
    return min(m.config.max_sequence_length, m.dims["seq_len"]["max"])


def check_memory(m: Manifest, path: Path) -> None:
    """Refuse an fp32 engine whose longest canvas needs more memory than this machine has (its caches and one
    layer's attention, memory.canvas_bytes; the weights are mapped from their files and not counted). fp16 / bf16
    engines run on GPUs only, whose memory is the GPU backends' to check."""
    if m.dtype != "fp32":
        return
    n = max_positions(m)
    memory.require_memory(memory.canvas_bytes(m.config, m.dtype, len(m.layer_ranges), n),
                          f"{path}: a canvas of {n} positions (dims.seq_len.max and model.max_sequence_length)",
                          "re-export with a smaller --max-len")


# ---- data file integrity -------------------------------------------------------------------------------------
def verified_cache_path() -> Path:
    """Where verified data files are remembered: $DLLM_TRT_CACHE_DIR, else $XDG_CACHE_HOME/dllm-trt, else
    ~/.cache/dllm-trt."""
    if os.environ.get("DLLM_TRT_CACHE_DIR"):
        return Path(os.environ["DLLM_TRT_CACHE_DIR"]) / "verified.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dllm-trt" / "verified.json"


_IN_MEMORY: dict[str, list] = {}  # used as well when the cache file cannot be written
_CACHE_LIMIT = 4096
_UNTRUSTED_SAID: set[str] = set()  # cache folders already reported as not trusted (once per process)


def _trusted_cache_dir(d: Path) -> bool:
    """Whether records in folder `d` may be trusted and written: it is this user's and no one else can write there
    (else anyone could forge a record that skips hashing, or plant symlinks where the cache is written). False
    when it does not exist. Without POSIX owners (Windows), any existing folder."""
    try:
        st = os.stat(d)
    except OSError:
        return False
    if not hasattr(os, "getuid"):
        return True
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _say_untrusted(d: Path) -> None:
    import sys

    if str(d) not in _UNTRUSTED_SAID:
        _UNTRUSTED_SAID.add(str(d))
        print(f"warning: {d} is writable by other users or not yours: its records of verified data files are "
              f"neither used nor written (hashing data files on every load instead; chmod go-w it, or set "
              f"$DLLM_TRT_CACHE_DIR)", file=sys.stderr)


def _read_cache(path: Path) -> dict:
    """verified.json's records: {} unless it is a regular file of this user's that no one else can write, opened
    without following a symlink."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and
                                             (st.st_uid != os.getuid() or st.st_mode & 0o022)):
            return {}
        try:
            stored = json.loads(f.read())
        except (OSError, ValueError, RecursionError):
            return {}
    return stored if isinstance(stored, dict) else {}


class VerifiedFiles:
    """Checks a data file's size and sha256, skipping the hash when this exact file version was hashed before.

    A version is (size, mtime_ns, ctime_ns, inode, device): rewriting a file changes its mtime and ctime, and
    setting the mtime back (utime) changes the ctime, which no unprivileged call can set. Records on disk are
    trusted only in a folder of this user's that no one else can write (_trusted_cache_dir)."""

    def __init__(self, always: bool = False):
        self.always, self.path, self.changed = always, verified_cache_path(), False
        self.known = dict(_IN_MEMORY)

    def __enter__(self):
        if _trusted_cache_dir(self.path.parent):
            self.known.update(_read_cache(self.path))
        elif self.path.parent.exists():
            _say_untrusted(self.path.parent)
        return self

    def check(self, path: Path, size: int, sha256: str) -> None:
        st = path.stat()
        if st.st_size != size:
            raise ModelError(f"{path}: weights do not match manifest.json (size {st.st_size}, manifest says {size}); "
                             f"re-export")
        key = str(path.resolve())
        version = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, sha256]
        if not self.always and self.known.get(key) == version:
            return
        if sha256_file(path) != sha256:
            raise ModelError(f"{path}: weights do not match manifest.json (sha256 differs: the file is corrupt or "
                             f"was replaced); re-export")
        self.known.pop(key, None)
        self.known[key] = _IN_MEMORY[key] = version
        self.changed = True

    def __exit__(self, *exc):
        if not self.changed or exc[0] is not None:
            return
        import tempfile

        d = self.path.parent
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:  # not writable: this process still remembers (_IN_MEMORY)
            return
        if not _trusted_cache_dir(d):
            _say_untrusted(d)
            return
        keep = dict(list(self.known.items())[-_CACHE_LIMIT:])
        try:  # a new file of a fresh name, created exclusively: never one planted there, nor a symlink's target
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(keep))
            os.replace(tmp, self.path)  # atomic, and replaces a symlink rather than writing through it
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ---- external data named inside ONNX graphs ------------------------------------------------------------------
# onnx is not a runtime dependency, so the few ONNX messages that can hold tensors are walked directly in the
# protobuf wire format. Field numbers from onnx.proto; "entry" is a StringStringEntryProto (key 1, value 2).
_ONNX_FIELDS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}


LOCATION = b"location"


def onnx_external_locations(data: bytes, path: Path) -> list[str]:
    """The `location` of every external-data tensor in a serialised ONNX model."""
    out: list[str] = []
    try:
        _walk(memoryview(data), "model", out, 0)
    except (ValueError, IndexError, RecursionError) as e:
        raise ModelError(f"{path}: not a valid ONNX file ({e})") from None
    return out


def _walk(buf: memoryview, kind: str, out: list[str], depth: int) -> None:
    if depth > 64:
        raise ValueError("graphs nested too deeply")
    entry = {}
    for number, wire, value in protobuf.fields(buf):
        if wire != 2:  # only strings and sub-messages lead to a location
            continue
        if kind == "entry" and number in (1, 2):
            entry[number] = bytes(value).decode("utf-8")
        elif number in _ONNX_FIELDS[kind] and LOCATION in value.tobytes():
            # a message holds a location entry only if its bytes spell the key (sub-messages are stored verbatim),
            # so the many nodes without one are skipped unparsed
            _walk(value, _ONNX_FIELDS[kind][number], out, depth + 1)
    if kind == "entry" and entry.get(1) == "location":
        out.append(entry.get(2, ""))


# ---- the graph's inputs and outputs against the manifest -----------------------------------------------------
# Read from the serialised model without onnx (ModelProto.graph = 7; GraphProto initializer = 5, input = 11,
# output = 12; ValueInfoProto name = 1, type = 2; TypeProto tensor_type = 1; Tensor elem_type = 1, shape = 2;
# TensorShapeProto dim = 1; Dimension dim_value = 1, dim_param = 2; TensorProto name = 8).
ONNX_ELEMENT_TYPES = {"float32": 1, "int64": 7, "bool": 9, "float16": 10, "bfloat16": 16}
_ELEMENT_NAMES = {v: k for k, v in ONNX_ELEMENT_TYPES.items()}


def _message(buf: memoryview, number: int) -> memoryview | None:
    found = None
    for n, wire, value in protobuf.fields(buf):
        if n == number and wire == 2:
            found = value   # protobuf: the last occurrence wins
    return found


def _value_info(buf: memoryview) -> tuple[str, int, list | None]:
    """(name, element type, dims) of a graph input or output; dims None when the graph gives no shape, each dim an
    int (fixed), a str (named) or None (unknown)."""
    name, elem, dims = "", 0, None
    for n, wire, value in protobuf.fields(buf):
        if n == 1 and wire == 2:
            name = bytes(value).decode("utf-8")
        elif n == 2 and wire == 2 and (tensor := _message(value, 1)) is not None:
            for m, w, v in protobuf.fields(tensor):
                if m == 1 and w == 0:
                    elem = v
                elif m == 2 and w == 2:
                    dims = []
                    for k, w2, dim in protobuf.fields(v):
                        if k != 1 or w2 != 2:
                            continue
                        d = None
                        for j, w3, x in protobuf.fields(dim):
                            if j == 1 and w3 == 0:
                                d = x
                            elif j == 2 and w3 == 2:
                                d = bytes(x).decode("utf-8")
                        dims.append(d)
    return name, elem, dims


def graph_io(data: bytes, path: Path) -> tuple[list, list]:
    """The main graph's inputs (initializers left out) and outputs, as _value_info gives them; weights are not read."""
    try:
        graph = _message(memoryview(data), 7)
        if graph is None:
            raise ValueError("it has no graph")
        inputs, outputs, initializers = [], [], set()
        for n, wire, value in protobuf.fields(graph):
            if wire != 2:
                continue
            if n == 11:
                inputs.append(_value_info(value))
            elif n == 12:
                outputs.append(_value_info(value))
            elif n == 5:
                initializers.update(bytes(v).decode("utf-8") for f, w, v in protobuf.fields(value) if f == 8 and w == 2)
    except (ValueError, IndexError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
        raise ModelError(f"{path}: not a valid ONNX file ({e})") from None
    return [i for i in inputs if i[0] not in initializers], outputs


def _dims_agree(dims: list | None, shape: list) -> bool:
    if dims is None:
        return True   # no shape recorded: nothing to compare
    if len(dims) != len(shape):
        return False
    # a size the manifest fixes must not be another size in the graph; one it names must not be fixed there
    return all(not isinstance(d, int) or d == s if isinstance(s, int) else not isinstance(d, int)
               for d, s in zip(dims, shape))


def _shown(elem: int, dims: list | None) -> str:
    return f"{_ELEMENT_NAMES.get(elem, f'element type {elem}')} {dims if dims is not None else '(no shape)'}"


def check_graph_io(data: bytes, path: Path, spec: PieceSpec) -> None:
    """The graph's inputs and outputs must be the piece's: names, element types and fixed sizes (so graph files
    swapped between pieces, or a manifest whose n_heads / d_model are not the graphs', are refused at load)."""
    inputs, outputs = graph_io(data, path)
    hint = "the graph files were swapped or the manifest edited; re-export"
    for side, got, want in (("input", inputs, spec.inputs), ("output", outputs, spec.outputs)):
        names = {g[0] for g in got}
        missing = [t.name for t in want if t.name not in names]
        extra = sorted(names - {t.name for t in want})
        if missing or extra:
            what = (f"lacks {side} '{missing[0]}', which" if missing else f"has {side} '{extra[0]}', which no")
            raise ModelError(f"{path}: the graph {what} manifest.json lists for piece {spec.name}; {hint}")
        by_name = {g[0]: g for g in got}
        for t in want:
            _, elem, dims = by_name[t.name]
            if elem != ONNX_ELEMENT_TYPES.get(t.dtype) or not _dims_agree(dims, t.shape):
                raise ModelError(f"{path}: {side} '{t.name}' is {_shown(elem, dims)} in the graph, but manifest.json "
                                 f"says {t.dtype} {t.shape} (piece {spec.name}); {hint}")
