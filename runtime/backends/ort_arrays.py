"""Where the ONNX Runtime backend keeps its caches.

- HostArrays: numpy arrays, rows written in place (CPU; graphs read and write the arrays through IOBinding).
- DeviceArrays: OrtValues on the execution provider's device (CUDA). No cache crosses to the host: the rows a window
  pass produced are written into a cache, and the tracked rows read out of one, by two tiny helper graphs
  (ScatterElements / Gather) run with IOBinding on the same device. ONNX Runtime cannot write a graph's output
  into one of its inputs, so a write goes to a spare buffer of the same shape and the old buffer becomes the spare:
  one spare per cache shape, not a second set of caches.

Both offer the same operations, so the backend's step code is written once. DeviceArrays also runs on the CPU
provider (device "cpu"): that is how it is tested where no GPU is.
"""
from __future__ import annotations

import numpy as np

from .base import BackendError

ONNX_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16}   # onnx.TensorProto element types
HELPER_OPSET = 17


class HostArrays:
    device = "cpu"

    def __init__(self, dtype: str):
        if dtype not in ("fp32", "fp16"):
            raise BackendError(f"{dtype} caches cannot live in numpy arrays: keep them on the device "
                               f"(ONNX Runtime with the CUDA execution provider)")
        self.dtype = np.float32 if dtype == "fp32" else np.float16

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, self.dtype)

    def put_rows(self, array: np.ndarray, axis: int, positions: np.ndarray, rows) -> np.ndarray:
        """array with rows written at positions along axis (here: in place; the array is returned)."""
        array[(slice(None),) * axis + (positions,)] = rows
        return array

    def take_rows(self, array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.take(array, positions, axis=axis))

    def kept(self, value):
        """An output bound to self.device, as the backend keeps it."""
        return value.numpy()

    def host(self, value) -> np.ndarray:
        return value


class DeviceArrays:
    def __init__(self, ort, dtype: str, providers: list, device: str = "cuda", device_id: int = 0):
        if dtype not in ONNX_TYPES:
            raise BackendError(f"unknown activation dtype {dtype!r}")
        self.ort, self.providers, self.device, self.device_id = ort, providers, device, device_id
        self.element = ONNX_TYPES[dtype]
        self._spare: dict[tuple[int, ...], list] = {}
        self._sessions: dict[tuple, object] = {}

    def zeros(self, shape: tuple[int, ...]):
        """A buffer of `shape` on the device. Its contents are left as allocated: every generation starts with a
        full refresh, which writes every row of every cache (Backend.window refuses to run before one)."""
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.element, self.device, self.device_id)

    def put_rows(self, array, axis: int, positions: np.ndarray, rows):
        shape = tuple(array.shape())
        spare = self._spare.get(shape)
        out = spare.pop() if spare else self.zeros(shape)
        self._run(("put", len(shape), axis), {"data": array, "positions": positions, "rows": rows}, out)
        self._spare.setdefault(shape, []).append(array)
        return out

    def take_rows(self, array, axis: int, positions: np.ndarray):
        return self._run(("take", len(array.shape()), axis), {"data": array, "positions": positions}, None)

    def kept(self, value):
        return value

    def host(self, value) -> np.ndarray:
        return value.numpy()

    def _run(self, key: tuple, inputs: dict, out):
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = self.ort.InferenceSession(
                helper_graph(*key, self.element), providers=self.providers)
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                value = self.ort.OrtValue.ortvalue_from_numpy(value)
            binding.bind_ortvalue_input(name, value)
        if out is None:
            binding.bind_output("out", self.device, self.device_id)
        else:
            binding.bind_ortvalue_output("out", out)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0] if out is None else out


def helper_graph(kind: str, rank: int, axis: int, element: int) -> bytes:
    """The serialized graph `out = data with rows at positions along axis` (put) or `out = data's rows at
    positions along axis` (take). onnx is imported here only: the host path never builds one."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        raise BackendError("caches on the device need the onnx package to build two helper graphs: "
                           "pip install onnx") from None
    dims = [f"d{i}" for i in range(rank)]
    inputs = [helper.make_tensor_value_info("data", element, dims),
              helper.make_tensor_value_info("positions", TensorProto.INT64, ["p"])]
    if kind == "take":
        nodes = [helper.make_node("Gather", ["data", "positions"], ["out"], axis=axis)]
    else:
        # ScatterElements wants one index per updated element: positions shaped [1, .., p, .., 1], broadcast
        # to the shape of the rows
        inputs.append(helper.make_tensor_value_info("rows", element, [None] * rank))
        shape = [1] * rank
        shape[axis] = -1
        nodes = [helper.make_node("Constant", [], ["index_shape"],
                                  value=helper.make_tensor("index_shape", TensorProto.INT64, [rank], shape)),
                 helper.make_node("Reshape", ["positions", "index_shape"], ["index_column"]),
                 helper.make_node("Shape", ["rows"], ["rows_shape"]),
                 helper.make_node("Expand", ["index_column", "rows_shape"], ["index"]),
                 helper.make_node("ScatterElements", ["data", "index", "rows"], ["out"], axis=axis)]
    graph = helper.make_graph(nodes, f"{kind}_rows", inputs,
                              [helper.make_tensor_value_info("out", element, [None] * rank)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", HELPER_OPSET)],
                              producer_name="dllm-trt")
    model.ir_version = 8   # the oldest ONNX Runtime the gpu extra allows (1.18) reads IR 8..10
    return model.SerializeToString()
