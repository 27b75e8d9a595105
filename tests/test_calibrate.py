"""`dllm-trt calibrate`: the search finds the cliff, the chosen gamma meets its target, the result is recorded in
manifest.json (strictly validated) and becomes the default gamma of every entry point."""
import json
import shutil
from pathlib import Path

import pytest

from dllm_trt.cli import main
from dllm_trt.evaluate.calibrate import Point, calibrate, choose, passes, search
from dllm_trt.evaluate.harness import load_problems
from dllm_trt.runtime import manifest as manifest_module
from dllm_trt.runtime.calibration import write_calibration
from dllm_trt.runtime.config import ModelError
from dllm_trt.runtime.manifest import load_manifest
from dllm_trt.runtime.options import DecodeOptions, OptionError, resolve_gamma

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "data" / "arith_heldout.jsonl"


def curve(cliff: float):
    """A synthetic policy: no refresh after step 0 below the drift cliff, above it more refreshes the higher gamma
    is, and answers that agree with the reference; records every gamma asked for."""
    asked = []

    def measure(g: float) -> Point:
        asked.append(g)
        above = g >= cliff
        return Point(g, 0.2 + above * (0.5 + g - cliff), agreement=1.0 if above else 0.8,
                     token_agreement=1.0, accuracy=0.8 if above else 0.9)
    return measure, asked


def test_search_bisects_the_cliff_of_a_synthetic_curve():
    measure, asked = curve(0.9234)
    points = search(measure, passes("agreement", 0.99), grid=(0.5, 0.8, 0.9, 0.95, 0.99), steps=6)
    assert len(asked) == 5 + 6                                    # the grid, then one decode per bisection
    best = choose(points, passes("agreement", 0.99))
    assert 0.9234 <= best.gamma <= 0.9234 + 0.05 / 2 ** 6         # the cheapest passing gamma, next to the cliff
    assert all(0.9 <= g <= 0.95 for g in asked[5:])               # only the cliff's interval was bisected


def test_accuracy_target_is_points_below_the_best():
    measure, _ = curve(0.9234)
    meets = passes("accuracy", 1.0)
    points = search(measure, meets, grid=(0.5, 0.8, 0.9, 0.95, 0.99), steps=3)
    best = choose(points, meets)
    assert best.accuracy == 0.9 and best.refresh_fraction == 0.2 and best.gamma == 0.8   # middle of the plateau
    assert choose(points, passes("agreement", 0.99)).gamma > 0.92   # the other objective pulls the other way


def test_flat_curve_is_not_bisected():
    asked = []

    def measure(g):
        asked.append(g)
        return Point(g, 0.3, agreement=1.0, token_agreement=1.0)
    search(measure, passes("agreement", 0.99), grid=(0.5, 0.9), steps=4)
    assert asked == [0.5, 0.9]


def test_calibrated_gamma_meets_its_target_on_the_bundled_model():
    """16 problems of the bundled model's held-out set: the chosen gamma's answers agree with the no-cache
    reference on at least the target's share of them, re-decoded independently through the Python API."""
    from dllm_trt.runtime.api import Engine
    from dllm_trt.runtime.engine import open_checkpoint
    from dllm_trt.runtime.tokenizer import TextTokenizer

    engine = Engine(open_checkpoint(ROOT / "models" / "arith"), TextTokenizer(ROOT / "models" / "arith"), "arith")
    problems = load_problems(str(HELD_OUT), 16)
    cal = calibrate(engine.backend, engine.tokenizer, problems, "agreement", 0.9, DecodeOptions(), 128,
                    grid=(0.9, 0.99), steps=1, metrics=("heads",), progress=False)
    assert cal.decodes_per_prompt == 1 + 1 * (2 + 1) <= 3 * (2 + 1)
    chosen = cal.chosen["heads"]
    agree = 0
    for p in problems:
        messages = [{"role": "user", "content": p["question"]}]
        reference = engine.generate(messages, cache="none", window=16, max_tokens=128).token_ids
        agree += engine.generate(messages, gamma=chosen.gamma, max_tokens=128).token_ids == reference
    assert agree / len(problems) == chosen.agreement >= 0.9


