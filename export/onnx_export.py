"""Export a LLaDA checkpoint as ONNX pieces (embedding, one piece per layer range serving both modes, head) plus
manifest.json and the tokenizer files.

Each piece is traced on the meta device (no weights in memory), then only that piece's tensors are read from the
safetensors shards and attached, so peak memory is about one piece, not the whole model. Every file must pass
onnx.checker's full check before it is listed in the manifest.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import onnx
import torch
from torch.export import Dim
from tqdm import tqdm

from dllm_trt.runtime import buckets
from dllm_trt.runtime.checkpoint import PREFIX, Checkpoint, layer_keys
from dllm_trt.runtime.config import ModelError, layer_ranges
from dllm_trt.runtime.manifest import (DEFAULT_MAX_BATCH, DTYPES, MAX_BATCH_LIMIT, RANGE_INPUTS, Manifest, PieceSpec,
                                       dims_for, piece_specs, profiles_for, sha256_file)
from dllm_trt.runtime.model_torch import Embedding, Head, LayerRange, range_state_dict

from .quantize import (DEFAULT_BLOCK, QuantizeError, check_scheme, embedding_bits, quantize_file,
                       scheme_record)

MAX_ACTIVE = 256  # default largest window pass (query rows), or the whole canvas when that is shorter
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED_KINDS = ("layers", "head")  # and the embedding with int4 (see quantize.embedding_bits)


def quantized_kinds(scheme: str | None) -> tuple[str, ...]:
    if not scheme:
        return ()
    return QUANTIZED_KINDS + (("embed",) if embedding_bits(scheme) else ())


# Preferred example sizes for tracing (see example_sizes).
EXAMPLE = {"seq_len": 37, "rows": 13, "track_len": 3, "window_len": 5, "n_tokens": 11, "n_hidden": 19,
           "n_rows": 7, "batch": 4}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def example_sizes(dims: dict, static: set[int], names=None) -> dict[str, int]:
    """A tracing size for each dim (those of one piece when `names` is given) inside its range, >= 2, distinct
    from each other and from the static dims, so the exporter neither specialises a dynamic dim to a constant nor
    ties two of them together: EXAMPLE's size when free, else the nearest free size below or above it."""
    chosen = [n for n in EXAMPLE if names is None or n in names]
    # Narrowest range first: the ranges share their lower end, so this order finds sizes whenever any exist.
    chosen.sort(key=lambda n: dims[n]["max"] - max(2, dims[n]["min"]))
    taken, out = set(static), {}
    for name in chosen:
        lo, hi = max(2, dims[name]["min"]), dims[name]["max"]
        size = _nearest_free(EXAMPLE[name], lo, hi, taken)
        if size is None:
            raise ModelError(f"dimension {name} (range {dims[name]['min']}..{hi}) is too small to export; "
                             f"use a larger --max-len / --max-active")
        taken.add(size)
        out[name] = size
    return {n: out[n] for n in EXAMPLE if n in out}


def _nearest_free(preferred: int, lo: int, hi: int, taken: set[int]) -> int | None:
    start = min(max(preferred, lo), hi)
    for delta in range(hi - lo + 1):
        for size in (start - delta, start + delta):
            if lo <= size <= hi and size not in taken:
                return size
    return None


def static_sizes(cfg) -> set[int]:
    """Sizes fixed by the model (and the drift output's 2) that no dynamic dim may take while tracing."""
    return {2, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.head_dim // 2, cfg.mlp_hidden_size, cfg.vocab_size,
            cfg.embedding_size}


def _example(spec: PieceSpec, dtype: torch.dtype, sizes: dict[str, int]):
    def make(t):
        shape = [sizes[s] if isinstance(s, str) else s for s in t.shape]
        dt = {"int64": torch.int64, "bool": torch.bool, "float32": torch.float32}.get(t.dtype, dtype)
        return torch.zeros(shape, dtype=dt, device="meta")
    return tuple(make(t) for t in spec.inputs)


