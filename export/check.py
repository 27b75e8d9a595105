"""`dllm-trt check`: run every exported piece on fixed random inputs through ONNX Runtime and through the PyTorch
reference built from the source checkpoint, and compare output by output with per-dtype tolerances. Layer-range
pieces are checked in both modes (window, refresh) at batch 1 and at a batch of unequal canvas lengths."""
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


# Each piece runs at batch 1 and at CHECK_BATCH sequences of unequal canvas lengths, padded to a common shape with
# NaN in every cache entry the contract says is not read (padding slots, values at query slots, every past key and
# value in refresh mode; so a read would show) and with padding slots not marked MASK (so a column sum there would
# show: it must be 0).
CHECK_BATCH = 3


@dataclass
class Case:
    """One check of a piece: its batched inputs and, per sequence, the reference outputs and how much of each
    batched output is that sequence's (the rest is padding and is not compared)."""
    label: str
    inputs: dict[str, np.ndarray]
    want: list[tuple | None]          # per sequence: reference outputs, in the piece's output order
    extents: list[dict[str, int]]     # per sequence: dim name -> its size in this sequence


def check_sizes(dims: dict) -> dict[str, int]:
    """Input sizes for the check, shrunk to fit an engine exported with a small --max-len / --max-active."""
    want = {"seq_len": 29, "rows": 9, "track_len": 2, "window_len": 4, "n_tokens": 6, "n_hidden": 9, "n_rows": 4,
            "batch": CHECK_BATCH}
    s = {k: max(dims[k]["min"], min(v, dims[k]["max"])) for k, v in want.items()}
    s["rows"] = min(s["rows"], s["seq_len"])  # query rows are distinct canvas slots
    s["track_len"], s["window_len"] = min(s["track_len"], s["rows"]), min(s["window_len"], s["rows"])
    s["n_rows"] = min(s["n_rows"], s["n_hidden"])
    return s


def _shrunk(sizes: dict[str, int], b: int) -> dict[str, int]:
    """Sizes of sequence b of a batch: the first at `sizes`, the others shorter, so padding is exercised."""
    if b == 0:
        return dict(sizes)
    s = dict(sizes)
    s["seq_len"] = max(2, sizes["seq_len"] - 5 * b)
    s["rows"] = max(1, min(sizes["rows"] - b, s["seq_len"]))
    s["track_len"] = max(1, min(sizes["track_len"] - b, s["rows"]))
    s["window_len"] = max(1, min(sizes["window_len"] - b, s["rows"]))
    s["n_tokens"], s["n_hidden"] = max(1, sizes["n_tokens"] - 2 * b), max(1, sizes["n_hidden"] - 2 * b)
    s["n_rows"] = max(1, min(sizes["n_rows"] - b, s["n_hidden"]))
    return s


def _pad(arrays: list[np.ndarray], fill) -> np.ndarray:
    """Stack arrays of equal rank along a new batch axis, each padded at the end of every axis with `fill`."""
    shape = [max(a.shape[i] for a in arrays) for i in range(arrays[0].ndim)]
    out = np.full([len(arrays), *shape], fill, dtype=arrays[0].dtype)
    for b, a in enumerate(arrays):
        out[(b, *(slice(0, n) for n in a.shape))] = a
    return out