# ---- the record in manifest.json ---------------------------------------------------------------------------------
@pytest.fixture
def eng(tiny_engines, tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "_IN_MEMORY", {})
    return shutil.copytree(tiny_engines, tmp_path / "eng")


def block(**changes):
    return {"gamma": {"heads": -1.0, "keys": 0.5}, "score": {"heads": 1.0, "keys": 1.0},
            "refresh_fraction": {"heads": 0.2, "keys": 0.3}, "objective": "agreement", "target": 0.99,
            "prompts": 4, "data_sha256": "0" * 64, "tool_version": "0.1.0", "date": "2026-12-06T19:30:00+00:00",
            **changes}


@pytest.mark.parametrize("damage,message", [
    (lambda b: b["gamma"].update(heads="0.9"), r"calibration.gamma.heads must be a number in \[-1, 2\]"),
    (lambda b: b["gamma"].update(heads=7), r"calibration.gamma.heads must be a number"),
    (lambda b: b["gamma"].update(heads=True), r"calibration.gamma.heads must be a number"),
    (lambda b: b["score"].pop("keys"), r"calibration.score must have one value per"),
    (lambda b: [b[k].update(values=0.5) for k in ("gamma", "score", "refresh_fraction")],
     r"calibration.gamma names unknown drift metric 'values'"),
    (lambda b: b.pop("data_sha256"), r"calibration lacks 'data_sha256'"),
    (lambda b: b.update(extra=1), r"calibration has unknown field 'extra'"),
    (lambda b: b.update(objective="speed"), r"calibration.objective must be one of"),
    (lambda b: b.update(target=5), r"calibration.target must be a number in \[0, 1\]"),
    (lambda b: b.update(prompts=0), r"calibration.prompts must be a positive integer"),
    (lambda b: b["refresh_fraction"].update(keys=1.5), r"calibration.refresh_fraction.keys must be a number"),
    (lambda b: b.update(date="yesterday"), r"calibration.date must be an ISO 8601 date"),
    (lambda b: b.update(gamma={}), r"calibration.gamma must map drift metrics"),
])
def test_tampered_calibration_is_refused(eng, damage, message):
    raw = json.loads((eng / "manifest.json").read_text())
    raw["calibration"] = block()
    damage(raw["calibration"])
    (eng / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"manifest.json: malformed manifest \(" + message):
        load_manifest(eng)


