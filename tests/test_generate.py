"""End-to-end decoding on the torch backend against independent oracles and the policy invariants."""
import numpy as np
import pytest

import naive_reference as ref
from dllm_trt.runtime.backends.torch_backend import TorchBackend
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.policies import make_policy
from dllm_trt.runtime.schedule import BlockSchedule, WindowSchedule

GEN = 32
THRESHOLD = 0.08  # the random tiny model's confidences straddle this, so some steps commit several tokens


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    return ref.load_weights(tiny_dir)


@pytest.fixture(scope="module")
def backends(tiny_dir):
    return {k: TorchBackend(tiny_dir, layers_per_range=k) for k in (1, 2, 4)}


def run(backend, policy, schedule, prompt):
    return Decoder(backend, policy, schedule).generate(prompt)


def test_none_with_llada_schedule_matches_llada_generate(backends, oracle, prompts):
    cfg, weights = oracle
    for prompt in prompts[:6]:
        want = ref.naive_llada_generate(weights, cfg, prompt, GEN, block_length=16, steps=GEN)
        got = run(backends[2], make_policy("none"), BlockSchedule(GEN, 16, steps=GEN), prompt)
        assert got.canvas_ids == want
        assert got.steps == GEN


def test_llada_schedule_with_two_tokens_per_step(backends, oracle, prompts):
    cfg, weights = oracle
    for prompt in prompts[:3]:
        want = ref.naive_llada_generate(weights, cfg, prompt, GEN, block_length=8, steps=GEN // 2)
        got = run(backends[1], make_policy("none"), BlockSchedule(GEN, 8, steps=GEN // 2), prompt)
        assert got.canvas_ids == want and got.steps == GEN // 2


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fast_dllm_caches_match_naive_stale_kv(backends, oracle, prompts, cache):
    cfg, weights = oracle
    multi = 0
    for prompt in prompts[:6]:
        want, nfe = ref.naive_fastdllm_generate(weights, cfg, prompt, GEN, 16, THRESHOLD, cache)
        got = run(backends[1], make_policy(cache), BlockSchedule(GEN, 16, threshold=THRESHOLD), prompt)
        assert got.canvas_ids == want
        assert got.steps == nfe
        multi += nfe < GEN
    assert multi, "threshold never committed two tokens in one step: the test would not exercise parallel steps"


@pytest.mark.parametrize("per_range", [1, 2, 4])
def test_elastic_always_refresh_equals_no_cache(backends, prompts, per_range):
    """gamma > 1 detects drift at layer 0 every step; with 'rerun' everything is recomputed from the embeddings."""
    for prompt in prompts:
        sched = lambda: WindowSchedule(GEN, window=8, threshold=THRESHOLD)
        want = run(backends[per_range], make_policy("none"), sched(), prompt)
        got = run(backends[per_range], make_policy("elastic", gamma=1.5), sched(), prompt)
        assert got.canvas_ids == want.canvas_ids
        assert got.steps == want.steps
        assert got.refresh_fraction == 1.0


def test_elastic_next_alignment_refreshes_deeper_layers_every_step(backends, prompts):
    n_layers = backends[1].config.n_layers
    res = run(backends[1], make_policy("elastic", gamma=1.5, alignment="next"),
              WindowSchedule(GEN, window=8, threshold=THRESHOLD), prompts[0])
    assert res.tokens > 0
    # step 0 recomputes all layers; every later step triggers at layer 0 and refreshes layers 1..L-1
    assert res.layer_steps_refreshed == n_layers + (res.steps - 1) * (n_layers - 1)


def test_elastic_never_refresh(backends, prompts):
    n_layers = backends[2].config.n_layers
    sched = lambda: WindowSchedule(GEN, window=8, threshold=THRESHOLD)
    none = run(backends[2], make_policy("none"), sched(), prompts[1])
    never = run(backends[2], make_policy("elastic", gamma=-1.0), sched(), prompts[1])
    assert never.layer_steps_refreshed == n_layers  # step 0 only
    assert never.layer_steps_refreshed < none.layer_steps_refreshed
    assert never.refresh_fraction == pytest.approx(1 / never.steps)


def test_elastic_default_gamma_refreshes_sometimes(backends, prompts):
    n_layers = backends[1].config.n_layers
    results = [run(backends[1], make_policy("elastic", gamma=0.9), WindowSchedule(GEN, 8, THRESHOLD), p)
               for p in prompts[:5]]
    assert all(r.refresh_fraction < 0.5 for r in results)
    assert any(r.layer_steps_refreshed > n_layers for r in results), "drift never triggered after step 0"


def test_early_stop_abandons_masks_after_first_eos(backends, prompts):
    cfg = backends[1].config
    stopped = 0
    for prompt in prompts:
        res = run(backends[1], make_policy("none"), WindowSchedule(GEN, window=8, threshold=THRESHOLD), prompt)
        if cfg.eos_token_id in res.canvas_ids:
            e = res.canvas_ids.index(cfg.eos_token_id)
            assert res.tokens == e and res.token_ids == res.canvas_ids[:e]
            assert cfg.mask_token_id not in res.canvas_ids[:e]
            stopped += cfg.mask_token_id in res.canvas_ids[e:]
        else:
            assert cfg.mask_token_id not in res.canvas_ids and res.tokens == GEN
    assert stopped, "no prompt stopped early: the test did not exercise the EOS cut"
