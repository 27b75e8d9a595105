"""Where the ONNX Runtime backend keeps its caches.

- HostArrays: numpy arrays, rows written in place (CPU; graphs read and write the arrays through IOBinding).
- DeviceArrays: OrtValues on the execution provider's device (CUDA). No cache crosses to the host: the rows a window
  pass produced are written into its range's caches, and the tracked queries read out of them, by two small
  helper graphs per range (ScatterElements / Gather, one run each) run with IOBinding on the same device. ONNX
  Runtime cannot write a graph's output into one of its inputs, so a write goes to spare buffers of the same shapes
  and the old buffers become the spares: one range's worth of spares, not a second set of caches.

Both offer the same operations, so the backend's step code is written once. DeviceArrays also runs on the CPU
provider (device "cpu"): that is how it is tested where no GPU is.
"""
from __future__ import annotations

import numpy as np

from .base import BackendError

ONNX_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16}   # onnx.TensorProto element types
# what OrtValue allocation takes: numpy types where numpy has one (every ONNX Runtime release takes those; the
# integer form, needed for bf16, is newer)
ORT_ELEMENT_TYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": 16}
HELPER_OPSET = 17


def as_ortvalue(ort, value):
    """An OrtValue as is; a numpy array wrapped without a copy (an OrtValue on its memory)."""
    return ort.OrtValue.ortvalue_from_numpy(value) if isinstance(value, np.ndarray) else value


class HostArrays:
    device, device_id = "cpu", 0

    def __init__(self, dtype: str):
        if dtype not in ("fp32", "fp16"):
            raise BackendError(f"{dtype} caches cannot live in numpy arrays: keep them on the device "
                               f"(ONNX Runtime with the CUDA execution provider)")
        self.dtype = np.float32 if dtype == "fp32" else np.float16

    def buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, self.dtype)

    def recycle(self, buffers: list, shapes: set | None = None) -> None:
        """Buffers no longer used (numpy caches are simply allocated anew)."""

    def put_rows(self, arrays: list, axes: list[int], positions: np.ndarray, rows: list) -> list:
        """Each array with its rows written at positions along its axis (here: in place; the arrays are returned)."""
        for array, axis, new in zip(arrays, axes, rows):
            array[(slice(None),) * axis + (positions,)] = new
        return arrays

    def take_rows(self, arrays: list, axis: int, positions: np.ndarray) -> list:
        return [np.ascontiguousarray(np.take(a, positions, axis=axis)) for a in arrays]

    def kept(self, value):
        """An output bound to self.device, as the backend keeps it."""
        return value.numpy()


