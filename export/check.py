"""`dllm-trt check`: run every exported piece on fixed random inputs through ONNX Runtime and through the PyTorch
reference built from the source checkpoint, and compare output by output with per-dtype tolerances."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dllm_trt.runtime.checkpoint import Checkpoint
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.manifest import Manifest, PieceSpec, load_manifest

from .onnx_export import TORCH_DTYPES, _module_and_weights, quantized_kinds

# max |ort - torch| allowed per output kind and activation dtype (probabilities and statistics are float32 always)
TOLERANCE = {"fp32": {"act": 2e-4, "stat": 2e-5}, "bf16": {"act": 6e-2, "stat": 2e-2},
             "fp16": {"act": 2e-2, "stat": 5e-3}}
# Weight-only quantized pieces against the fp32 reference. Their error scales with the activations, so hidden
# states, K/V/Q and attention column sums are compared as ||ort - torch|| / ||torch|| (L2 over the tensor, "rel");
# drift (a cosine) and probabilities absolutely; argmax tokens as the fraction of rows that differ, since random
# inputs give near-tied logits that any weight rounding may flip. The bounds hold for random Gaussian weights (the
# worst case: the small test models reach 0.23 relative error at int4, the trained models/arith 0.09); a wrong
# graph (say, an untransposed weight) is off by ~1. Accuracy loss on a task is eval's job, not check's.
QUANT_TOLERANCE = {"int8": {"act": 3e-2, "colsum": 3e-2, "stat": 1e-2, "tokens": 0.25},
                   "int4": {"act": 3e-1, "colsum": 3e-1, "stat": 5e-2, "tokens": 0.5}}
STATS = ("drift.", "probs")
# the sizes that shape every piece: the checkpoint must agree with the engine on all of them
SHAPE_KEYS = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "embedding_size")


@dataclass
class Row:
    piece: str
    output: str
    max_abs: float
    tolerance: float
    measure: str = "abs"      # abs: max |ort - torch|; rel: ||ort - torch|| / ||torch||; frac: rows that differ

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


def random_inputs(spec: PieceSpec, cfg, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid inputs for a piece: distinct positions, rows inside range, a canvas with some MASK slots."""
    n = sizes["seq_len"]
    out = {}
    for t in spec.inputs:
        shape = [sizes[s] if isinstance(s, str) else s for s in t.shape]
        if t.name == "input_ids":
            out[t.name] = rng.integers(0, cfg.vocab_size, shape).astype(np.int64)
        elif t.name == "position_ids":
            out[t.name] = (np.sort(rng.choice(n, shape[0], replace=False)) if spec.kind == "window"
                           else np.arange(n)).astype(np.int64)
        elif t.name in ("track_rows", "window_rows"):
            out[t.name] = rng.choice(sizes["active_len"], shape[0], replace=False).astype(np.int64)
        elif t.name == "window_positions":
            out[t.name] = rng.choice(n, shape[0], replace=False).astype(np.int64)
        elif t.name == "rows":
            out[t.name] = rng.choice(sizes["n_hidden"], shape[0], replace=False).astype(np.int64)
        elif t.name == "key_is_mask":
            out[t.name] = rng.random(shape) < 0.5
        else:
            out[t.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def check_sizes(dims: dict) -> dict[str, int]:
    """Input sizes for the check, shrunk to fit an engine exported with a small --max-len / --max-active."""
    want = {"seq_len": 29, "active_len": 9, "track_len": 2, "window_len": 4, "n_tokens": 6, "n_hidden": 9,
            "n_rows": 4}
    s = {k: max(dims[k]["min"], min(v, dims[k]["max"])) for k, v in want.items()}
    s["active_len"] = min(s["active_len"], s["seq_len"])  # query rows are distinct canvas slots
    s["track_len"], s["window_len"] = min(s["track_len"], s["active_len"]), min(s["window_len"], s["active_len"])
    s["n_rows"] = min(s["n_rows"], s["n_hidden"])
    return s


def check_engines(engine_dir: str | Path, model_dir: str | Path | None = None, seed: int = 0,
                  sizes: dict[str, int] | None = None) -> list[Row]:
    import onnxruntime as ort

    m: Manifest = load_manifest(engine_dir, verify_data=True)
    if not model_dir:
        model_dir = m.export.get("source")
        if not isinstance(model_dir, str) or not model_dir:
            raise ModelError(f"{Path(engine_dir) / 'manifest.json'}: export.source is {repr(model_dir)[:60]}, not the "
                             f"path of the checkpoint it was exported from; pass --model DIR")
    ckpt = Checkpoint(model_dir)
    differ = [k for k in SHAPE_KEYS if getattr(ckpt.config, k) != getattr(m.config, k)]
    if differ:
        k = differ[0]
        raise ModelError(f"{model_dir}: not the checkpoint {engine_dir} was exported from "
                         f"({k}={getattr(ckpt.config, k)}, the engine has {k}={getattr(m.config, k)})")
    dtype = TORCH_DTYPES[m.dtype]
    sizes = sizes or check_sizes(m.dims)
    scheme = m.quantization.get("scheme")
    rng = np.random.default_rng(seed)
    rows = []
    for spec in m.pieces:
        inputs = random_inputs(spec, ckpt.config, sizes, rng)
        session = ort.InferenceSession(str(Path(engine_dir) / spec.file), providers=["CPUExecutionProvider"])
        got = session.run([t.name for t in spec.outputs], inputs)
        module, weights = _module_and_weights(spec, ckpt, dtype)
        module = module.to_empty(device="cpu")
        module.load_state_dict(weights, strict=False, assign=True)
        if hasattr(module, "layers"):
            module.layers.inv_freq = weights["layers.inv_freq"]
        args = [torch.from_numpy(inputs[t.name]) for t in spec.inputs]
        with torch.no_grad():
            want = module(*[a.to(dtype) if a.is_floating_point() else a for a in args])
        want = want if isinstance(want, tuple) else (want,)
        quantized = scheme if spec.kind in quantized_kinds(scheme) else None
        for t, g, w in zip(spec.outputs, got, want):
            w = w.float().numpy() if w.is_floating_point() else w.numpy()
            rows.append(compare(spec.name, t, g, w, quantized or m.dtype))
    return rows


def compare(piece: str, t, g: np.ndarray, w: np.ndarray, scheme: str) -> Row:
    """One output of ONNX Runtime (g) against the reference (w), measured and judged as `scheme` (a dtype, or a
    quantization scheme for quantized pieces) asks."""
    diff = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
    if scheme in QUANT_TOLERANCE:
        tol = QUANT_TOLERANCE[scheme]
        if t.dtype == "int64":
            return Row(piece, t.name, float(np.mean(g != w)) if g.size else 0.0, tol["tokens"], "frac")
        if t.name.startswith(STATS):
            return Row(piece, t.name, diff, tol["stat"])
        err = float(np.linalg.norm(g.astype(np.float64) - w.astype(np.float64)))
        scale = float(np.linalg.norm(w.astype(np.float64)))
        kind = "colsum" if t.name.startswith("attn_colsum") else "act"
        return Row(piece, t.name, err / scale if scale else err, tol[kind], "rel")
    if t.dtype == "int64":  # argmax tokens: must agree exactly
        return Row(piece, t.name, float(np.sum(g != w)), 0.0)
    kind = "stat" if t.dtype == "float32" and scheme != "fp32" else "act"
    return Row(piece, t.name, diff, TOLERANCE[scheme][kind])


def format_table(rows: list[Row]) -> str:
    width = max(len(r.piece) for r in rows)
    lines = [f"{'piece':<{width}}  {'output':<28} {'error':>10} {'measure':>7} {'tolerance':>10}  ok"]
    for r in rows:
        lines.append(f"{r.piece:<{width}}  {r.output:<28} {r.max_abs:>10.3e} {r.measure:>7} {r.tolerance:>10.1e}  "
                     f"{'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
