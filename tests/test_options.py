"""One options factory for every entry point: the CLI, the Python API, the server and eval decode the same options
into the same token ids; schedules reset per generation; the default generation length fits the model."""
import json

import pytest

from dllm_trt.cli import main
from dllm_trt.evaluate.harness import RunConfig, evaluate
from dllm_trt.runtime.api import Engine
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import (DEFAULT_GEN_LENGTH, DecodeOptions, OptionError, PromptTooLong, build,
                                      check_gamma, check_schedule, decode_options)
from dllm_trt.runtime.policies import make_policy
from dllm_trt.runtime.schedule import BlockSchedule, WindowSchedule

PROMPT = "Entry points agree"
CASES = [{"cache": "none"}, {"cache": "dual"}, {"cache": "elastic"}, {"cache": "none", "window": 8},
         {"cache": "elastic", "gamma": 0.99, "window": 4}]


@pytest.fixture(scope="module")
def engine(tiny_engines):
    return Engine.load(tiny_engines)


@pytest.mark.parametrize("case", CASES, ids=[json.dumps(c) for c in CASES])
def test_four_entry_points_give_identical_tokens(engine, tiny_engines, case, capsys):
    from fastapi.testclient import TestClient

    from dllm_trt.runtime.server import create_app

    messages = [{"role": "user", "content": PROMPT}]
    api = engine.generate(messages, max_tokens=32, **case)

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in case.items()]
    main(["generate", "--engines", str(tiny_engines), "--prompt", PROMPT, "--chat", "--gen-length", "32", "--json",
          *flags])
    cli = json.loads(capsys.readouterr().out)

    with TestClient(create_app(engine)) as client:
        reply = client.post("/v1/chat/completions", json={"model": engine.name, "messages": messages,
                                                          "max_tokens": 32, **case}).json()

    (summary,) = evaluate(engine.backend, engine.tokenizer, [{"question": PROMPT, "answer": "#### 0"}],
                          [RunConfig("case", DecodeOptions(**case))], 32, progress=False)
    evaluated = summary.outputs[0]

    assert api.tokens > 0
    assert cli["token_ids"] == api.token_ids
    assert (cli["steps"], cli["layer_steps_refreshed"]) == (api.steps, api.layer_steps_refreshed)
    assert evaluated["token_ids"] == api.token_ids and evaluated["steps"] == api.steps
    assert reply["choices"][0]["message"]["content"] == api.text
    assert reply["usage"]["completion_tokens"] == api.tokens and reply["dllm_trt"]["steps"] == api.steps


def test_cache_none_means_the_llada_baseline_everywhere():
    schedule, policy = build(DecodeOptions(cache="none"), 64)
    assert isinstance(schedule, BlockSchedule) and schedule.steps == 64 and policy.name == "none"
    schedule, _ = build(DecodeOptions(cache="none", window=16), 64)
    assert isinstance(schedule, WindowSchedule)


def test_reused_decoder_resets_its_schedule(tiny_dir, prompts):
    """A single-block schedule reused by a second generation must start a new block (a full pass), not decode
    from the previous canvas's block state with freshly zeroed caches."""
    from dllm_trt.runtime.backends.torch_backend import TorchBackend

    backend = TorchBackend(tiny_dir, layers_per_range=2)
    first, other = prompts[0], [65] + prompts[0][1:]  # same length: the block starts at the same position
    reused = Decoder(backend, make_policy("dual"), BlockSchedule(32, 32, threshold=0.08))
    reused.generate(first)
    second = reused.generate(other)
    fresh = Decoder(backend, make_policy("dual"), BlockSchedule(32, 32, threshold=0.08)).generate(other)
    assert second.canvas_ids == fresh.canvas_ids and second.steps == fresh.steps


def test_default_gen_length_fits_the_model():
    assert DecodeOptions().fit_gen_length(10, 512) == DEFAULT_GEN_LENGTH
    assert DecodeOptions().fit_gen_length(40, 256) == 216                    # window: everything that fits
    assert DecodeOptions(cache="dual").fit_gen_length(40, 256) == 192        # blocks: whole blocks of 32
    assert DecodeOptions(cache="none", block_length=8).fit_gen_length(40, 256) == 216
    with pytest.raises(PromptTooLong, match="exceeds the 256 positions available"):
        DecodeOptions(gen_length=250).fit_gen_length(40, 256)
    with pytest.raises(PromptTooLong, match="leaves no room"):
        DecodeOptions().fit_gen_length(256, 256)


def test_generate_without_gen_length_on_the_bundled_model(capsys):
    """The bundled model has 256 positions in all: its default length (128) is shortened to fit a long prompt,
    and said so; a short prompt gets the default, silently."""
    question = ("A counter shows 36 . Each step adds 5 and keeps the last two digits . What does it show after 5 "
                "steps ?")
    main(["generate", "--backend", "torch", "--prompt", " ".join([question] * 6), "--chat", "--json"])
    captured = capsys.readouterr()
    assert "gen length" in captured.err and "what fits" in captured.err
    result = json.loads(captured.out)
    assert result["prompt_tokens"] + len(result["canvas_ids"]) == 256 and len(result["canvas_ids"]) < 128
    main(["generate", "--backend", "torch", "--prompt", question, "--chat", "--json"])
    captured = capsys.readouterr()
    assert "gen length" not in captured.err and len(json.loads(captured.out)["canvas_ids"]) == 128