def _dynamic_shapes(spec: PieceSpec, dims: dict):
    made: dict[str, Dim] = {}

    def dim(name: str) -> Dim:
        if name not in made:
            made[name] = Dim(name, min=dims[name]["min"], max=dims[name]["max"])
        return made[name]
    return tuple({i: dim(s) for i, s in enumerate(t.shape) if isinstance(s, str)} for t in spec.inputs)


def _module_and_weights(spec: PieceSpec, ckpt: Checkpoint, dtype: torch.dtype):
    """The meta-device module of a piece and the real tensors for it (read from the checkpoint now)."""
    cfg = ckpt.config
    with torch.device("meta"):
        if spec.kind == "embed":
            module = Embedding(cfg, dtype)
        elif spec.kind == "head":
            module = Head(cfg, dtype)
        else:
            module = LayerRange(cfg, spec.layers[0], spec.layers[1], dtype)
    if spec.kind == "embed":
        weights = {"weight": ckpt.read([PREFIX + "wte.weight"], dtype)[PREFIX + "wte.weight"]}
    elif spec.kind == "head":
        w = ckpt.read([PREFIX + "ln_f.weight", PREFIX + "ff_out.weight"], dtype)
        weights = {"norm": w[PREFIX + "ln_f.weight"], "weight": w[PREFIX + "ff_out.weight"]}
    else:
        a, b = spec.layers
        raw = ckpt.read(layer_keys(a, b), dtype)
        weights = range_state_dict(raw, a, b)
        weights["inv_freq"] = LayerRange(cfg, 0, 0).inv_freq  # a computed constant, not a checkpoint tensor
    return module.eval(), weights


def export_piece(spec: PieceSpec, ckpt: Checkpoint, out: Path, dtype: str, opset: int, dims: dict,
                 quantize: str | None = None, quant_block: int = DEFAULT_BLOCK) -> None:
    tdtype = TORCH_DTYPES[dtype]
    module, weights = _module_and_weights(spec, ckpt, tdtype)
    # traced at a batch of at least 2 (a size-1 dim would be specialised to a constant); --max-batch 1 is then a
    # limit of the manifest's profiles, not of the graph
    dims = dims | {"batch": {"min": 1, "max": max(2, dims["batch"]["max"])}}
    shapes = _dynamic_shapes(spec, dims)
    if spec.kind == "layers":  # its forward takes *caches, which torch.export sees as one tuple
        shapes = (*shapes[:len(RANGE_INPUTS)], shapes[len(RANGE_INPUTS):])
    used = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    sizes = example_sizes(dims, static_sizes(ckpt.config), used)
    program = torch.onnx.export(
        module, _example(spec, tdtype, sizes), dynamic_shapes=shapes,
        input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
        opset_version=opset, dynamo=True, optimize=False, verbose=False)
    program.apply_weights(weights)
    del weights
    program.optimize()
    spec.file = f"{spec.name}.onnx"
    spec.data_file = f"{spec.name}.onnx.data"
    path = out / spec.file
    program.save(str(path), external_data=True)
    if not (out / spec.data_file).is_file():  # exporter kept everything inline (tiny piece): nothing external
        spec.data_file = ""
    onnx.checker.check_model(str(path), full_check=True)
    if spec.kind in quantized_kinds(quantize):
        spec.data_file = spec.data_file or f"{spec.name}.onnx.data"
        quantize_file(path, spec.data_file, quantize, quant_block, lookup=spec.kind == "embed")
        if not (out / spec.data_file).is_file():
            spec.data_file = ""
        onnx.checker.check_model(str(path))
    spec.sha256 = sha256_file(path)
    if spec.data_file:
        spec.data_size = (out / spec.data_file).stat().st_size
        spec.data_sha256 = sha256_file(out / spec.data_file)


