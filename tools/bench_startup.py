"""Start-up cost of one `dllm-trt generate --engines E` process: wall time and CPU time of the whole process
against the decoding time it reports, medians over repeats; with --against, the same for another checkout of
dllm-trt (its folder goes first on PYTHONPATH), runs alternating; and the phases of one start-up in this process.

    python tools/bench_startup.py ENGINES [--repeats 15] [--against /work/main]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
PROMPT = "A counter shows 36 . Each step adds 5 and keeps the last two digits . What does it show after 5 steps ?"


def one_run(engines: str, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    # `python -m` puts the working directory first on sys.path: run in the checkout being measured, or the
    # dllm_trt folder of whatever directory this was started from would shadow it
    proc = subprocess.run([sys.executable, "-m", "dllm_trt.cli", "generate", "--engines", engines, "--chat",
                           "--gen-length", "128", "--prompt", PROMPT, "--json"], capture_output=True, text=True,
                          env=env, cwd=pythonpath or REPO, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    decode = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    return {"wall": wall, "cpu": cpu, "decode": decode, "outside": wall - decode}


def imported_from(pythonpath: str | None) -> str:
    """Where a run with this PYTHONPATH imports the runtime from (to be sure each variant runs its own code)."""
    env = dict(os.environ) | ({"PYTHONPATH": pythonpath} if pythonpath else {})
    return subprocess.run([sys.executable, "-c", "import dllm_trt.runtime.decoder as d; print(d.__file__)"],
                          capture_output=True, text=True, env=env, cwd=pythonpath or REPO, check=True).stdout.strip()


def phases(engines: str) -> dict:
    """Seconds of each start-up phase, in this process (imports first, so run this before anything else)."""
    out, t = {}, time.perf_counter()

    def mark(name):
        nonlocal t
        now = time.perf_counter()
        out[name] = now - t
        t = now

    import numpy  # noqa: F401
    mark("import numpy")
    import onnxruntime  # noqa: F401
    mark("import onnxruntime")
    from dllm_trt import cli  # noqa: F401
    from dllm_trt.runtime.decoder import Decoder
    from dllm_trt.runtime.options import DecodeOptions, build
    from dllm_trt.runtime.tokenizer import TextTokenizer
    mark("import dllm_trt")
    from dllm_trt.runtime.manifest import load_manifest
    load_manifest(engines)
    mark("manifest")
    from dllm_trt.runtime.engine import open_engines
    backend = open_engines(engines)
    mark("backend (manifest again + sessions)")
    tok = TextTokenizer(engines)
    ids = tok.encode_prompt(PROMPT, chat=True)
    mark("tokenizer + chat template")
    schedule, policy = build(DecodeOptions(cache="elastic", gen_length=128).validate(), 128)
    Decoder(backend, policy, schedule, detokenize=tok.decode).generate(ids)
    mark("decode")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engines")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--against", help="another dllm-trt checkout to compare with (put first on PYTHONPATH)")
    a = ap.parse_args()
    a.engines = str(Path(a.engines).resolve())   # the runs start in other directories
    for name, seconds in phases(a.engines).items():
        print(f"  {name:<38} {seconds * 1e3:7.1f} ms")
    variants = {"this": os.environ.get("PYTHONPATH")}
    if a.against:
        variants[a.against] = a.against
    runs = {v: [] for v in variants}
    for name, path in variants.items():
        print(f"{name}: runs {imported_from(path)}")
        one_run(a.engines, path)   # page cache, verification cache
    for _ in range(a.repeats):
        for name, path in variants.items():
            runs[name].append(one_run(a.engines, path))
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{name}: median of {a.repeats}: wall {med['wall']:.3f} s, CPU {med['cpu']:.3f} s, decoding "
              f"{med['decode']:.3f} s, outside decoding {med['outside']:.3f} s")


if __name__ == "__main__":
    main()
