"""Memory and first-request cost of the ONNX Runtime backend: per-session weights (the old loading, selected with
DLLM_TRT_ORT_WEIGHTS=per-session) against one shared, memory-mapped copy (the default).

    python tools/bench_memory.py [--work /tmp/dllm-mem] [--models big,arith] [--repeats 8]

Writes a random LLaDA with 0.42 B parameters (d_model 2048, 16 heads, 8 layers, SwiGLU 5632, vocabulary 4096)
into --work, exports it once (fp32, --max-len 384) with the CLI, exports the bundled models/arith likewise, then
measures, each in fresh processes: peak RSS of one `generate --cache elastic` per mode; PSS and shared pages of
two processes serving the same folder; first vs later refresh pass at a new canvas length, with and without
warmup; and window / refresh pass times of both modes side by side in one process (alternating, medians; wall
clock and process CPU time, which the other jobs on a busy machine disturb less).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = str(Path(__file__).resolve().parent)
PROMPT = "A counter shows 36 . Each step adds 5 and keeps the last two digits . What does it show after 5 steps ?"
MODES = ("per-session", "shared")


def write_big_checkpoint(out: Path) -> Path:
    from dataclasses import replace

    from dllm_trt.export.checkpoint_writer import byte_tokenizer, random_weights, tiny_config, write_checkpoint

    cfg = replace(tiny_config(n_layers=8, d_model=2048, n_heads=16, max_len=1024), mlp_hidden_size=5632,
                  vocab_size=4096, embedding_size=4096)
    return write_checkpoint(out, cfg, random_weights(cfg, 7), byte_tokenizer(), shards=2)


def export(model: Path, out: Path, max_len: int | None) -> Path:
    if not (out / "manifest.json").is_file():
        extra = ["--max-len", str(max_len)] if max_len else []
        subprocess.run([sys.executable, "-m", "dllm_trt.cli", "export", "--model", str(model), "--out", str(out),
                        *extra], check=True)
    return out


def with_tools(env: dict) -> dict:
    """The environment of a child that imports tools/step_passes.py."""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TOOLS, env.get("PYTHONPATH")) if p)
    return env


def last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- 1. peak RSS of one generation ------------------------------------------------------------------------------
GENERATE = """
import contextlib, io, json, sys
from dllm_trt.cli import main
from dllm_trt.runtime.memory import peak_rss_bytes
out = io.StringIO()
with contextlib.redirect_stdout(out):
    main(sys.argv[1:])
result = json.loads(out.getvalue().strip().splitlines()[-1])
print(json.dumps({"peak_rss": peak_rss_bytes(), "steps": result["steps"], "seconds": result["seconds"],
                  "refresh_fraction": result["refresh_fraction"]}))
"""


def peak_rss(engines: Path, mode: str, gen_length: int) -> dict:
    args = ["generate", "--engines", str(engines), "--prompt", PROMPT, "--gen-length", str(gen_length),
            "--cache", "elastic", "--threshold", "0.0", "--json"]
    env = dict(os.environ, DLLM_TRT_ORT_WEIGHTS=mode)
    proc = subprocess.run([sys.executable, "-c", GENERATE, *args], env=env, capture_output=True, text=True,
                          check=True)
    return last_json(proc)


BASELINE = """
import json
import onnxruntime
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dllm_trt.runtime.memory import peak_rss_bytes
print(json.dumps({"peak_rss": peak_rss_bytes()}))
"""


def baseline_rss() -> int:
    """Peak RSS of a process that only imports the runtime and ONNX Runtime (libraries, interpreter)."""
    proc = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True)
    return last_json(proc)["peak_rss"]


def cache_bytes(engines: Path, canvas: int) -> int:
    """KV/Q caches and boundary hidden states the backend keeps for a canvas (float32)."""
    from dllm_trt.runtime.manifest import load_manifest

    m = load_manifest(engines)
    c = m.config
    return 4 * canvas * (3 * c.n_layers * c.d_model + (len(m.layer_ranges) + 1) * c.d_model)


# ---- 2. two processes on the same folder --------------------------------------------------------------------------
SERVE_LIKE = """
import sys
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
b = OnnxRuntimeBackend(sys.argv[1])
b.warmup()
print("ready", flush=True)
sys.stdin.read()
"""


def two_processes(engines: Path, mode: str) -> list[dict]:
    from dllm_trt.runtime.memory import smaps_rollup

    env = dict(os.environ, DLLM_TRT_ORT_WEIGHTS=mode)
    procs = [subprocess.Popen([sys.executable, "-c", SERVE_LIKE, str(engines)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a child failed to load the engine")
        return [{k: v for k, v in smaps_rollup(p.pid).items() if k in ("Rss", "Pss", "Shared_Clean", "Private_Clean",
                                                                        "Private_Dirty")} for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()


# ---- 3. first vs later refresh pass -------------------------------------------------------------------------------
FIRST = """
import json, sys, time
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from step_passes import cpu_seconds as cpu, refresh_pass
b = OnnxRuntimeBackend(sys.argv[1])
t = time.perf_counter()
if sys.argv[2] == "1":
    b.warmup()
warmup_s = time.perf_counter() - t

