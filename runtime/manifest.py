"""manifest.json: the contract between the exporter and every backend (and any C++ service). See docs/CONTRACT.md.

This module is the one place that names tensors: the exporter builds graphs with these names, backends bind by
them, and tests compare them with the ONNX files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ModelConfig, ModelError, read_json

FORMAT = "dllm-trt-manifest"
FORMAT_VERSION = 1
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class TensorSpec:
    name: str
    dtype: str                 # float32 | bfloat16 | float16 | int64 | bool
    shape: list                # ints and dimension names (see Manifest.dims)
    meaning: str = ""


@dataclass
class PieceSpec:
    name: str
    kind: str                  # embed | window | refresh | head
    layers: list[int]          # [first, last) for window/refresh, [] otherwise
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    file: str = ""
    sha256: str = ""
    data_file: str = ""
    data_size: int = 0
    data_sha256: str = ""
    shares_data_of: str = ""   # piece whose data file also holds some of this piece's weights (same range)


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

    def piece(self, name: str) -> PieceSpec:
        for p in self.pieces:
            if p.name == name:
                return p
        raise ModelError(f"manifest has no piece named {name!r}")

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": self.config.to_dict(), "dtype": self.dtype, "layer_ranges": self.layer_ranges,
            "dims": self.dims, "tokenizer_files": self.tokenizer_files, "export": self.export,
            "pieces": [asdict(p) for p in self.pieces],
        }

    def save(self, directory: Path) -> None:
        (Path(directory) / "manifest.json").write_text(json.dumps(self.to_json(), indent=2))


# ---- tensor names and shapes ----------------------------------------------------------------------------------
def range_name(first: int, last: int) -> str:
    return f"layers_{first:02d}_{last:02d}"


def piece_specs(cfg: ModelConfig, ranges: list[tuple[int, int]], dtype: str) -> list[PieceSpec]:
    act = DTYPES[dtype]
    H, hd, D = cfg.n_heads, cfg.head_dim, cfg.d_model
    pieces = [PieceSpec("embed", "embed", [],
                        [TensorSpec("input_ids", "int64", ["n_tokens"], "token ids to embed")],
                        [TensorSpec("hidden_states", act, ["n_tokens", D], "embeddings of input_ids")])]
    for a, b in ranges:
        ins = [
            TensorSpec("hidden_states", act, ["active_len", D], f"input of layer {a} for the query rows"),
            TensorSpec("position_ids", "int64", ["active_len"], "canvas slot of each query row (distinct)"),
            TensorSpec("track_rows", "int64", ["track_len"], "rows (into the query rows) of the tracked tokens"),
            TensorSpec("window_rows", "int64", ["window_len"], "rows (into the query rows) of the decoding window"),
            TensorSpec("key_is_mask", "bool", ["seq_len"], "true where the canvas slot still holds MASK"),
        ]
        outs = [TensorSpec("hidden_states_out", act, ["active_len", D], f"output of layer {b - 1} for the query rows")]
        for L in range(a, b):
            ins += [
                TensorSpec(f"past_key_values.{L}.key", act, [H, "seq_len", hd], "post-RoPE key cache before this step"),
                TensorSpec(f"past_key_values.{L}.value", act, [H, "seq_len", hd], "value cache before this step"),
                TensorSpec(f"track_queries.{L}", act, [H, "track_len", hd], "cached post-RoPE queries of tracked tokens"),
            ]
            outs += [
                TensorSpec(f"new_key_values.{L}.key", act, [H, "active_len", hd], "write to key cache at position_ids"),
                TensorSpec(f"new_key_values.{L}.value", act, [H, "active_len", hd], "write to value cache at position_ids"),
                TensorSpec(f"new_queries.{L}", act, [H, "active_len", hd], "write to query cache at position_ids"),
                TensorSpec(f"drift.{L}", "float32", [2], "similarity of the tracked tokens' old and new attention: "
                           "[0] cosine across heads (reference code), [1] cosine across keys (paper); mean"),
                TensorSpec(f"attn_colsum.{L}", "float32", ["seq_len"], "attention of the window rows received by "
                           "each canvas slot, summed over heads and rows; 0 for MASK slots"),
            ]
        pieces.append(PieceSpec(f"{range_name(a, b)}.window", "window", [a, b], ins, outs))
        ins = [
            TensorSpec("hidden_states", act, ["seq_len", D], f"input of layer {a} for every canvas slot"),
            TensorSpec("position_ids", "int64", ["seq_len"], "0 .. seq_len-1"),
            TensorSpec("window_positions", "int64", ["window_len"], "canvas slots of the decoding window"),
            TensorSpec("key_is_mask", "bool", ["seq_len"], "true where the canvas slot still holds MASK"),
        ]
        outs = [TensorSpec("hidden_states_out", act, ["seq_len", D], f"output of layer {b - 1}")]
        for L in range(a, b):
            outs += [
                TensorSpec(f"key_values.{L}.key", act, [H, "seq_len", hd], "the whole key cache of layer L"),
                TensorSpec(f"key_values.{L}.value", act, [H, "seq_len", hd], "the whole value cache of layer L"),
                TensorSpec(f"queries.{L}", act, [H, "seq_len", hd], "the whole query cache of layer L"),
                TensorSpec(f"attn_colsum.{L}", "float32", ["seq_len"], "as in window mode"),
            ]
        pieces.append(PieceSpec(f"{range_name(a, b)}.refresh", "refresh", [a, b], ins, outs))
    pieces.append(PieceSpec("head", "head", [],
                            [TensorSpec("hidden_states", act, ["n_hidden", D], "output of the last layer"),
                             TensorSpec("rows", "int64", ["n_rows"], "rows of hidden_states to decode")],
                            [TensorSpec("tokens", "int64", ["n_rows"], "argmax token (never MASK)"),
                             TensorSpec("probs", "float32", ["n_rows"], "its softmax probability")]))
    return pieces


def dims_for(max_len: int, max_active: int) -> dict[str, dict[str, int]]:
    return {
        "seq_len": {"min": 2, "max": max_len},          # canvas length: prompt + gen length
        "active_len": {"min": 1, "max": max_active},    # query rows of a window pass
        "track_len": {"min": 1, "max": max_active},
        "window_len": {"min": 1, "max": max_active},
        "n_tokens": {"min": 1, "max": max_len},
        "n_hidden": {"min": 1, "max": max_len},
        "n_rows": {"min": 1, "max": max_active},
    }


# ---- loading -------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(directory: str | Path, verify_data: bool = False) -> Manifest:
    """Read and validate manifest.json; check every graph file's sha256 (and data sizes, or data hashes)."""
    d = Path(directory)
    path = d / "manifest.json"
    raw = read_json(path, f"export a model first: dllm-trt export --model DIR --out {d}")
    if raw.get("format") != FORMAT:
        raise ModelError(f"{path}: not a dllm-trt manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: manifest format version {raw.get('format_version')!r} is not supported by this "
                         f"runtime (it reads version {FORMAT_VERSION}); re-export with this version of dllm-trt")
    try:
        pieces = [PieceSpec(**{**p, "inputs": [TensorSpec(**t) for t in p["inputs"]],
                               "outputs": [TensorSpec(**t) for t in p["outputs"]]}) for p in raw["pieces"]]
        m = Manifest(ModelConfig.from_dict(raw["model"]), raw["dtype"], raw["layer_ranges"], raw["dims"], pieces,
                     raw.get("tokenizer_files", []), raw.get("export", {}), d)
    except (KeyError, TypeError) as e:
        raise ModelError(f"{path}: malformed manifest ({e})") from None
    for p in m.pieces:
        f = d / p.file
        if not f.is_file():
            raise ModelError(f"{f}: missing (listed in manifest.json for piece {p.name})")
        if sha256_file(f) != p.sha256:
            raise ModelError(f"{f}: sha256 does not match manifest.json (the file was edited or replaced); "
                             f"re-export")
        if p.data_file:
            df = d / p.data_file
            if not df.is_file():
                raise ModelError(f"{df}: missing (external weights of piece {p.name})")
            if df.stat().st_size != p.data_size or (verify_data and sha256_file(df) != p.data_sha256):
                raise ModelError(f"{df}: weights do not match manifest.json (size or sha256 differs); re-export")
    return m
