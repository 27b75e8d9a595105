"""A stand-in for TensorRT (and for torch's CUDA calls) that runs TensorRTBackend on the CPU: each "plan" is the
piece's ONNX graph run by ONNX Runtime, reading its inputs from and writing its outputs to the raw addresses the
backend binds, as TensorRT would. Its optimization profiles are the ones `dllm-trt build` gives the piece, and an
input shape outside the context's profile is refused as TensorRT refuses it, so a backend that binds the wrong mode's
profile, the wrong shapes or too small an output buffer fails here.

    fake = FakeTensorRT(engine_dir)          # after fake plans and build.json exist for fake.target(...)
    monkeypatch.setattr(tensorrt_backend, "cuda_device", fake.cuda_device)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", fake.import_tensorrt)
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dllm_trt.export.tensorrt_build import piece_profiles, profile_for
from dllm_trt.runtime.manifest import load_manifest

VERSION = "1.7.1.116"
NUMPY = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}


class FakeTorch:
    """torch with the CUDA device, streams, events and pinned memory mapped onto the CPU. Remembers the size of
    every buffer it allocates, so that outputs can be checked against the bytes really there."""

    def __init__(self):
        self.sizes: dict[int, int] = {}
        self.cuda = SimpleNamespace(current_stream=lambda: SimpleNamespace(cuda_stream=0, synchronize=lambda: None),
                                    Event=lambda: SimpleNamespace(record=lambda stream: None, synchronize=lambda: None),
                                    get_device_name=lambda: "NVIDIA GeForce RTX 4090",
                                    mem_get_info=lambda *device: (20 << 30, 24 << 30))

    def __getattr__(self, name):
        return getattr(torch, name)

    def device(self, _):
        return torch.device("cpu")

    def empty(self, *shape, dtype=None, device=None, pin_memory=False):
        t = torch.empty(*shape, dtype=dtype)
        self.sizes[t.data_ptr()] = t.numel() * t.element_size()
        return t

    def zeros(self, *shape, device=None, **kw):
        return torch.zeros(*shape, **kw)


def read(address: int, shape: tuple, dtype: str) -> np.ndarray:
    a = np.empty(shape, NUMPY[dtype])
    ctypes.memmove(a.ctypes.data, address, a.nbytes)
    return a


class FakeContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, None, {}, {}

    def set_device_memory(self, address, size):
        pass

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return 0 <= index < self.engine.num_optimization_profiles

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        self.shapes[name] = shape
        return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream):
        spec = self.engine.piece
        feeds = {t.name: read(self.addresses[t.name], self.shapes[t.name], t.dtype) for t in spec.inputs}
        for t, value in zip(spec.outputs, self.engine.session.run([t.name for t in spec.outputs], feeds)):
            value = np.ascontiguousarray(value)
            size = self.engine.fake.torch.sizes.get(self.addresses[t.name])
            assert size == value.nbytes, f"{spec.name}: output {t.name} bound to {size} bytes, needs {value.nbytes}"
            ctypes.memmove(self.addresses[t.name], value.ctypes.data, value.nbytes)
        self.engine.fake.calls.append((spec.name, self.profile))
        self.engine.fake.batches.append(self.shapes[spec.inputs[0].name][0])
        return True


class FakeEngine:
    def __init__(self, fake, piece):
        import onnxruntime as ort

        self.fake, self.piece = fake, piece
        self.profiles = [profile_for(piece, r) for r in piece_profiles(fake.manifest, piece).values()]
        self.num_optimization_profiles = len(self.profiles)
        self.device_memory_size_v2 = 64
        self.session = ort.InferenceSession(str(fake.engine_dir / piece.file), providers=["CPUExecutionProvider"])

    def create_runtime_config(self):
        return SimpleNamespace(set_execution_context_allocation_strategy=lambda s: None,
                               create_runtime_cache=lambda: SimpleNamespace(deserialize=lambda b: None,
                                                                            serialize=lambda: b""),
                               set_runtime_cache=lambda c: None)

    def create_execution_context(self, config):
        return FakeContext(self)


class FakeTensorRT:
    """The tensorrt_rtx module as TensorRTBackend uses it; a plan's bytes are b"plan:<piece name>"."""

    def __init__(self, engine_dir):
        self.engine_dir = Path(engine_dir)
        self.manifest = load_manifest(engine_dir)
        self.torch = FakeTorch()
        self.calls: list[tuple[str, int]] = []   # (piece, profile index) of every enqueue
        self.batches: list[int] = []             # the batch size of every enqueue
        fake = self

        class Runtime:
            def __init__(self, logger):
                pass

            def get_engine_validity(self, blob):
                return "valid", 0

            def deserialize_cuda_engine(self, blob):
                return FakeEngine(fake, fake.manifest.piece(blob.decode().split(":", 1)[1].strip()))

        class ILogger:
            Severity = SimpleNamespace(WARNING=2)

            def __init__(self):
                pass

        self.module = SimpleNamespace(__version__=VERSION, Runtime=Runtime, ILogger=ILogger,
                                      EngineValidity=SimpleNamespace(INVALID="invalid"),
                                      ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED=2))

    def cuda_device(self):
        return self.torch, "NVIDIA GeForce RTX 4090", "8.9"

    def import_tensorrt(self, flavor="auto", device_cc=None):
        return self.module, "rtx"


def assert_decodes_like(backend, reference, gen: int, prompts: int, prompt_lengths: tuple[int, int]) -> None:
    """Token for token, under each cache policy, `backend` decodes random prompts as `reference` does."""
    from dllm_trt.runtime.decoder import Decoder
    from dllm_trt.runtime.policies import make_policy
    from dllm_trt.runtime.schedule import BlockSchedule, WindowSchedule

    schedules = {"none": lambda: BlockSchedule(gen, 8, steps=gen), "prefix": lambda: BlockSchedule(gen, 8, threshold=0.08),
                 "dual": lambda: BlockSchedule(gen, 8, threshold=0.08),
                 "elastic": lambda: WindowSchedule(gen, 8, threshold=0.08)}
    rng = np.random.default_rng(5)
    for prompt in (rng.integers(32, 127, int(rng.integers(*prompt_lengths))).tolist() for _ in range(prompts)):
        for cache, schedule in schedules.items():
            want = Decoder(reference, make_policy(cache), schedule()).generate(prompt).canvas_ids
            got = Decoder(backend, make_policy(cache), schedule()).generate(prompt).canvas_ids
            assert got == want, (cache, prompt)
