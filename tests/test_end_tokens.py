"""Every end token the checkpoint declares (EOS, end-of-turn, ...) ends an answer: early stop, token counting,
text and finish_reason. LLaDA-8B-Instruct ends with <|eot_id|> and pads with <|endoftext|>."""
from dataclasses import replace

import numpy as np
import pytest

from dllm_trt.runtime.api import Engine
from dllm_trt.runtime.backends.torch_backend import TorchBackend
from dllm_trt.runtime.tokenizer import TextTokenizer

PROMPT = "End here"


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(TorchBackend(tiny_dir, layers_per_range=2), TextTokenizer(tiny_dir), "tiny")


def test_second_end_token_stops_counts_and_finishes(engine):
    plain = engine.generate(PROMPT, cache="elastic", max_tokens=48, early_stop=True)
    assert plain.finish_reason == "length" or plain.tokens < 48
    # pick a token the model writes mid-answer and declare it an end token, as <|eot_id|> is for LLaDA-8B-Instruct
    stop_token = next(t for t in plain.token_ids[4:] if t not in plain.token_ids[:4])
    cfg = engine.backend.config
    engine.backend.config = replace(cfg, end_token_ids=(cfg.eos_token_id, stop_token))
    try:
        res = engine.generate(PROMPT, cache="elastic", max_tokens=48, early_stop=True)
        streamed = "".join(engine.stream(PROMPT, cache="elastic", max_tokens=48, early_stop=True))
    finally:
        engine.backend.config = cfg
    assert res.finish_reason == "stop"
    end = res.canvas_ids.index(stop_token)
    assert res.token_ids == res.canvas_ids[:end] and res.tokens == end
    assert stop_token not in res.token_ids
    assert res.text == engine.tokenizer.decode(res.token_ids) and streamed == res.text
    # early stop: positions after the first end token were abandoned (left MASK) instead of decoded
    assert cfg.mask_token_id in res.canvas_ids[end + 1:]
    assert res.steps < plain.steps


def test_canvas_cut_uses_every_end_id():
    from dllm_trt.runtime.schedule import Canvas

    ids = np.array([5, 6, 9, 9, 9, 9], dtype=np.int64)
    canvas = Canvas(ids, prompt_len=2, mask_id=9, end_ids=(1, 2))
    canvas.commit(np.array([3]), np.array([2]), early_stop=True)
    assert canvas.pending.tolist() == [2]