def export_model(model_dir: str | Path, out_dir: str | Path, layers_per_range: int = 1, dtype: str = "fp32",
                 opset: int = 20, max_len: int | None = None, max_active: int | None = None, quiet: bool = False,
                 shown_as: str | Path | None = None, quantize: str | None = None,
                 quant_block: int = DEFAULT_BLOCK, after_piece=None, max_batch: int = DEFAULT_MAX_BATCH) -> Manifest:
    """after_piece: called after each piece (export_into stops an interrupted export there)."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    if quantize is not None:
        try:
            check_scheme(quantize, quant_block)
        except QuantizeError as e:
            raise ModelError(str(e)) from None
        if dtype != "fp32":
            raise ModelError(f"--quantize needs --dtype fp32 (weight-only quantization for ONNX Runtime on CPU), "
                             f"got --dtype {dtype}")
    if opset not in (20, 23):
        raise ModelError(f"opset must be 20 or 23, got {opset}")
    out = Path(out_dir)
    check_out_dir(out)
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    max_len = cfg.max_sequence_length if max_len is None else max_len
    if not 2 <= max_len <= cfg.max_sequence_length:
        raise ModelError(f"--max-len must be in 2..{cfg.max_sequence_length}, got {max_len}")
    max_active = min(MAX_ACTIVE, max_len) if max_active is None else max_active
    if not 1 <= max_active <= max_len:
        raise ModelError(f"--max-active must be in 1..{max_len}, got {max_active}")
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ModelError(f"--max-batch must be in 1..{MAX_BATCH_LIMIT}, got {max_batch}")
    try:
        ranges = layer_ranges(cfg.n_layers, layers_per_range)
    except ValueError as e:
        raise ModelError(str(e)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"{out}: cannot create the output folder ({e.strerror})") from None
    dims = dims_for(max_len, max_active, max_batch)
    pieces = piece_specs(cfg, ranges, dtype)
    t0 = time.perf_counter()
    bar = tqdm(pieces, desc="export", unit="piece", disable=quiet, file=sys.stderr)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        try:
            _quietly(export_piece, spec, ckpt, out, dtype, opset, dims, quantize, quant_block)
        except QuantizeError as e:
            raise ModelError(str(e)) from None
        if after_piece is not None:
            after_piece()
    tokenizer_files = []
    for name in TOKENIZER_FILES:
        if (ckpt.dir / name).is_file():
            shutil.copy2(ckpt.dir / name, out / name)
            tokenizer_files.append(name)
    manifest = Manifest(cfg, dtype, [list(r) for r in ranges], dims, pieces, tokenizer_files, {
        "source": str(ckpt.dir.resolve()), "source_fingerprint": ckpt.fingerprint(), "layers_per_range": layers_per_range, "opset": opset,
        "max_len": max_len, "max_active": max_active, "max_batch": max_batch, "buckets": buckets.manifest_entry(max_len, max_active),
        "tools": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": _version("onnxscript")},
        "seconds": round(time.perf_counter() - t0, 1),
    }, out, profiles=profiles_for(max_len, max_active))
    if quantize:
        manifest.quantization = scheme_record(quantize, quant_block)
    manifest.save(out)
    if not quiet:
        total = sum((out / p.file).stat().st_size + p.data_size for p in pieces)
        what = f"{dtype}, {quantize} weights (block {quant_block})" if quantize else dtype
        ranges_text = f"{len(ranges)} layer range" + ("s" if len(ranges) > 1 else "")
        print(f"exported {len(pieces)} pieces ({what}, opset {opset}, {ranges_text}) to {shown_as or out}: "
              f"{total / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return manifest


def check_out_dir(out: Path, why_not_replaceable=None) -> None:
    """Refuse an output path that cannot become an engine folder, before any work is done. A folder with files in
    it is refused (pieces of an older export would stay behind), unless why_not_replaceable(out) says '' (it is
    provably an engine folder, which out_folder.export_into replaces as a whole)."""
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a folder; choose a new --out")
    if out.is_dir() and any(out.iterdir()):
        why = why_not_replaceable(out) if why_not_replaceable else "is not empty"
        if why:
            raise ModelError(f"{out}: {why}; choose a new or empty --out")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ModelError(f"{out}: cannot create the output folder ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ModelError(f"{out}: cannot create the output folder ({existing} is not writable)")


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def _quietly(fn, *args):
    """The torch exporter prints progress lines of its own; keep the terminal to our progress bar."""
    import contextlib
    import io
    import warnings

    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args)
