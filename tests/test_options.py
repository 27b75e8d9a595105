"""One options factory for every entry point: the CLI, the Python API, the server and eval decode the same options
into the same token ids; schedules reset per generation; the default generation length fits the model."""
import json

import pytest

from dllm_trt.cli import main
from dllm_trt.evaluate.harness import RunConfig, evaluate
from dllm_trt.runtime.api import Engine
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import DEFAULT_GEN_LENGTH, DecodeOptions, OptionError, PromptTooLong, build
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
