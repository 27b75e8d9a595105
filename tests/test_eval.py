"""The bundled trained model and the evaluation command."""
import hashlib
import json
from pathlib import Path

from dllm_trt.cli import DEFAULT_MODEL, main
from dllm_trt.runtime.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_bundled_checkpoint_matches_training_record():
    record = json.loads((DEFAULT_MODEL / "TRAINING.json").read_text())
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((DEFAULT_MODEL / name).read_bytes()).hexdigest() == digest, name
    ckpt = Checkpoint(DEFAULT_MODEL)
    assert ckpt.config.n_layers >= 6 and ckpt.config.n_heads >= 4
    assert sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir()) <= 25 * 2**20


def test_eval_runs_end_to_end_on_bundled_model(tmp_path, capsys):
    out = tmp_path / "results.json"
    main(["eval", "--model", str(DEFAULT_MODEL), "--backend", "torch", "--data", str(REPO / "data" / "arith_heldout.jsonl"),
          "--limit", "5", "--cache", "none,dual,elastic", "--gen-length", "128", "--out", str(out)])
    table = capsys.readouterr().out
    for label in ("LLaDA baseline", "Fast-dLLM", "same schedule, no cache", "Elastic-Cache (gamma 0.9)"):
        assert f"| {label} |" in table
    results = {r["label"]: r for r in json.loads(out.read_text())["results"]}
    assert all(r["problems"] == 5 for r in results.values())
    # a trained model: the baseline solves most of these (the scorer is the GSM8K rule on '#### N')
    assert results["LLaDA baseline"]["accuracy"] >= 0.6
    assert results["Elastic-Cache (gamma 0.9)"]["tokens_per_step"] > 1.0