def test_tampered_calibration_on_the_command_line(eng, capsys):
    raw = json.loads((eng / "manifest.json").read_text())
    raw["calibration"] = block(target="high")
    (eng / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as e:
        main(["generate", "--engines", str(eng), "--prompt", "Hi", "--gen-length", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("dllm-trt: error: ") and "target" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_recorded_block_keeps_the_folder_valid_and_replaceable(eng):
    before = json.loads((eng / "manifest.json").read_text())
    write_calibration(eng, block())
    after = json.loads((eng / "manifest.json").read_text())
    assert after.pop("calibration") == block() and after == before          # nothing else changed
    assert sorted(p.name for p in eng.iterdir()) == sorted(p.name for p in eng.iterdir() if not p.name.startswith("."))
    m = load_manifest(eng)
    assert m.calibration == block() and m.to_json()["calibration"] == block()
    try:
        from dllm_trt.export.out_folder import not_an_engine_folder
    except ImportError:
        from dllm_trt.export.onnx_export import not_an_engine_folder
    assert not_an_engine_folder(eng) == ""   # export may still replace it as its own


def test_resolve_gamma():
    cal = block()
    assert resolve_gamma(DecodeOptions(), cal) == (-1.0, "calibrated")
    assert resolve_gamma(DecodeOptions(drift_metric="keys"), cal) == (0.5, "calibrated")
    assert resolve_gamma(DecodeOptions(gamma=0.7), cal) == (0.7, "given")
    assert resolve_gamma(DecodeOptions(), {}) == (0.9, "default")
    assert resolve_gamma(DecodeOptions(gamma="calibrated"), cal) == (-1.0, "calibrated")
    with pytest.raises(OptionError, match="no calibrated gamma"):
        resolve_gamma(DecodeOptions(gamma="calibrated"), {})


# ---- the command -------------------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_calibrate_command_records_the_result(eng, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"question": f"prompt {i}"} for i in range(3)])
    main(["calibrate", str(eng), "--data", str(data), "--prompts", "3", "--grid", "0.5,1.5", "--bisect-steps", "1",
          "--gen-length", "16", "--target", "0.5"])
    out = capsys.readouterr().out
    assert "objective optimised: agreement" in out and "decodes: 7 per prompt" in out
    assert "accuracy objective needs an 'answer'" in out
    cal = load_manifest(eng).calibration
    assert set(cal["gamma"]) == {"heads", "keys"} and cal["objective"] == "agreement" and cal["prompts"] == 3
    assert all(s >= 0.5 for s in cal["score"].values())
    main(["doctor", str(eng)])
    assert "(calibrated: agreement, target 0.5, 3 prompts" in capsys.readouterr().out


@pytest.mark.parametrize("rows,args,message", [
    ([], [], "no problems"),
    ([{"question": "q"}], ["--objective", "accuracy"], "--objective accuracy scores an 'answer' on every line"),
    ([{"question": "q"}], ["--target", "2"], "--target for agreement is a fraction of prompts"),
    ([{"question": "q"}], ["--grid", "0.5,x"], "--grid takes comma-separated gammas"),
    ([{"question": "q"}], ["--objective", "accuracy", "--target", "-1"], "--target for accuracy is points below"),
])
def test_calibrate_errors_leave_the_folder_untouched(eng, tmp_path, capsys, rows, args, message):
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    before = (eng / "manifest.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["calibrate", str(eng), "--data", str(data), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("dllm-trt: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)
    assert (eng / "manifest.json").read_bytes() == before


def test_no_gamma_meeting_the_target_still_reports_what_was_measured(eng, tmp_path, capsys, monkeypatch):
    """Random weights drift a lot: a search that finds nothing must show its table for every metric (it used to
    stop at the first metric with one line, after all the decoding), and record nothing."""
    from dllm_trt.evaluate import calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "passes", lambda objective, target: lambda p, points: False)
    data = write_jsonl(tmp_path / "p.jsonl", [{"question": f"prompt {i}"} for i in range(2)])
    before = (eng / "manifest.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["calibrate", str(eng), "--data", str(data), "--prompts", "2", "--grid", "0.5,0.9", "--bisect-steps", "0",
              "--gen-length", "16"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "chosen: heads none, keys none" in captured.out
    assert all(f"| {m} | {g} |" in captured.out for m in ("heads", "keys") for g in ("0.5", "0.9"))
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("dllm-trt: error: no gamma meets the agreement target 0.99 for drift metric heads and keys")
    assert (eng / "manifest.json").read_bytes() == before


def test_gamma_sweep_gains_the_calibrated_point(eng, tmp_path, capsys):
    write_calibration(eng, block())
    data = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "#### 1"}])
    report, plot = tmp_path / "report.json", tmp_path / "sweep.png"
    plotting = pytest.importorskip("matplotlib", reason="plot needs matplotlib") is not None
    main(["bench", "--engines", str(eng), "--data", str(data), "--prompts", "1", "--repeats", "1", "--gen-lengths",
          "16", "--gamma-sweep", "0.9", "--sweep-limit", "1", "--sweep-gen-length", "16", "--no-llada-baseline",
          "--out", str(report), *(["--plot", str(plot)] if plotting else [])])
    labels = [row["label"] for row in json.loads(report.read_text())["gamma_sweep"]]
    assert "elastic gamma 0.9" in labels and "elastic gamma -1 (calibrated)" in labels
    assert "Elastic-Cache (gamma -1, calibrated)" in json.loads(report.read_text())["speed"]["16"]
    assert not plotting or plot.stat().st_size > 0
