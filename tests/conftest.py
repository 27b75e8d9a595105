import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaDA checkpoint in the Hugging Face layout (sharded safetensors, index, tokenizer)."""
    from dllm_trt.export.checkpoint_writer import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=1)


TINY_ENGINE_MAX_LEN = 320


def made_once(tmp_path_factory, worker_id: str, name: str, make) -> Path:
    """A folder made once per test run and shared by its pytest-xdist workers (an export costs ~5 s per piece): the
    first worker to ask makes it under a file lock, the others wait and reuse it. Only for folders tests read."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent   # the run's folder, above each worker's own
    folder, done = shared / name / "out", shared / name / "done"
    (shared / name).mkdir(exist_ok=True)
    with FileLock(str(shared / name / "lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_engines(tiny_dir, tmp_path_factory, worker_id):
    """The tiny checkpoint exported once per test run (fp32, two layers per range; the checkpoint is the same in every
    worker: a fixed seed). Tests that modify engine files work on a copy."""
    from dllm_trt.export.onnx_export import export_model

    def make(out):
        export_model(tiny_dir, out / "tiny", layers_per_range=2, max_len=TINY_ENGINE_MAX_LEN, max_active=64,
                     quiet=True)

    return made_once(tmp_path_factory, worker_id, "tiny_engines", make) / "tiny"


@pytest.fixture(scope="session")
def tiny_bf16_engines(tiny_dir, tmp_path_factory):
    """The tiny checkpoint exported once per session in bf16 (one range of four layers). Tests only read its pieces;
    TensorRT plan builds add a trt/ folder next to them."""
    from dllm_trt.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("engines-bf16") / "tiny"
    export_model(tiny_dir, out, layers_per_range=4, dtype="bf16", max_len=64, max_active=32, quiet=True)
    return out


@pytest.fixture(scope="session")
def arith_engines(tmp_path_factory, worker_id):
    """The bundled model (models/arith) exported once per test run (three layers per range: two graphs, a quicker
    export), shared by the workers like tiny_engines."""
    from dllm_trt.export.onnx_export import export_model

    def make(out):
        export_model(Path(__file__).resolve().parents[1] / "models" / "arith", out / "arith", layers_per_range=3,
                     max_batch=16, quiet=True)

    return made_once(tmp_path_factory, worker_id, "arith_engines", make) / "arith"


@pytest.fixture(scope="session")
def prompts():
    """20 distinct prompts of varied length over ordinary byte tokens."""
    rng = np.random.default_rng(123)
    return [rng.integers(32, 127, size=int(rng.integers(3, 17))).tolist() for _ in range(20)]


@pytest.fixture(scope="session", autouse=True)
def _private_verification_cache(tmp_path_factory):
    """Data-file verification records go to a temporary folder, not the user's ~/.cache (subprocesses inherit it)."""
    import os

    os.environ["DLLM_TRT_CACHE_DIR"] = str(tmp_path_factory.mktemp("dllm-trt-cache"))


@pytest.fixture(scope="session", autouse=True)
def _single_threaded_torch():
    """The test models are tiny: one thread is as fast, and it avoids OpenMP barrier thrashing when another
    process (or ONNX Runtime in the same process) is busy on the machine's two cores."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
