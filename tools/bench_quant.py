"""Weight-only int8/int4 pieces against fp32 on ONNX Runtime (CPU): step times side by side, sizes, peak RSS.

    python tools/bench_quant.py [--work /tmp/dllm-quant] [--repeats 10] [--block 128 | --blocks 32,64,128]

Writes a random mid-size LLaDA (d_model 2048, 16 heads, 8 layers, SwiGLU 5504, vocabulary 32000) into --work,
exports it three times (fp32, --quantize int8, --quantize int4; --max-len 384, one layer per range), then in ONE
process loads the three engines and times, alternating between them inside each repeat, a window step (25 query
rows: 8 tracked + 1 fresh + 16 window, every range, then the head on 16 rows) and a refresh step (the whole
384-slot canvas through every range, then the head), reporting medians of wall time and process CPU time and the
ratios to fp32. Then the bytes of each engine and the peak RSS of one `generate --json` per engine (fresh processes).
Timings on a shared machine are noisy: read the ratios, not the absolute numbers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


SCHEMES = ("fp32", "int8", "int4")
CANVAS = 384


def write_checkpoint(out: Path) -> Path:
    from dataclasses import replace

    from dllm_trt.export.checkpoint_writer import byte_tokenizer, random_weights, tiny_config, write_checkpoint

    cfg = replace(tiny_config(n_layers=8, d_model=2048, n_heads=16, max_len=1024), mlp_hidden_size=5504,
                  vocab_size=32000, embedding_size=32000)
    return write_checkpoint(out, cfg, random_weights(cfg, 11), byte_tokenizer(), shards=2)


def export(model: Path, out: Path, scheme: str, block: int) -> float:
    if (out / "manifest.json").is_file():
        return 0.0
    extra = [] if scheme == "fp32" else ["--quantize", scheme, "--quant-block", str(block)]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dllm_trt.cli", "export", "--model", str(model), "--out", str(out),
                    "--max-len", str(CANVAS), "--max-active", "64", *extra], check=True)
    return time.perf_counter() - t


def write_wide_checkpoint(out: Path) -> Path:
    """LLaDA-8B's widths with 2 layers, bf16 on disk (~2.9 GB)."""
    import torch

    from dllm_trt.export.checkpoint_writer import byte_tokenizer, random_weights, tiny_config, write_checkpoint
    from dataclasses import replace

    cfg = replace(tiny_config(n_layers=2, d_model=4096, n_heads=32, max_len=4096), mlp_hidden_size=12288,
                  vocab_size=126464, embedding_size=126464)
    return write_checkpoint(out, cfg, random_weights(cfg, 5, dtype=torch.bfloat16), byte_tokenizer(), shards=2)


def wide_export(work: Path, scheme: str, block: int) -> dict:
    """Export the 2-layer LLaDA-8B-width checkpoint (--max-len 512) under /usr/bin/time -v; project 32 layers."""
    model = work / "wide-model"
    if not (model / "config.json").is_file():
        write_wide_checkpoint(model)
    out = work / f"wide-{scheme}-b{block}"
    shutil.rmtree(out, ignore_errors=True)  # time a whole export every run
    extra = [] if scheme == "fp32" else ["--quantize", scheme, "--quant-block", str(block)]
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "dllm_trt.cli", "export", "--model",
                           str(model), "--out", str(out), "--max-len", "512", "--max-active", "64", *extra],
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t
    rss = next(int(line.split()[-1]) * 1024 for line in proc.stderr.splitlines() if "Maximum resident" in line)
    from dllm_trt.runtime.manifest import load_manifest

    m = load_manifest(out)
    sizes = {p.name: (out / p.file).stat().st_size + p.data_size for p in m.pieces}
    per_range = {n: v for n, v in sizes.items() if n.startswith("layers_")}
    one_range = sum(per_range.values()) / len(m.layer_ranges)
    full = sizes["embed"] + sizes["head"] + 32 * one_range
    report = {"scheme": scheme, "seconds": round(seconds, 1), "peak_rss": rss, "sizes": sizes,
              "projected_32_layers": full, "projected_32_layers_without_embed": full - sizes["embed"]}
    print(f"wide {scheme}: export {seconds:.0f} s, peak RSS {rss / 2**30:.2f} GiB; " + ", ".join(
        f"{n} {v / 2**20:.0f} MiB" for n, v in sizes.items()) + f"; 32 layers projected {full / 1e9:.2f} GB "
        f"({(full - sizes['embed']) / 1e9:.2f} GB without the embedding)", flush=True)
    return report