@pytest.mark.parametrize("options,field", [
    ({"cache": "elastic", "gamma": float("inf")}, "gamma"), ({"window": True}, "window"),
    ({"threshold": "high"}, "threshold"), ({"cache": "prefix", "window": 4}, "window"),
    ({"early_stop": "yes"}, "early_stop"), ({"gen_length": 0}, "gen_length"),
])
def test_option_errors_name_the_option(options, field):
    with pytest.raises(OptionError) as e:
        DecodeOptions(**options).validate()
    assert e.value.field == field


def test_request_and_flag_options_are_validated_in_one_place():
    assert decode_options({"max_tokens": 8, "gamma": None, "cache": "dual"}) == DecodeOptions(cache="dual",
                                                                                              gen_length=8)
    with pytest.raises(OptionError, match="max_tokens and gen_length are the same option"):
        decode_options({"max_tokens": 8, "gen_length": 8})
    with pytest.raises(OptionError) as e:
        decode_options({"temperature": 0.5, "window": 4})
    assert (e.value.field, e.value.problem) == ("temperature", "is not a decoding option")
    with pytest.raises(OptionError, match="window must be at least 1"):
        decode_options({"window": 0})
    with pytest.raises(OptionError, match=r"gamma must be in \[-1, 2\]"):
        check_gamma(float("nan"))


def test_schedule_errors_need_no_engine():
    check_schedule(DecodeOptions(gamma="calibrated", gen_length=16))   # gamma is the engine's to resolve
    check_schedule(DecodeOptions(block_length=7))                       # no gen length: nothing to check yet
    with pytest.raises(OptionError, match=r"\(16\) must be a multiple of the block length \(7\)"):
        check_schedule(DecodeOptions(block_length=7, gen_length=16))


def test_calibrated_gamma_is_every_entry_points_default(engine, tiny_engines, tmp_path, capsys):
    """An engine folder calibrated by `dllm-trt calibrate` decodes with its gamma wherever none is given: CLI
    generate, the Python API, a server body without gamma, eval; a given gamma still wins."""
    import shutil

    from fastapi.testclient import TestClient

    from dllm_trt.runtime.calibration import write_calibration
    from dllm_trt.runtime.server import create_app

    folder = shutil.copytree(tiny_engines, tmp_path / "calibrated")
    write_calibration(folder, {
        "gamma": {"heads": -1.0}, "score": {"heads": 1.0}, "refresh_fraction": {"heads": 0.1},
        "objective": "agreement", "target": 0.99, "prompts": 1, "data_sha256": "0" * 64, "tool_version": "test",
        "date": "2026-12-06T00:00:00+00:00"})
    calibrated = Engine.load(folder)
    messages = [{"role": "user", "content": PROMPT}]
    case = {"max_tokens": 32, "window": 4}
    given = calibrated.generate(messages, gamma=-1.0, **case)
    uncalibrated = engine.generate(messages, **case)                       # 0.9, the default
    assert given.layer_steps_refreshed != uncalibrated.layer_steps_refreshed   # the two gammas decode differently

    def same(result, expected):
        return (result.token_ids, result.steps, result.layer_steps_refreshed) == \
            (expected.token_ids, expected.steps, expected.layer_steps_refreshed)

    assert same(calibrated.generate(messages, **case), given)
    assert same(calibrated.generate(messages, gamma=0.9, **case), uncalibrated)

    def cli(folder, *flags):
        main(["generate", "--engines", str(folder), "--prompt", PROMPT, "--chat", "--gen-length", "32", "--window",
              "4", "--json", *flags])
        return json.loads(capsys.readouterr().out)

    out = cli(folder)
    assert (out["token_ids"], out["layer_steps_refreshed"]) == (given.token_ids, given.layer_steps_refreshed)
    assert (out["gamma"], out["gamma_source"]) == (-1.0, "calibrated")
    out = cli(folder, "--gamma", "0.9")
    assert out["layer_steps_refreshed"] == uncalibrated.layer_steps_refreshed and out["gamma_source"] == "given"
    assert cli(tiny_engines)["gamma_source"] == "default"

    with TestClient(create_app(calibrated)) as client:
        for body, expected in (({}, given), ({"gamma": 0.9}, uncalibrated)):
            reply = client.post("/v1/chat/completions", json={"model": calibrated.name, "messages": messages,
                                                              "max_tokens": 32, "window": 4, **body}).json()
            assert reply["choices"][0]["message"]["content"] == expected.text
            assert reply["dllm_trt"]["steps"] == expected.steps

    (summary,) = evaluate(calibrated.backend, calibrated.tokenizer, [{"question": PROMPT, "answer": "#### 0"}],
                          [RunConfig("case", DecodeOptions(cache="elastic", window=4))], 32, progress=False)
    assert summary.outputs[0]["token_ids"] == given.token_ids and summary.layer_steps_refreshed == \
        given.layer_steps_refreshed

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"question": PROMPT, "answer": "#### 0"}) + "\n")
    flags = ["--data", str(data), "--cache", "elastic", "--no-llada-baseline", "--gen-length", "32", "--window", "4",
             "--gamma", "calibrated"]
    main(["eval", "--engines", str(folder), *flags])
    assert "Elastic-Cache (gamma -1, calibrated)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["eval", "--engines", str(tiny_engines), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--gamma 'calibrated': the engine has no calibrated gamma" in err[-1]
    assert not any("Traceback" in line for line in err)