class DeviceArrays:
    def __init__(self, ort, dtype: str, providers: list, device: str = "cuda", device_id: int = 0):
        if dtype not in ONNX_TYPES:
            raise BackendError(f"unknown activation dtype {dtype!r}")
        self.ort, self.providers, self.device, self.device_id = ort, providers, device, device_id
        self.element, self.allocation_type = ONNX_TYPES[dtype], ORT_ELEMENT_TYPES[dtype]
        self._spare: dict[tuple[int, ...], list] = {}
        self._sessions: dict[tuple, object] = {}

    def buffer(self, shape: tuple[int, ...]):
        """A buffer of `shape` on the device: a spare of that shape, or a new one. Its contents are whatever they
        were: every generation starts with a full refresh, which writes every row of every cache (the backend
        refuses a window pass before one)."""
        spare = self._spare.get(tuple(shape))
        if spare:
            return spare.pop()
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.allocation_type, self.device,
                                                              self.device_id)

    def recycle(self, buffers: list, shapes: set | None = None) -> None:
        """`buffers` (a finished generation's caches) become spares, so a canvas of the same length allocates
        nothing; given `shapes` (the ones about to be needed), spares of other shapes are freed."""
        for b in buffers:
            self._spare.setdefault(tuple(b.shape()), []).append(b)
        if shapes is not None:
            self._spare = {s: spare for s, spare in self._spare.items() if s in shapes}

    def put_rows(self, arrays: list, axes: list[int], positions: np.ndarray, rows: list) -> list:
        """One helper run writes every array of a layer range; each goes to a spare of its shape."""
        shapes = [tuple(a.shape()) for a in arrays]
        outs = [self.buffer(s) for s in shapes]
        key = ("put", tuple((len(s), axis) for s, axis in zip(shapes, axes)))
        feeds = {"positions": positions} | {f"data{i}": a for i, a in enumerate(arrays)} | {
            f"rows{i}": r for i, r in enumerate(rows)}
        self._run(key, feeds, outs)
        for shape, old in zip(shapes, arrays):
            self._spare.setdefault(shape, []).append(old)
        return outs

    def take_rows(self, arrays: list, axis: int, positions: np.ndarray) -> list:
        key = ("take", tuple((len(a.shape()), axis) for a in arrays))
        return self._run(key, {"positions": positions} | {f"data{i}": a for i, a in enumerate(arrays)}, None)

    def kept(self, value):
        return value

    def _run(self, key: tuple, inputs: dict, outs: list | None) -> list:
        session = self._sessions.get(key)
        if session is None:
            opts = self.ort.SessionOptions()
            # copies, not arithmetic: one thread, and none left spinning to slow the next piece down
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = self._sessions[key] = self.ort.InferenceSession(
                helper_graph(*key, self.element), opts, providers=self.providers)
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, as_ortvalue(self.ort, value))
        for i in range(len(key[1])):
            if outs is None:
                binding.bind_output(f"out{i}", self.device, self.device_id)
            else:
                binding.bind_ortvalue_output(f"out{i}", outs[i])
        session.run_with_iobinding(binding)
        return binding.get_outputs() if outs is None else outs


def helper_graph(kind: str, tensors: tuple[tuple[int, int], ...], element: int) -> bytes:
    """The serialized graph that, for each (rank, axis) in tensors, gives `out{i}` = `data{i}` with `rows{i}`
    written at `positions` along axis (put), or the rows of `data{i}` at `positions` along axis (take).
    onnx is imported here only: the host path never builds one."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        raise BackendError("caches on the device need the onnx package to build their helper graphs: "
                           "pip install onnx") from None
    inputs = [helper.make_tensor_value_info("positions", TensorProto.INT64, ["p"])]
    outputs, nodes = [], []
    for i, (rank, axis) in enumerate(tensors):
        inputs.append(helper.make_tensor_value_info(f"data{i}", element, [f"d{i}_{j}" for j in range(rank)]))
        outputs.append(helper.make_tensor_value_info(f"out{i}", element, [None] * rank))
        if kind == "take":
            nodes.append(helper.make_node("Gather", [f"data{i}", "positions"], [f"out{i}"], axis=axis))
            continue
        # ScatterElements wants one index per written element: positions shaped [1, .., p, .., 1], broadcast
        # to the shape of the rows
        inputs.append(helper.make_tensor_value_info(f"rows{i}", element, [None] * rank))
        shape = [1] * rank
        shape[axis] = -1
        nodes += [helper.make_node("Constant", [], [f"index_shape{i}"],
                                   value=helper.make_tensor(f"index_shape{i}", TensorProto.INT64, [rank], shape)),
                  helper.make_node("Reshape", ["positions", f"index_shape{i}"], [f"index_column{i}"]),
                  helper.make_node("Shape", [f"rows{i}"], [f"rows_shape{i}"]),
                  helper.make_node("Expand", [f"index_column{i}", f"rows_shape{i}"], [f"index{i}"]),
                  helper.make_node("ScatterElements", [f"data{i}", f"index{i}", f"rows{i}"], [f"out{i}"],
                                   axis=axis)]
    graph = helper.make_graph(nodes, f"{kind}_rows", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", HELPER_OPSET)],
                              producer_name="dllm-trt")
    model.ir_version = 8   # the oldest ONNX Runtime the gpu extra allows (1.18) reads IR 8..10
    return model.SerializeToString()
