"""Sanity tests of the naive LLaDA oracle itself (tests/naive_reference.py)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import naive_reference as nr  # noqa: E402

from dllm_trt.export.checkpoint_writer import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)
    return nr.load_weights(d)


def _canvas(cfg, prompt_len=24, gen=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (prompt_len,), generator=g)
    return torch.cat([prompt, torch.full((gen,), cfg.mask_token_id)]), prompt.tolist()


def test_shapes_and_probs(model):
    cfg, w = model
    canvas, _ = _canvas(cfg)
    out = nr.naive_forward(w, cfg, canvas)
    n = canvas.numel()
    assert out["logits"].shape == (n, cfg.embedding_size) and out["logits"].dtype == torch.float32
    assert len(out["qkv"]) == len(out["probs"]) == cfg.n_layers
    for (q, k, v), p in zip(out["qkv"], out["probs"]):
        assert q.shape == k.shape == v.shape == (cfg.n_heads, n, cfg.head_dim)
        assert p.shape == (cfg.n_heads, n, n)
        torch.testing.assert_close(p.sum(-1), torch.ones(cfg.n_heads, n))


@pytest.mark.parametrize("rows", [[30, 31, 32, 33], list(range(24, 40)), [0, 39, 5], list(range(40))])
def test_query_rows_with_fresh_cache_reproduce_full_forward(model, rows):
    cfg, w = model
    canvas, _ = _canvas(cfg)
    full = nr.naive_forward(w, cfg, canvas)
    part = nr.naive_forward(w, cfg, canvas, query_positions=rows, cached_kv=nr.full_kv(full))
    torch.testing.assert_close(part["logits"], full["logits"][rows], rtol=1e-5, atol=1e-5)
    for l in range(cfg.n_layers):
        torch.testing.assert_close(part["probs"][l], full["probs"][l][:, rows], rtol=1e-5, atol=1e-5)
        for a, b in zip(part["qkv"][l], full["qkv"][l]):
            torch.testing.assert_close(a, b[:, rows], rtol=1e-5, atol=1e-5)


def test_stale_cache_is_used_for_non_query_rows(model):
    """Changing tokens outside the query rows does not matter when their K/V come from a given cache,
    and the stale result differs from a fresh full forward of the changed canvas."""
    cfg, w = model
    canvas, _ = _canvas(cfg)
    kv = nr.full_kv(nr.naive_forward(w, cfg, canvas))
    rows = list(range(32, 40))
    changed = canvas.clone()
    changed[24:32] = 65
    a = nr.naive_forward(w, cfg, canvas, query_positions=rows, cached_kv=kv)["logits"]
    b = nr.naive_forward(w, cfg, changed, query_positions=rows, cached_kv=kv)["logits"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh = nr.naive_forward(w, cfg, changed)["logits"][rows]
    assert not torch.allclose(b, fresh, atol=1e-4)


def test_query_rows_without_cache_rejected(model):
    cfg, w = model
    canvas, _ = _canvas(cfg)
    with pytest.raises(ValueError):
        nr.naive_forward(w, cfg, canvas, query_positions=[1, 2])


def test_rope_scores_depend_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    def score(pq, pk):
        return (nr._rope(q, torch.tensor([pq]), 10000.0) * nr._rope(k, torch.tensor([pk]), 10000.0)).sum(-1)
    torch.testing.assert_close(score(3, 7), score(20, 24), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nr._rope(q, torch.tensor([0]), 10000.0), q)


def test_candidates_never_propose_mask():
    from dllm_trt.runtime.config import ModelConfig
    cfg = ModelConfig(d_model=8, n_heads=2, n_layers=1, mlp_hidden_size=8, vocab_size=5, embedding_size=7,
                      mask_token_id=3, eos_token_id=4, max_sequence_length=16)
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 0.0, 50.0, 50.0],   # MASK (3) and padded ids (5,6) highest
                           [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])   # exact tie: lower token id
    tok, conf = nr.candidates(logits, cfg)
    assert tok.tolist() == [2, 0]
    p0 = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 0.0]), -1)[2]
    torch.testing.assert_close(conf[0], p0)
    assert conf.dtype == torch.float32


def test_topk_ties_lower_position_first():
    pos = [10, 4, 7, 2]
    conf = torch.tensor([0.5, 0.5, 0.9, 0.1])
    assert nr.select_topk(pos, conf, 1) == [7]
    assert nr.select_topk(pos, conf, 2) == [7, 4]
    assert nr.select_topk(pos, conf, 3) == [7, 4, 10]
    assert nr.select_topk(pos, conf, 10) == [7, 4, 10, 2]


def test_threshold_rule():
    pos = [10, 4, 7, 2]
    conf = torch.tensor([0.5, 0.5, 0.9, 0.1])
    assert sorted(nr.select_threshold(pos, conf, 0.5)) == [4, 7, 10]   # >= tau
    assert nr.select_threshold(pos, conf, 0.6) == [7]
    assert nr.select_threshold(pos, conf, 0.95) == [7]                 # none: most confident
    assert nr.select_threshold(pos, torch.tensor([0.3, 0.3, 0.2, 0.1]), 0.9) == [4]  # tie: lower pos


def test_transfer_counts():
    assert nr.transfer_counts(10, 4) == [3, 3, 2, 2]
    assert nr.transfer_counts(8, 4) == [2, 2, 2, 2]
    assert nr.transfer_counts(3, 4) == [1, 1, 1, 0]


def test_one_step_samplers_agree(model):
    """One block decoded in one step: LLaDA (steps=1) and Fast-dLLM (threshold 0) both take the argmax of a
    single full forward of the initial canvas at every generated position."""
    cfg, w = model
    canvas, prompt = _canvas(cfg)
    tok, _ = nr.candidates(nr.naive_forward(w, cfg, canvas)["logits"][24:], cfg)
    assert nr.naive_llada_generate(w, cfg, prompt, 16, 16, 1) == tok.tolist()
    for cache in ("prefix", "dual"):
        assert nr.naive_fastdllm_generate(w, cfg, prompt, 16, 16, 0.0, cache) == (tok.tolist(), 1)


def test_llada_one_token_per_step(model):
    cfg, w = model
    _, prompt = _canvas(cfg)
    ids = nr.naive_llada_generate(w, cfg, prompt, 16, 8, 16)
    assert len(ids) == 16 and cfg.mask_token_id not in ids
    # replay: each step fills exactly the most confident masked position of the current block
    canvas = torch.tensor(prompt + [cfg.mask_token_id] * 16)
    for _ in range(16):
        lo = 24 + 8 * (int((canvas[24:32] == cfg.mask_token_id).sum()) == 0)
        masked = [p for p in range(lo, lo + 8) if canvas[p] == cfg.mask_token_id]
        tok, conf = nr.candidates(nr.naive_forward(w, cfg, canvas)["logits"][masked], cfg)
        i = max(range(len(masked)), key=lambda j: (float(conf[j]), -masked[j]))
        canvas[masked[i]] = tok[i]
    assert canvas[24:].tolist() == ids


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fastdllm_counts_and_completes(model, cache):
    cfg, w = model
    _, prompt = _canvas(cfg)
    ids, nfe = nr.naive_fastdllm_generate(w, cfg, prompt, 16, 8, 2.0, cache)  # tau > 1: one token per step
    assert len(ids) == 16 and cfg.mask_token_id not in ids and nfe == 16
    ids2, nfe2 = nr.naive_fastdllm_generate(w, cfg, prompt, 16, 4, 0.0, cache)  # all at once per block
    assert cfg.mask_token_id not in ids2 and nfe2 == 4


def test_fastdllm_first_step_is_fresh_then_stale(model):
    """The second forward of a block uses the block-start cache; with tau > 1, step 1 equals LLaDA's step 1."""
    cfg, w = model
    _, prompt = _canvas(cfg)
    ll = nr.naive_llada_generate(w, cfg, prompt, 8, 8, 8)
    fd, _ = nr.naive_fastdllm_generate(w, cfg, prompt, 8, 8, 2.0, "dual")
    # both decode the same first position with the same token (identical full forward, top-1)
    canvas = torch.tensor(prompt + [cfg.mask_token_id] * 8)
    tok, conf = nr.candidates(nr.naive_forward(w, cfg, canvas)["logits"][24:], cfg)
    first = max(range(8), key=lambda j: (float(conf[j]), -j))
    assert ll[first] == fd[first] == int(tok[first])