def side_by_side(engines: dict[str, Path], repeats: int, threads: int | None, prepack: bool | None) -> dict:
    from step_passes import side_by_side as alternate

    from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    backends = {s: OnnxRuntimeBackend(e, threads=threads, prepack=prepack) for s, e in engines.items()}
    return alternate(backends, CANVAS, repeats)


def engine_bytes(engine: Path) -> dict:
    from dllm_trt.runtime.manifest import load_manifest

    m = load_manifest(engine)
    per_kind: dict[str, int] = {}
    for p in m.pieces:
        size = (engine / p.file).stat().st_size + p.data_size
        per_kind[p.kind] = per_kind.get(p.kind, 0) + size
    return per_kind | {"total": sum(per_kind.values())}


def generate_rss(engine: Path) -> int:
    proc = subprocess.run([sys.executable, "-m", "dllm_trt.cli", "generate", "--engines", str(engine), "--json",
                           "--gen-length", "128", "--prompt", "A counter shows 36 . What does it show ?"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/dllm-quant")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--blocks", help="compare these block sizes side by side instead (e.g. 32,64,128)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--prepack", choices=["default", "on", "off"], default="default")
    ap.add_argument("--out", help="also write the report as JSON here")
    ap.add_argument("--wide", help="instead: export the 2-layer LLaDA-8B-width model with these schemes (e.g. "
                                   "int4,fp32) and report time, peak RSS, sizes and the 32-layer projection")
    a = ap.parse_args()
    work = Path(a.work)
    if a.wide:
        report = [wide_export(work, s, a.block) for s in a.wide.split(",")]
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=2))
        return
    model = work / "model"
    if not (model / "config.json").is_file():
        write_checkpoint(model)
    # one engine per scheme and block size (the block is part of the folder name, so an engine quantized with
    # other blocks is never reused); --blocks 32,64,128 compares block sizes side by side in the same process
    blocks = [int(b) for b in a.blocks.split(",")] if a.blocks else [a.block]
    variants = {"fp32": ("fp32", 0)} | {(s if len(blocks) == 1 else f"{s}-b{b}"): (s, b)
                                       for s in SCHEMES[1:] for b in blocks}
    engines = {v: work / ("engines-fp32" if s == "fp32" else f"engines-{s}-b{b}") for v, (s, b) in variants.items()}
    report = {"export_seconds": {v: round(export(model, engines[v], s, b), 1) for v, (s, b) in variants.items()}}
    report["bytes"] = {v: engine_bytes(e) for v, e in engines.items()}
    prepack = {"default": None, "on": True, "off": False}[a.prepack]
    side = report["side_by_side"] = side_by_side(engines, a.repeats, a.threads, prepack)
    for v in variants:
        w, r = side[v], side["fp32"]
        print(f"{v}: window step {w['window'] * 1e3:.1f} ms ({r['window'] / w['window']:.2f}x fp32; CPU "
              f"{r['window_cpu'] / w['window_cpu']:.2f}x), refresh step {w['refresh'] * 1e3:.1f} ms "
              f"({r['refresh'] / w['refresh']:.2f}x fp32; CPU {r['refresh_cpu'] / w['refresh_cpu']:.2f}x), "
              f"pieces {report['bytes'][v]['total'] / 2**20:.0f} MiB", flush=True)
    report["generate_peak_rss"] = {v: generate_rss(e) for v, e in engines.items()}
    print("generate peak RSS: " + ", ".join(f"{v} {x / 2**20:.0f} MiB" for v, x in report["generate_peak_rss"].items()))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
