"""Weight-only block quantization of exported pieces with ONNX Runtime's own tool (MatMulNBitsQuantizer), which
turns MatMul nodes with a constant [K, N] weight into com.microsoft MatMulNBits (uint8-packed weights, float32
scales and uint8 zero points, one scale per `block` consecutive K values of each output column), and, for int4,
the embedding lookup into com.microsoft GatherBlockQuantized (4-bit rows, blocks along d_model).

The torch exporter writes the projections as Gemm(x, W, transB=1) with W stored [N, K], and the head as
MatMul(x, Transpose(W)); the quantizer only takes MatMul with a [K, N] initializer, so `weights_as_matmul` first
rewrites both forms into MatMul on a transposed copy of W (same name).
"""
from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

SCHEMES = {"int8": 8, "int4": 4}
# 128 weights per scale: on the mid-size model the window step is 1.25x faster than with blocks of 32 (fewer scales
# per dot product) and LLaDA-8B's int4 pieces 17% smaller, and the bundled model loses no more accuracy
# (docs/BENCHMARKS.md section 12)
DEFAULT_BLOCK = 128
BLOCKS = (16, 32, 64, 128, 256)
# MatMulNBits accuracy_level 4: activations are quantized to int8 per block inside the kernel, so the products run
# on int8 dot-product instructions; levels 0/1 dequantize the weights to float32 and are several times slower.
ACCURACY_LEVEL = 4
SYMMETRIC = False
TOOL = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"


class QuantizeError(ValueError):
    pass


def check_scheme(scheme: str | None, block: int) -> None:
    if scheme is not None and scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantization {scheme!r} (choose {', '.join(SCHEMES)})")
    if block not in BLOCKS:
        raise QuantizeError(f"--quant-block must be one of {', '.join(map(str, BLOCKS))} (ONNX Runtime's "
                            f"block-wise kernels), got {block}")


def scheme_record(scheme: str, block: int) -> dict:
    """What the manifest says about the quantization of an engine."""
    return {"scheme": scheme, "bits": SCHEMES[scheme], "block_size": block, "symmetric": SYMMETRIC,
            "accuracy_level": ACCURACY_LEVEL, "op": "com.microsoft.MatMulNBits",
            "embedding": "com.microsoft.GatherBlockQuantized (4 bits)" if embedding_bits(scheme) else "float",
            "tool": TOOL,
            "onnxruntime": version("onnxruntime"), "onnx": onnx.__version__}


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _transpose_initializer(inits: dict, name: str, done: set) -> None:
    if name not in done:
        t = inits[name]
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t).T), name))
        done.add(name)


def weights_as_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(x, W, transB=1) without bias and MatMul(x, Transpose(W)) on 2-D constant W into MatMul(x, W.T),
    in place. Returns how many nodes were rewritten."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    producers = {o: n for n in g.node for o in n.output}
    done, dropped, count = set(), [], 0
    for n in g.node:
        if n.op_type == "Gemm" and len(n.input) == 2 and n.input[1] in inits and uses[n.input[1]] == 1:
            a = _attrs(n)
            if a.get("transA", 0) or not a.get("transB", 0) or a.get("alpha", 1.0) != 1.0:
                continue
            _transpose_initializer(inits, n.input[1], done)
            n.op_type = "MatMul"
            del n.attribute[:]
            count += 1
        elif n.op_type == "MatMul" and n.input[1] in producers:
            t = producers[n.input[1]]
            if (t.op_type != "Transpose" or t.input[0] not in inits or uses[t.input[0]] != 1
                    or uses[n.input[1]] != 1 or len(inits[t.input[0]].dims) != 2
                    or list(_attrs(t).get("perm", [1, 0])) != [1, 0]):
                continue
            _transpose_initializer(inits, t.input[0], done)
            n.input[1] = t.input[0]
            dropped.append(t)
            count += 1
    for t in dropped:
        g.node.remove(t)
    return count


def lookup_as_gather(model: onnx.ModelProto) -> int:
    """Rewrite the exporter's embedding lookup GatherND(W, Unsqueeze(ids, -1)) into Gather(W, ids), the form the
    quantizer turns into GatherBlockQuantized, in place. Returns how many nodes were rewritten."""
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer if len(t.dims) <= 1}
    producers = {o: n for n in g.node for o in n.output}
    dropped, count = [], 0
    for n in g.node:
        u = producers.get(n.input[1]) if n.op_type == "GatherND" else None
        if u is None or u.op_type != "Unsqueeze" or _attrs(n).get("batch_dims", 0) != 0:
            continue
        # ids[..., None] only: axis -1 (axis 1 is the same thing only for 1-D ids, which is not known here)
        if u.input[1] not in consts or list(consts[u.input[1]].reshape(-1)) != [-1]:
            continue
        n.op_type = "Gather"
        del n.attribute[:]
        n.input[1] = u.input[0]
        dropped.append(u)
        count += 1
    for u in dropped:
        if not any(u.output[0] in n.input for n in g.node):
            g.node.remove(u)
    return count


def embedding_bits(scheme: str) -> int | None:
    """ONNX Runtime's GatherBlockQuantized takes 4-bit data only: the int8 scheme leaves the embedding float."""
    return 4 if SCHEMES[scheme] == 4 else None


def quantizer_class():
    """onnxruntime's quantizer module configures the root logger at INFO when it is imported, after which every
    library's INFO messages (onnxscript's, hundreds per export) would print: import it with the root logger kept."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
    return MatMulNBitsQuantizer


def quantize_model(model: onnx.ModelProto, scheme: str, block: int, lookup: bool = False) -> onnx.ModelProto:
    """Every MatMul with a constant weight as MatMulNBits (weights_as_matmul first); with `lookup` (the embedding
    piece, int4 only), the table lookup as GatherBlockQuantized (blocks along d_model) instead."""
    MatMulNBitsQuantizer = quantizer_class()
    if lookup:
        lookup_as_gather(model)
        ops = ("Gather",)
    else:
        weights_as_matmul(model)
        ops = ("MatMul",)
    for name in ("onnxruntime.quantization", "onnx_ir"):  # both log every rewritten node at INFO
        logging.getLogger(name).setLevel(logging.ERROR)
    q = MatMulNBitsQuantizer(model, bits=SCHEMES[scheme], block_size=block, is_symmetric=SYMMETRIC,
                             accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=ops,
                             quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    out = q.model.model
    if not any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in out.graph.node):
        raise QuantizeError("the quantizer found no MatMul or Gather with a constant weight to quantize")
    return out


def quantize_file(path, data_file: str, scheme: str, block: int, lookup: bool = False) -> None:
    """Quantize one exported .onnx (weights in `data_file` next to it) in place: one piece in memory at a time."""
    path = Path(path)
    model = onnx.load(str(path))
    try:
        model = quantize_model(model, scheme, block, lookup)
    except RuntimeError as e:  # onnxruntime's quantizer raises plain RuntimeErrors from its C++ kernels
        raise QuantizeError(f"{path.name}: onnxruntime's quantizer failed ({str(e).splitlines()[0]})") from None
    data = path.parent / data_file
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file, size_threshold=1024)
    if data.exists():  # onnx writes none when every tensor is small enough to stay inline
        data.chmod(path.stat().st_mode & 0o777)  # onnx creates the data file owner-only; keep the graph's mode
