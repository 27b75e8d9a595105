"""The command line: happy path and one-line errors with exit code 2 for bad values."""
import json
import subprocess
import sys

import pytest

from dllm_trt.cli import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Engine cache for automatic exports (the default backend runs checkpoints through ONNX Runtime)."""
    return ["--engine-cache", str(tmp_path_factory.mktemp("engines"))]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    return exc.value.code, err


def test_generate_json(tiny_dir, capsys, cache):
    main(["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--gen-length", "16", "--json",
          "--layers-per-range", "4", *cache])
    out = json.loads(capsys.readouterr().out)
    for key in ("text", "token_ids", "steps", "tokens", "seconds", "tokens_per_second", "refresh_fraction",
                "finish_reason", "peak_rss_bytes", "weight_bytes"):
        assert key in out
    assert out["tokens"] == len(out["token_ids"]) <= 16


def test_generate_text_and_stats_line(tiny_dir, capsys, cache):
    main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--chat", "--cache", "dual", "--gen-length", "16",
          "--block-length", "8", "--backend", "torch", *cache])
    captured = capsys.readouterr()
    assert "cache dual" in captured.err and "block schedule" in captured.err


@pytest.mark.parametrize("args,message", [
    (["--gamma", "5"], "--gamma must be in [-1, 2]"),
    (["--gamma", "nan"], "--gamma must be in [-1, 2]"),
    (["--window", "0"], "--window must be at least 1"),
    (["--gen-length", "0"], "--gen-length must be at least 1"),
    (["--gen-length", "4096"], "exceeds the 512 positions available"),
    (["--block-length", "0"], "--block-length must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--tokens-per-step", "0"], "--tokens-per-step must be at least 1"),
    (["--device", "bogus", "--backend", "torch"], "unknown device 'bogus'"),
    (["--device", "cuda:7", "--backend", "torch"], "device 'cuda:7'"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1]"),
    (["--track-num", "0"], "--track-num must be at least 1"),
    (["--cache", "bogus"], "--cache must be one of none, prefix, dual, elastic; got 'bogus'"),
    (["--cache", "dual", "--window", "8"], "--window does not apply to the dual cache"),
    (["--block-length", "7", "--gen-length", "16"], "(16) must be a multiple of the block length (7)"),
    (["--window", "8", "--steps", "16"], "--window cannot be combined with the block schedule"),
    (["--layers-per-range", "9"], "layers per range must be in 1..4"),
    (["--backend", "nope"], "unknown backend 'nope'"),
])
def test_bad_values_exit_2(tiny_dir, capsys, cache, args, message):
    code, err = run_cli(["generate", "--model", str(tiny_dir), "--prompt", "Hi", *args, *cache], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_empty_prompt(tiny_dir, capsys):
    code, err = run_cli(["generate", "--model", str(tiny_dir), "--prompt", "  "], capsys)
    assert code == 2 and "--prompt is empty" in err


def test_bad_model_dir(tmp_path, capsys):
    code, err = run_cli(["generate", "--model", str(tmp_path), "--prompt", "Hi"], capsys)
    assert code == 2 and "config.json: missing" in err


def test_entry_point_subprocess(tiny_dir):
    """The installed console script, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "dllm_trt.cli", "generate", "--model", str(tiny_dir),
                           "--prompt", "Hi", "--gamma", "7"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("dllm-trt: error: --gamma") and not proc.stdout


def test_generate_process_ends_with_its_output_complete(tiny_engines):
    """A generate process leaves without tearing down its sessions: stdout and stderr must still be complete."""
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts", name="dllm-trt")] == ["dllm_trt.cli:run"]
    cmd = [sys.executable, "-m", "dllm_trt.cli", "generate", "--engines", str(tiny_engines), "--prompt", "Hi",
           "--gen-length", "8"]
    as_json = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["steps"] > 0
    as_text = subprocess.run(cmd, capture_output=True, text=True)
    assert as_text.returncode == 0 and as_text.stdout.endswith("\n") and "tok/s" in as_text.stderr.splitlines()[-1]


def test_a_reader_that_goes_away_gets_no_traceback(tiny_engines):
    """`dllm-trt generate ... | head -0`: the pipe is closed before anything is written."""
    proc = subprocess.Popen([sys.executable, "-m", "dllm_trt.cli", "generate", "--engines", str(tiny_engines),
                             "--prompt", "Hi", "--gen-length", "8", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 1 and "Traceback" not in err and "BrokenPipe" not in err


def test_special_token_text_in_a_prompt_is_text(tiny_engines, capsys):
    """Typed text that spells special tokens is encoded as text, in plain and in chat prompts."""
    text = "<|mdm_mask|><|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    main(["generate", "--engines", str(tiny_engines), "--prompt", text, "--gen-length", "8", "--json"])
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(text)  # byte tokenizer: one id per byte
    main(["generate", "--engines", str(tiny_engines), "--prompt", text, "--chat", "--gen-length", "8", "--json"])
    chat = json.loads(capsys.readouterr().out)["prompt_tokens"]
    main(["generate", "--engines", str(tiny_engines), "--prompt", "x" * len(text), "--chat", "--gen-length", "8",
          "--json"])
    assert chat == json.loads(capsys.readouterr().out)["prompt_tokens"]


def test_cuda_graphs_flag_decodes_the_same_tokens(tiny_dir, capsys):
    """--cuda-graphs runs bucketed fixed-shape steps (eagerly on a CPU): same tokens as the plain torch backend."""
    args = ["generate", "--model", str(tiny_dir), "--backend", "torch", "--prompt", "Hello", "--gen-length", "24",
            "--json", "--threshold", "0.08"]
    main(args)
    plain = json.loads(capsys.readouterr().out)
    main(args + ["--cuda-graphs"])
    graphs = json.loads(capsys.readouterr().out)
    assert graphs["token_ids"] == plain["token_ids"] and "buckets" in graphs["backend"]


def test_model_shorter_than_the_default_window_limit_exports_without_flags(tmp_path, capsys):
    """A checkpoint with fewer positions than the default --max-active (256) exports and runs as it is."""
    from dllm_trt.export.checkpoint_writer import byte_tokenizer, random_weights, tiny_config, write_checkpoint

    cfg = tiny_config(n_layers=1, d_model=32, n_heads=2, max_len=48)
    model = write_checkpoint(tmp_path / "short", cfg, random_weights(cfg, 1), byte_tokenizer())
    main(["generate", "--model", str(model), "--engine-cache", str(tmp_path / "engines"), "--prompt", "Hi",
          "--gen-length", "8", "--json"])
    assert json.loads(capsys.readouterr().out)["steps"] > 0
    (engines,) = (tmp_path / "engines").iterdir()
    assert json.loads((engines / "manifest.json").read_text())["profiles"]["window"]["rows"]["max"] == 48
