"""Share of a refresh-mode call of a layer-range piece spent on its drift output (computed and ignored in refresh
mode): the nodes only the drift outputs need, timed with ONNX Runtime's profiler (one thread, basic optimizations).

    python tools/drift_cost.py ENGINES/layers_00_01.onnx CANVAS [REPEATS]
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from bench_contract import feeds  # noqa: E402

path, n = sys.argv[1], int(sys.argv[2])
g = onnx.load(path, load_external_data=False).graph
producer = {o: node for node in g.node for o in node.output}


def ancestors(outputs: list[str]) -> set[str]:
    """Names of the nodes that computing `outputs` runs."""
    found, frontier = set(), list(outputs)
    while frontier:
        node = producer.get(frontier.pop())
        if node is not None and node.name not in found:
            found.add(node.name)
            frontier += list(node.input)
    return found


needed = ancestors([o.name for o in g.output if o.name.startswith("drift")])
keep = ancestors([o.name for o in g.output if not o.name.startswith("drift")])   # shared nodes are not drift's cost
drift_only = needed - keep
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.enable_profiling = True
o.add_session_config_entry("session.disable_prepacking", "1")
o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
o.profile_file_prefix = "/tmp/dllm-trt-drift-cost"
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
f = feeds(s, {"seq_len": n, "rows": n, "track_len": 1, "window_len": 16}, np.random.default_rng(0), True, True)
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 30
for _ in range(reps): s.run(None, f)
pf = s.end_profiling(); ev = json.load(open(pf)); os.unlink(pf)
total = drift = 0.0
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        total += e["dur"]
        if e["name"][:-12] in drift_only:
            drift += e["dur"]
print(f"{path}: canvas {n}, refresh mode: drift-only nodes {len(drift_only)}, {drift / reps / 1e3:.3f} ms of "
      f"{total / reps / 1e3:.3f} ms per call ({100 * drift / total:.1f}%)")