def piece_cases(spec: PieceSpec, module, cfg, sizes: dict[str, int], batch: int, rng: np.random.Generator,
                dtype: torch.dtype) -> list[Case]:
    """The checks of one piece at `batch` sequences: random inputs, reference outputs from `module` run one
    sequence at a time (for a layer range: LayerRange.window / .refresh, not the exported forward); module None:
    the inputs only (Case.want is then empty)."""
    seqs = [_shrunk(sizes, b) for b in range(batch)]

    def floats(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def torch_in(a: np.ndarray):
        t = torch.from_numpy(a)
        return t.to(dtype) if t.is_floating_point() else t

    def run(fn, *args) -> tuple | None:
        if module is None:
            return None
        with torch.no_grad():
            out = fn(*[torch_in(a) for a in args])
        return tuple(t.float().numpy() if t.is_floating_point() else t.numpy()
                     for t in (out if isinstance(out, tuple) else (out,)))

    if spec.kind == "embed":
        ids = [rng.integers(0, cfg.vocab_size, s["n_tokens"]).astype(np.int64) for s in seqs]
        return [Case(f"B={batch}", {"input_ids": _pad(ids, 0)}, [run(module, i) for i in ids],
                     [{"n_tokens": s["n_tokens"]} for s in seqs])]
    if spec.kind == "head":
        hidden = [floats(s["n_hidden"], cfg.d_model) for s in seqs]
        rows = [rng.choice(s["n_hidden"], s["n_rows"], replace=False).astype(np.int64) for s in seqs]
        return [Case(f"B={batch}", {"hidden_states": _pad(hidden, np.nan), "rows": _pad(rows, -1)},
                     [run(module, h, r) for h, r in zip(hidden, rows)], [{"n_rows": s["n_rows"]} for s in seqs])]
    H, hd, n_layers = cfg.n_heads, cfg.head_dim, spec.layers[1] - spec.layers[0]
    cases = []
    # window mode: a few query rows per sequence, caches read at every other slot
    per_seq, want = [], []
    for s in seqs:
        n, r = s["seq_len"], s["rows"]
        x = {"hidden": floats(r, cfg.d_model), "pos": np.sort(rng.choice(n, r, replace=False)).astype(np.int64),
             "track": rng.choice(r, s["track_len"], replace=False).astype(np.int64),
             "window": rng.choice(r, s["window_len"], replace=False).astype(np.int64),
             "mask": rng.random(n) < 0.5,
             "caches": [c for _ in range(n_layers) for c in (floats(H, n, hd), floats(H, n, hd),
                                                            floats(H, s["track_len"], hd))]}
        per_seq.append(x)
        want.append(run(module and module.window, x["hidden"], x["pos"], x["track"], x["window"], x["mask"],
                        *x["caches"]))
    inputs = {"hidden_states": _pad([x["hidden"] for x in per_seq], np.nan),
              "position_ids": _pad([x["pos"] for x in per_seq], -1),
              "canvas_lengths": np.array([s["seq_len"] for s in seqs], dtype=np.int64),
              "key_is_mask": _pad([x["mask"] for x in per_seq], False),
              "track_rows": _pad([x["track"] for x in per_seq], -1),
              "window_rows": _pad([x["window"] for x in per_seq], -1)}
    cache_names = [t.name for t in spec.inputs[len(inputs):]]
    for i, name in enumerate(cache_names):
        inputs[name] = _pad([x["caches"][i] for x in per_seq], np.nan)
        if name.endswith(".value"):   # the reference multiplies them by zero; the piece must not read them
            for b, x in enumerate(per_seq):
                inputs[name][b, :, x["pos"]] = np.nan
    cases.append(Case(f"window B={batch}", inputs, want, seqs))
    # refresh mode: every slot a query row; the caches are all NaN, since none of them may be read
    per_seq, want = [], []
    for s in seqs:
        n = s["seq_len"]
        x = {"hidden": floats(n, cfg.d_model), "window": rng.choice(n, s["window_len"], replace=False).astype(np.int64),
             "mask": rng.random(n) < 0.5}
        per_seq.append(x)
        out = run(module and module.refresh, x["hidden"], np.arange(n, dtype=np.int64), x["window"], x["mask"])
        # the reference refresh has no drift output: slot None where the piece has one (not compared)
        want.append(out and (out[0], *[v for i in range(n_layers) for v in (*out[1 + 4 * i: 4 + 4 * i], None,
                                                                             out[4 + 4 * i])]))
    n_max = max(s["seq_len"] for s in seqs)
    inputs = {"hidden_states": _pad([x["hidden"] for x in per_seq], np.nan),
              "position_ids": _pad([np.arange(s["seq_len"], dtype=np.int64) for s in seqs], -1),
              "canvas_lengths": np.array([s["seq_len"] for s in seqs], dtype=np.int64),
              "key_is_mask": _pad([x["mask"] for x in per_seq], False),
              "track_rows": np.zeros((batch, 1), dtype=np.int64),
              "window_rows": _pad([x["window"] for x in per_seq], -1)}
    for name in cache_names:
        rows = 1 if name.startswith("track_queries") else n_max
        inputs[name] = (floats(batch, H, rows, hd) if rows == 1 else np.full((batch, H, rows, hd), np.nan, np.float32))
    cases.append(Case(f"refresh B={batch}", inputs, want,
                      [{**s, "rows": s["seq_len"], "track_len": 1} for s in seqs]))
    return cases


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
    sizes = {**check_sizes(m.dims), **(sizes or {})}
    batches = sorted({1, min(sizes["batch"], m.dims["batch"]["max"])})
    scheme = m.quantization.get("scheme")
    rng = np.random.default_rng(seed)
    rows = []
    for spec in m.pieces:
        session = ort.InferenceSession(str(Path(engine_dir) / spec.file), providers=["CPUExecutionProvider"])
        module, weights = _module_and_weights(spec, ckpt, dtype)
        module = module.to_empty(device="cpu")
        module.load_state_dict(weights, strict=False, assign=True)
        if spec.kind == "layers":
            module.inv_freq = weights["inv_freq"]
        quantized = scheme if spec.kind in quantized_kinds(scheme) else None
        for batch in batches:
            for case in piece_cases(spec, module, ckpt.config, sizes, batch, rng, dtype):
                got = session.run([t.name for t in spec.outputs], case.inputs)
                for i, t in enumerate(spec.outputs):
                    if case.want[0][i] is None:
                        continue
                    g = np.concatenate([_valid(got[i][b], t.shape[1:], case.extents[b]).ravel()
                                        for b in range(batch)])
                    w = np.concatenate([case.want[b][i].ravel() for b in range(batch)])
                    rows.append(compare(f"{spec.name} {case.label}", t, g, w, quantized or m.dtype))
                    if t.name.startswith("attn_colsum") and batch > 1:   # padding slots are never attended
                        pad = np.concatenate([got[i][b, case.extents[b]["seq_len"]:] for b in range(batch)])
                        rows.append(Row(f"{spec.name} {case.label} padding", t.name,
                                        float(np.max(np.abs(pad))) if pad.size else 0.0, 0.0))
    return rows


def _valid(value: np.ndarray, shape: list, extent: dict[str, int]) -> np.ndarray:
    """The part of one sequence's output that is its own (named dims cut to the sequence's sizes)."""
    return value[tuple(slice(0, extent[d]) if isinstance(d, str) else slice(None) for d in shape)]


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