out = {"warmup_s": round(warmup_s, 2)}
for n in (int(x) for x in sys.argv[3].split(",")):
    b.begin(n)
    passes = []
    for _ in range(4):
        c, t = cpu(), time.perf_counter()
        refresh_pass(b, n)
        passes.append([round(time.perf_counter() - t, 3), round(cpu() - c, 3)])
    out[n] = passes
print(json.dumps(out))
"""


def first_vs_later(engines: Path, mode: str, warm: bool, lengths: str) -> dict:
    env = with_tools(dict(os.environ, DLLM_TRT_ORT_WEIGHTS=mode))
    proc = subprocess.run([sys.executable, "-c", FIRST, str(engines), "1" if warm else "0", lengths], env=env,
                          capture_output=True, text=True, check=True)
    return last_json(proc)


# ---- 4. window and refresh passes side by side --------------------------------------------------------------------
SIDE = """
import json, sys
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from step_passes import side_by_side
eng, n, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
backends = {"per-session": OnnxRuntimeBackend(eng, share_weights=False),
            "shared": OnnxRuntimeBackend(eng, share_weights=True)}
for b in backends.values():
    b.warmup()
print(json.dumps(side_by_side(backends, n, repeats)))
"""


def side_by_side(engines: Path, canvas: int, repeats: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", SIDE, str(engines), str(canvas), str(repeats)],
                          env=with_tools(dict(os.environ)), capture_output=True, text=True, check=True)
    return last_json(proc)


def weight_bytes(engines: Path) -> int:
    from dllm_trt.runtime.manifest import load_manifest

    return load_manifest(engines).weight_bytes()


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def bench(name: str, engines: Path, canvas: int, gen_length: int, repeats: int) -> dict:
    report = {"engines": str(engines), "weight_bytes": weight_bytes(engines)}
    print(f"\n== {name}: {engines} (weights {gb(report['weight_bytes'])})", flush=True)
    from dllm_trt.runtime.tokenizer import TextTokenizer

    prompt_tokens = len(TextTokenizer(engines).encode_prompt(PROMPT, chat=False))
    report["cache_bytes"] = cache_bytes(engines, prompt_tokens + gen_length)
    report["baseline_rss"] = base = baseline_rss()
    need = report["weight_bytes"] + report["cache_bytes"]
    for mode in MODES:
        r = peak_rss(engines, mode, gen_length)
        ratio, above = r["peak_rss"] / need, (r["peak_rss"] - base) / need
        report[f"generate_{mode}"] = r | {"ratio": round(ratio, 2), "ratio_above_baseline": round(above, 2)}
        print(f"generate --cache elastic --gen-length {gen_length} ({mode}): peak RSS {gb(r['peak_rss'])} = "
              f"{ratio:.2f}x weights + caches ({gb(need)}); {above:.2f}x counting only what is above the "
              f"{gb(base)} of an idle process with the runtime imported", flush=True)
    for mode in MODES:
        procs = two_processes(engines, mode)
        report[f"two_processes_{mode}"] = procs
        print(f"two processes, same folder ({mode}): " + "; ".join(
            f"RSS {gb(p['Rss'])} PSS {gb(p['Pss'])} file-backed {gb(p['Private_Clean'] + p['Shared_Clean'])}"
            for p in procs), flush=True)
    lengths = f"{canvas - 84},{canvas // 2},{canvas}"
    for mode in MODES:
        for warm in (False, True):
            r = first_vs_later(engines, mode, warm, lengths)
            report[f"first_vs_later_{mode}_{'warm' if warm else 'cold'}"] = r
            print(f"refresh passes, ms wall/CPU ({mode}, {'after warmup ' + str(r['warmup_s']) + ' s' if warm else 'no warmup'}):"
                  f" " + "; ".join(f"n={n}: " + " ".join(f"{w * 1e3:.0f}/{c * 1e3:.0f}" for w, c in r[n])
                                  for n in r if n != "warmup_s"), flush=True)
    side = side_by_side(engines, canvas, repeats)
    report["side_by_side"] = side
    for kind in ("refresh", "window"):
        old, new = side["per-session"], side["shared"]
        print(f"{kind} pass at canvas {canvas}, median of {repeats}: per-session {old[kind] * 1e3:.1f} ms "
              f"({old[kind + '_cpu'] * 1e3:.1f} ms CPU), shared {new[kind] * 1e3:.1f} ms "
              f"({new[kind + '_cpu'] * 1e3:.1f} ms CPU): shared/per-session {new[kind] / old[kind]:.3f} wall, "
              f"{new[kind + '_cpu'] / old[kind + '_cpu']:.3f} CPU", flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/dllm-mem", help="where the checkpoint and exports go")
    ap.add_argument("--models", default="big,arith", help="big (random 0.42 B) and/or arith (bundled)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", help="also write the numbers as JSON here")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    reports = {}
    t0 = time.perf_counter()
    if "big" in a.models:
        ckpt = work / "rand042b"
        if not (ckpt / "config.json").is_file():
            write_big_checkpoint(ckpt)
        reports["big"] = bench("random LLaDA 0.42 B", export(ckpt, work / "eng042b", 384), 384, 128, a.repeats)
    if "arith" in a.models:
        eng = export(REPO / "models" / "arith", work / "arith", None)
        reports["arith"] = bench("models/arith", eng, 256, 128, a.repeats)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if a.out:
        Path(a.out).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
