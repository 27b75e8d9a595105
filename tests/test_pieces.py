"""The exported pieces, composed, against the independent monolithic forward in naive_reference."""
import numpy as np
import pytest
import torch

import naive_reference as ref
from dllm_trt.runtime.checkpoint import Checkpoint
from dllm_trt.runtime.config import layer_ranges
from dllm_trt.runtime.model_torch import Embedding, Head, LayerRange


@pytest.fixture(scope="module")
def model(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    cfg, weights = ref.load_weights(tiny_dir)
    return ckpt, cfg, weights


def pieces(ckpt, per_range):
    cfg = ckpt.config
    layers = [LayerRange(cfg, a, b).load(ckpt) for a, b in layer_ranges(cfg.n_layers, per_range)]
    return Embedding(cfg).load(ckpt), layers, Head(cfg).load(ckpt)


@pytest.mark.parametrize("per_range", [1, 2, 4])
def test_refresh_pieces_equal_monolithic_forward(model, per_range):
    ckpt, cfg, weights = model
    emb, layers, head = pieces(ckpt, per_range)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (37,))
    ids[20:] = cfg.mask_token_id
    expected = ref.naive_forward(weights, cfg, ids)
    pos = torch.arange(len(ids))
    h = emb(ids)
    with torch.no_grad():
        for lr in layers:
            out = lr.refresh(h, pos, torch.arange(20, 30), ids == cfg.mask_token_id)
            for i, layer in enumerate(range(lr.first, lr.last)):
                q, k, v = expected["qkv"][layer]
                got_k, got_v, got_q = out[1 + 4 * i: 4 + 4 * i]
                assert (got_k - k).abs().max() < 1e-5 and (got_v - v).abs().max() < 1e-5
                assert (got_q - q).abs().max() < 1e-5
                colsum = expected["probs"][layer][:, 20:30].sum((0, 1))
                colsum[ids == cfg.mask_token_id] = 0
                assert torch.allclose(out[4 + 4 * i], colsum, atol=1e-5)
            h = out[0]
        tokens, probs = head(h, pos)
    want_tok, want_conf = ref.candidates(expected["logits"], cfg)
    assert torch.equal(tokens, want_tok)
    assert torch.allclose(probs, want_conf, atol=1e-6)


def test_window_piece_with_stale_cache_matches_naive(model):
    """Window mode: cached K/V of non-query slots are stale, query rows are fresh; attention rows, the drift
    similarity of tracked tokens and the most-attended column sums are compared slot by slot."""
    ckpt, cfg, weights = model
    emb, layers, head = pieces(ckpt, 2)
    torch.manual_seed(1)
    old_ids = torch.randint(0, cfg.vocab_size, (40,))
    old_ids[25:] = cfg.mask_token_id
    old = ref.naive_forward(weights, cfg, old_ids)
    cache = ref.full_kv(old)
    new_ids = old_ids.clone()
    new_ids[25:28] = torch.tensor([65, 66, 67])              # three tokens decoded since the cache was filled
    queries = torch.tensor([3, 11, 25, 26, 27, 28, 29, 30])   # tracked 3 and 11, fresh 25..27, window 28..30
    track_rows, window_rows = torch.tensor([0, 1]), torch.tensor([5, 6, 7])
    key_is_mask = new_ids == cfg.mask_token_id
    expected = ref.naive_forward(weights, cfg, new_ids, queries, cache)
    h = emb(new_ids[queries])
    scale = cfg.head_dim ** -0.5
    with torch.no_grad():
        for lr in layers:
            args = []
            for layer in range(lr.first, lr.last):
                args += [cache[layer][0], cache[layer][1], old["qkv"][layer][0][:, [3, 11]]]
            out = lr.window(h, queries, track_rows, window_rows, key_is_mask, *args)
            for i, layer in enumerate(range(lr.first, lr.last)):
                q, k, v = expected["qkv"][layer]
                new_k, new_v, new_q, drift, colsum = out[1 + 5 * i: 6 + 5 * i]
                assert (new_k - k).abs().max() < 1e-5 and (new_q - q).abs().max() < 1e-5
                probs = expected["probs"][layer]                       # [H, Sq, N] over canvas slots
                want_col = probs[:, window_rows].sum((0, 1))
                want_col[key_is_mask] = 0
                assert torch.allclose(colsum, want_col, atol=1e-5)
                old_attn = torch.softmax(old["qkv"][layer][0][:, [3, 11]] @ cache[layer][0].transpose(1, 2) * scale, -1)
                new_attn = probs[:, track_rows]
                heads = torch.nn.functional.cosine_similarity(old_attn, new_attn, dim=0).mean()
                keys = torch.nn.functional.cosine_similarity(old_attn, new_attn, dim=-1).mean()
                assert abs(float(drift[0]) - float(heads)) < 1e-5
                assert abs(float(drift[1]) - float(keys)) < 1e-5
            h = out[0]
        tokens, probs = head(h, torch.arange(len(queries)))
    want_tok, want_conf = ref.candidates(expected["logits"], cfg)
    assert torch.equal(tokens, want_tok)
    assert torch.allclose(probs, want_conf, atol=1e-6)


def test_exported_forward_in_refresh_mode_rounds_exactly_as_the_reference_refresh():
    """LayerRange.forward with every slot a query row (and NaN in every cache entry, none of which may be read) gives
    LayerRange.refresh's outputs bit for bit, on the bundled model (head_dim 32: the attention scale is not a power
    of two, so scaling scores or queries would round differently)."""
    from dllm_trt.cli import DEFAULT_MODEL

    ckpt = Checkpoint(DEFAULT_MODEL)
    cfg = ckpt.config
    lr = LayerRange(cfg, 0, 2).load(ckpt)
    n, H, hd = 40, cfg.n_heads, cfg.head_dim
    torch.manual_seed(1)
    hidden, window = torch.randn(n, cfg.d_model), torch.tensor([31, 33, 35, 37])
    key_is_mask = torch.arange(n) >= 30
    caches = [torch.full((1, H, n if c % 3 < 2 else 1, hd), float("nan")) for c in range(6)]
    with torch.no_grad():
        want = lr.refresh(hidden, torch.arange(n), window, key_is_mask)
        got = lr(hidden[None], torch.arange(n)[None], torch.tensor([n]), key_is_mask[None], torch.zeros(1, 1,
                 dtype=torch.int64), window[None], *caches)
    assert torch.equal(got[0][0], want[0])
    for i in range(2):   # per layer: key, value, query, colsum (the forward's drift is ignored in refresh mode)
        k, v, q, _, colsum = got[1 + 5 * i: 6 + 5 * i]
        for g, w in zip((k[0], v[0], q[0], colsum[0]), want[1 + 4 * i: 5 + 4 * i]):
            assert torch.equal(g, w)
